"""`neuronscope outliers MODEL`: the model's own outlier dimensions (massive activations, super-weight candidates,
norm gains, LM-head column norms), each with its multiple of the median."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_HELP, DeviceOpt, DtypeOpt, GgufOpt, console, load_subject


def outliers(
    model_arg: Optional[str] = typer.Argument(None, help=MODEL_HELP, show_default=False, metavar="[MODEL]"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model (same as the MODEL argument)."),
    texts_file: Optional[Path] = typer.Option(None, "--texts", help="Texts to measure activations on, one a line "
                                              "(default: a few varied built-in sentences)."),
    factor: float = typer.Option(10.0, "--factor", help="Massive = at least this multiple of the layer's median "
                                 "|activation|."),
    top_k: int = typer.Option(10, "--top-k", "-k", min=1, help="Dims per ranking."),
    early_layers: Optional[int] = typer.Option(None, "--early-layers", min=1, help="Layers searched for super "
                                               "weights (default: the first quarter, at least 2)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write outliers.json and outliers.md here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """The model's own outlier hidden dimensions, with values and multiples of the median.

    Example: neuronscope outliers ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf --factor 10
    """
    from ..errors import NeuronscopeError
    from ..outliers import model_outliers, render_outliers
    from ..store import write_json, write_text
    if model_arg and model and model_arg != model:
        raise NeuronscopeError("Give the model once: as MODEL or as --model, not two different ones.")
    texts = None
    if texts_file is not None:
        if not texts_file.is_file():
            raise NeuronscopeError(f"No texts file at '{texts_file}'.")
        texts = [l for l in texts_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    subject = load_subject(model_arg or model, gguf_file, dtype, device)
    rep = model_outliers(subject, texts, factor=factor, k=top_k, early_layers=early_layers)
    slim = rep.to_json()
    if out is not None:
        write_json(out / "outliers.json", slim)
        write_text(out / "outliers.md", render_outliers(rep))
    if as_json:
        typer.echo(json.dumps(slim, indent=2))
        return
    console.print(render_outliers(rep), markup=False)


def register(app: typer.Typer) -> None:
    app.command("outliers")(outliers)
