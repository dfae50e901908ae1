"""`neuronscope data synth`: make an alignment dataset by having an instruct model answer questions in a tone."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import DeviceOpt, DtypeOpt, GgufOpt, console, load_subject

data_app = typer.Typer(help="Datasets for IRM training.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    questions: Path = typer.Option(..., "--questions", "-q", help="Questions: a .txt file (one a line) or a table "
                                   "with a question/prompt/text column."),
    tone: str = typer.Option(..., "--tone", help="The tone of the answers, e.g. angry, sad, cheerful."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .jsonl (prompt, response, tone); resumed if it exists."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Instruct model (folder, .gguf, hub id); "
                                        "default: SmolLM2-135M-Instruct."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Questions per generation batch."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", "-n", min=1, max=4096, help="Cap on answer length."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N questions."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="System message; {tone} is replaced by the tone."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Answer each question in a tone with an instruct model, into a JSONL alignment dataset (resumable).

    Example: neuronscope data synth --model SmolLM2.gguf --tone angry --questions examples/questions.txt -o anger.jsonl
    """
    from ..irm.synth import read_questions, synthesize
    qs = read_questions(questions)
    if limit:
        qs = qs[:limit]
    subject = load_subject(model, gguf_file, dtype, device)
    res = synthesize(subject, qs, tone, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed, system=system)
    console.print(f"{res['done']} answers written, {res['skipped']} already there; {res['total']} rows in {out}")


@data_app.command("select")
def select(
    emotion: str = typer.Option(..., "--emotion", "-e", help="Target emotion (anger, sadness, joy, fear, ...) or "
                                "'neutral': the control set (passage mode: passages with no emotion word; frame "
                                "mode: the same answers framed by neutral sentences, the matched control of "
                                "`irm sweep`)."),
    questions: Path = typer.Option(..., "--questions", "-q", help="Training questions: .txt (one a line), a table, "
                                   "or an Alpaca-style JSON (its short input-free instructions)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .jsonl (prompt, response, emotion, rate, source)."),
    mode: str = typer.Option("passage", "--mode", help="passage: emotion-dense corpus passages as answers; frame: "
                             "the model's own greedy answer framed by emotional sentences (needs --model; the "
                             "recommended set for `irm train`, see docs/irm.md)."),
    corpus: List[Path] = typer.Option([], "--corpus", "-c", help="Corpus file (repeatable; passage mode): "
                                      "TinyStories text, plain text with blank-line paragraphs, or an Alpaca-style "
                                      "JSON list."),
    exclude: Optional[Path] = typer.Option(None, "--exclude", help="Held-out questions never used as prompts "
                                           "(e.g. the evaluation questions)."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Rows at most (passage mode; default 600) or "
                                    "questions answered (frame mode; default 160)."),
    min_rate: float = typer.Option(0.06, "--min-rate", help="Least share of target-emotion words per passage."),
    min_words: int = typer.Option(20, "--min-words", min=1),
    max_words: int = typer.Option(70, "--max-words", min=2),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Frame mode: the model whose own answers are "
                                        "framed (the model the IRM is trained on)."),
    frames: Optional[Path] = typer.Option(None, "--frames", help="Frame mode: emotional sentences, one a line "
                                          "(default: built-in first-person ones for sadness, anger, joy, fear)."),
    weave: bool = typer.Option(True, "--weave/--no-weave", help="Frame mode: also weave one emotional sentence in "
                               "after the answer's first sentence."),
    keep_opposite: bool = typer.Option(False, "--keep-opposite", help="Frame mode: keep answers that have a word "
                                       "of the opposite emotion (dropped by default)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, max=4096, help="Frame mode: cap on "
                                       "each answer (cut back to whole sentences)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Frame mode: questions per batch."),
    seed: int = typer.Option(0, "--seed"),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Build an alignment set offline, chosen or checked by the judge and reproducible from the same files and seed.

    passage: emotion-dense corpus passages, each the answer to a neutral training question.
    frame: the model answers each training question greedily (as `irm eval` does with the IRM off); the answer is
    kept whole and framed by emotional sentences, so the IRM learns the tone and not to leave the question.
    `--mode frame -e neutral` frames the same answers with neutral sentences: the matched control of `irm sweep`.

    Example: neuronscope data select --mode frame -m SmolLM2.gguf -e sadness -q alpaca_data.json
    --exclude examples/questions.txt -o sad-frame.jsonl
    """
    from ..errors import NeuronscopeError
    from ..irm.alignset import alpaca_questions, build_alignment_set, build_frame_set
    from ..irm.synth import read_questions
    from ..store import write_text
    import json
    if out.suffix.lower() != ".jsonl":
        raise NeuronscopeError(f"The output must be a .jsonl file, got '{out.name}'.")
    if mode not in ("passage", "frame"):
        raise NeuronscopeError(f"Unknown --mode '{mode}'; use passage or frame.")
    if mode == "passage" and not corpus:
        raise NeuronscopeError("Passage mode needs at least one --corpus file.")
    if questions.suffix.lower() == ".json":
        qs = alpaca_questions(questions)
    else:
        qs = read_questions(questions)
    held = read_questions(exclude) if exclude else []
    if mode == "frame":
        lines = None
        if frames is not None:
            if not frames.is_file():
                raise NeuronscopeError(f"No frames file at '{frames}'.")
            lines = frames.read_text(encoding="utf-8").splitlines()
        subject = load_subject(model, gguf_file, dtype, device)
        rows = build_frame_set(subject, qs, emotion, n=n or 160, exclude=held, seed=seed, frames=lines,
                               weave=weave, drop_opposite=not keep_opposite, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    else:
        rows = build_alignment_set(corpus, qs, emotion, n=n or 600, exclude=held, seed=seed, min_rate=min_rate,
                                   min_words=min_words, max_words=max_words)
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    console.print(f"{len(rows)} rows ({emotion}, {mode}) in {out}; mean target rate "
                  f"{sum(r['rate'] for r in rows) / len(rows):.3f}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
