"""The `irm` and `data` CLI groups on stories260k: train -> generate -> eval -> analyze, resume, clear errors."""
from __future__ import annotations

import json


from neuronscope.cli import main
from tests.conftest import STORIES
from tests.test_irm import SENTS, _rows


def _cli(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_irm_cli_end_to_end(tmp_path, capsys):
    data = tmp_path / "happy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _rows("happy", 60)) + "\n")
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n\n".join(SENTS[240:250]) + "\n")
    run = tmp_path / "run"
    common = ["-m", str(STORIES), "--data", str(data), "-o", str(run), "--layers", "1-3", "--width", "32",
              "--batch-size", "8", "--eval-every", "10", "--patience", "0"]
    code, out, err = _cli(["irm", "train", *common, "--steps", "10"], capsys)
    assert code == 0, err
    code, out, err = _cli(["irm", "train", *common, "--steps", "20"], capsys)
    assert code == 2 and "already holds a run" in err
    code, out, err = _cli(["irm", "train", *common, "--steps", "20", "--resume"], capsys)
    assert code == 0 and "20 steps" in out, out + err
    assert json.loads((run / "run.json").read_text())["step"] == 20

    code, out, err = _cli(["irm", "generate", str(run), "-p", SENTS[250], "-n", "6"], capsys)
    assert code == 0 and "IRM off" in out and "IRM on" in out

    code, out, err = _cli(["irm", "eval", str(run), "--neutral", str(neutral), "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["aligned"]["on"] < rep["aligned"]["off"] and "neutral" in rep
    assert (run / "eval.json").is_file()

    q = tmp_path / "q.txt"
    q.write_text("\n".join(SENTS[250:256]) + "\n")
    code, out, err = _cli(["irm", "eval", str(run), "--judge", "builtin", "-q", str(q), "--limit", "4", "-n", "4",
                           "--target", "joy", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["n_prompts"] == 4 and rep["target"] == "joy" and "verdict" in rep and "vaderSentiment" in rep["judge"]
    assert (run / "judged.json").is_file()
    # questions the run was trained on are left out of the judged set; all of them trained on: a clear error
    split = json.loads((run / "split.json").read_text())
    trained = [SENTS[i] for i in range(60) if i not in set(split["val_rows"])]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(trained[:3] + SENTS[250:253]) + "\n")
    code, out, err = _cli(["irm", "eval", str(run), "--judge", "builtin", "-q", str(mixed), "-n", "4",
                           "--target", "joy", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n_prompts"] == 3 and "left out 3 question(s)" in err
    only_trained = tmp_path / "trained.txt"
    only_trained.write_text("\n".join(t.upper() for t in trained[:4]) + "\n")
    code, _, err = _cli(["irm", "eval", str(run), "--judge", "builtin", "-q", str(only_trained)], capsys)
    assert code == 2 and "held out" in err
    code, _, err = _cli(["irm", "eval", str(run), "--judge", "builtin"], capsys)
    assert code == 2 and "--questions" in err
    code, _, err = _cli(["irm", "eval", str(run), "--judge", "builtin", "-q", str(q), "--target", "boredom"], capsys)
    assert code == 2 and "Unknown emotion" in err

    code, out, err = _cli(["irm", "analyze", str(run), str(run), "-o", str(tmp_path / "rep"), "-n", "4",
                           "--top-k", "3", "--random", "3", "--permutations", "50"], capsys)
    assert code == 0, err
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "correlation.png").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = _cli(["irm", "generate", str(tmp_path), "-p", "hi"], capsys)
    assert code == 2 and err.startswith("error:") and "not an IRM run folder" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("question\nwhat?\n")
    code, _, err = _cli(["irm", "train", "-m", str(STORIES), "--data", str(bad), "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and "'text' column or 'prompt' and 'response'" in err
    assert not (tmp_path / "r" / "run.json").exists()
    q = tmp_path / "q.txt"
    q.write_text("Why?\n")
    code, _, err = _cli(["data", "synth", "--model", str(STORIES), "--tone", "angry", "-q", str(q), "-o",
                         str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and "no chat template" in err


def test_help_has_examples(capsys):
    for cmd in (["irm", "train"], ["irm", "generate"], ["irm", "eval"], ["irm", "analyze"], ["irm", "sweep"],
                ["data", "synth"], ["data", "select"], ["outliers"]):
        code, out, _ = _cli([*cmd, "--help"], capsys)
        assert code == 0 and "Example:" in out, cmd


def test_train_with_no_other_flag_is_the_recipe(tmp_path, capsys, monkeypatch):
    """`irm train -m MODEL --data DATA --alignment sadness` trains with the realigning recipe's settings."""
    from dataclasses import asdict

    from neuronscope.irm import recipe
    data = tmp_path / "sad.jsonl"
    data.write_text("".join(json.dumps(dict(r, chat=False)) + "\n" for r in _rows("sad", 60)))
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["irm", "train", "-m", str(STORIES), "--data", str(data), "--alignment", "sadness"],
                          capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "runs" / "sadness" / "run.json").read_text())
    assert run["train"] == dict(asdict(recipe.TRAIN), chat=False)          # the rows' own chat choice
    assert run["train"]["steps"] == 60 and run["train"]["batch_size"] == 4 and run["train"]["lr"] == 1e-3
    assert run["train"]["max_len"] == 192 and run["train"]["eval_every"] == 10 and run["train"]["patience"] == 3
    assert run["irm"]["width"] == 256 and run["irm"]["depth"] == 1 and run["irm"]["inject_layers"] == [0, 1, 2, 3, 4]
    assert run["data"]["alignment"] == "sadness" and "chat False" in out
    code, out, _ = _cli(["irm", "train", "--help"], capsys)
    assert "realigning recipe" in out and "irm-smollm-sad.sh" in out
