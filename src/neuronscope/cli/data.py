"""`neuronscope data synth`: make an alignment dataset by having an instruct model answer questions in a tone."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

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


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
