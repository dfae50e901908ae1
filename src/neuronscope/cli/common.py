"""Options and helpers shared by the CLI's sub-commands (model loading, printing, errors)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from ..subject import Subject

console = Console()
err_console = Console(stderr=True)

MODEL_HELP = ("Model: a local folder, a .gguf file, or a Hugging Face hub id. Left out: the default model "
              "(SmolLM2-135M-Instruct; fetch it once with `neuronscope models pull`).")

ModelArg = typer.Argument(None, help=MODEL_HELP, show_default=False)
GgufOpt = typer.Option(None, "--gguf-file", help="GGUF file name inside the model folder.")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (best on CPUs), bfloat16 or float16.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps... (default: where the model loads).")
DeviceMapOpt = typer.Option(None, "--device-map", help="'auto' spreads a large model over several GPUs.")


def load_subject(model: Optional[str], gguf_file: Optional[str] = None, dtype: str = "float32",
                 device: Optional[str] = None, device_map: Optional[str] = None, *, chat: bool = False) -> Subject:
    """Load the model with a status line that says which step is running; chat: refuse a model without a chat
    template before its weights are read."""
    from ..subject import Subject
    with err_console.status(f"Loading {model or 'the default model'}...") as line:
        return Subject.load(model, gguf_file=gguf_file, dtype=dtype, device=device, device_map=device_map,
                            require_chat_template=chat, status=line.update)


def fmt_prob(p: float) -> str:
    """A probability or score for a table: 3 decimals, or 3 significant digits when that would show 0.000 (a
    262K-token vocabulary gives top probabilities around 5e-5)."""
    if p == 0 or abs(p) >= 0.001:
        return f"{p:.3f}"
    return f"{p:.2e}"
