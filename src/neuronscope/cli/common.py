"""Options and helpers shared by the CLI's sub-commands (model loading, printing, errors)."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

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
                 device: Optional[str] = None, device_map: Optional[str] = None):
    from ..subject import Subject
    with err_console.status(f"Loading {model or 'the default model'}..."):
        return Subject.load(model, gguf_file=gguf_file, dtype=dtype, device=device, device_map=device_map)
