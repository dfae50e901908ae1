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
                                "'neutral' for a control set with no emotion word."),
    corpus: List[Path] = typer.Option(..., "--corpus", "-c", help="Corpus file (repeatable): TinyStories text, "
                                      "plain text with blank-line paragraphs, or an Alpaca-style JSON list."),
    questions: Path = typer.Option(..., "--questions", "-q", help="Training questions: .txt (one a line), a table, "
                                   "or an Alpaca-style JSON (its short input-free instructions)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .jsonl (prompt, response, emotion, rate, source)."),
    exclude: Optional[Path] = typer.Option(None, "--exclude", help="Held-out questions never used as prompts "
                                           "(e.g. the evaluation questions)."),
    n: int = typer.Option(600, "--n", min=1, help="Rows at most."),
    min_rate: float = typer.Option(0.06, "--min-rate", help="Least share of target-emotion words per passage."),
    min_words: int = typer.Option(20, "--min-words", min=1),
    max_words: int = typer.Option(70, "--max-words", min=2),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build an alignment set offline: emotion-dense corpus passages chosen by the judge, each the answer to a
    neutral training question (reproducible from the same files and seed).

    Example: neuronscope data select -e sadness -c tinystories_sample.txt -q alpaca_data.json
    --exclude examples/questions.txt -o sad.jsonl
    """
    from ..errors import NeuronscopeError
    from ..irm.alignset import alpaca_questions, build_alignment_set
    from ..irm.synth import read_questions
    from ..store import write_text
    import json
    if out.suffix.lower() != ".jsonl":
        raise NeuronscopeError(f"The output must be a .jsonl file, got '{out.name}'.")
    if questions.suffix.lower() == ".json":
        qs = alpaca_questions(questions)
    else:
        qs = read_questions(questions)
    held = read_questions(exclude) if exclude else []
    rows = build_alignment_set(corpus, qs, emotion, n=n, exclude=held, seed=seed, min_rate=min_rate,
                               min_words=min_words, max_words=max_words)
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    console.print(f"{len(rows)} rows ({emotion}) in {out}; mean target rate "
                  f"{sum(r['rate'] for r in rows) / len(rows):.3f}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
