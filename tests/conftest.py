"""Shared fixtures: the real models in ../shared/models, tiny random models of every family, a private cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEURONSCOPE_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260k"
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct"
SMOLLM_GGUF = SMOLLM_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPORA = SHARED / "corpora"

# one thread per pytest worker: `make test` runs 2 workers on 2 cores, and oversubscribed threads are 5-20x slower
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep every test's cache writes out of the user's home."""
    os.environ["NEURONSCOPE_HOME"] = str(tmp_path_factory.mktemp("nshome"))
    # de-quantized GGUF models are shared by all workers and runs (converting takes ~20 s, loading then ~1 s)
    os.environ.setdefault("NEURONSCOPE_CONVERTED_DIR", str(REPO / ".test-cache" / "converted"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def stories():
    """The real 260K-parameter TinyStories Llama (5 ms a forward)."""
    from neuronscope.subject import Subject
    assert STORIES.is_dir(), f"missing test model {STORIES}"
    return Subject.load(STORIES)


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M-Instruct, from its GGUF (de-quantized once into .test-cache, then ~1 s to load)."""
    from neuronscope.subject import Subject
    assert SMOLLM_GGUF.is_file(), f"missing test model {SMOLLM_GGUF}"
    return Subject.load(SMOLLM_GGUF)


@pytest.fixture(scope="session")
def stories_tokenizer(stories):
    return stories.tokenizer


def run_cli(capsys, *args):
    """`neuronscope ARGS...` in this process: (exit status, stdout, stderr)."""
    from neuronscope.cli import main
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def wait_for_url(proc, timeout: float) -> tuple[str | None, str]:
    """Read a `neuronscope serve` subprocess's output until it prints its http://127.0.0.1:PORT/ URL (or `timeout`
    seconds pass, or it ends): (the URL or None, what it printed)."""
    import re
    import time
    url, lines, deadline = None, [], time.time() + timeout
    while url is None and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        url = m.group(1) if m else None
    return url, "".join(lines)
