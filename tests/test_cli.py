"""The `neuronscope` command: help everywhere, core commands on real models, clear errors with exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from neuronscope.cli import app, main
from conftest import SMOLLM_GGUF, STORIES


def run(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def _all_command_paths():
    root = typer.main.get_command(app)
    paths = []

    def walk(cmd, path):
        paths.append(path)
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
    walk(root, [])
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "root")
def test_help_everywhere(capsys, path):
    code, out, _ = run(capsys, *path, "--help")
    assert code == 0 and "Usage" in out


def test_info_json(capsys):
    code, out, _ = run(capsys, "info", str(STORIES), "--json")
    assert code == 0
    facts = json.loads(out)
    assert facts["layers"] == 5 and facts["neurons_per_layer"] == 172 and facts["family"] == "llama"
    assert "resid.mid" in facts["sites"]


def test_generate_with_clamp_changes_text(capsys):
    code, plain, _ = run(capsys, "generate", str(STORIES), "-p", "Once upon a time", "-n", "16")
    assert code == 0 and "Lily" in plain
    code, steered, _ = run(capsys, "generate", str(STORIES), "-p", "Once upon a time", "-n", "16",
                           "--clamp", "3:5,6=10@generated")
    assert code == 0 and steered != plain
    code, added, _ = run(capsys, "generate", str(STORIES), "-p", "Once upon a time", "-n", "16",
                         "--add-vector", "1-2/mid=token:dog*6")
    assert code == 0 and added != plain


@pytest.mark.parametrize("args,needle", [
    (["--clamp", "3:999=1"], "out of range"),
    (["--clamp", "9:1=1"], "out of range"),
    (["--clamp", "3:1=nan"], "finite"),
    (["--scale", "3:1=inf"], "finite"),
    (["--clamp", "3:1"], "needs a value"),
    (["--clamp", "three"], "Cannot read"),
    (["--add-vector", "1=token:dog*nan"], "finite"),
    (["--add-vector", "1=missing.safetensors"], "No vector file"),
    (["--temperature", "-1"], "Temperature"),
])
def test_bad_generate_input(capsys, args, needle):
    code, _, err = run(capsys, "generate", str(STORIES), "-p", "Once upon a time", "-n", "4", *args)
    assert code == 2 and needle in err and "Traceback" not in err


def test_empty_prompt_and_unknown_option(capsys):
    code, _, err = run(capsys, "generate", str(STORIES), "-p", "  ")
    assert code == 2 and "empty" in err
    code, _, err = run(capsys, "generate", str(STORIES), "-p", "hi", "--bogus")
    assert code == 2 and "bogus" in err
    code, _, err = run(capsys, "info", "/no/such/model")
    assert code == 2 and "No model at" in err


@pytest.mark.slow
def test_quickstart_default_model(tmp_path):
    """The README's quickstart: pull the default model once, then use it without naming it."""
    env = dict(os.environ, NEURONSCOPE_HOME=str(tmp_path / "home"))
    exe = [sys.executable, "-m", "neuronscope"]
    r = subprocess.run(exe + ["models", "pull", "--from", str(SMOLLM_GGUF)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_file()
    r = subprocess.run(exe + ["generate", "--chat", "-p", "What is the capital of France?", "-n", "12"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
