"""The `neuronscope` command: a thin layer over the library. Each sub-command module has `register(app)`."""
from __future__ import annotations

import importlib
import os
import sys

import typer

from ..errors import NeuronscopeError

app = typer.Typer(
    name="neuronscope",
    help="Look inside Llama-family language models one neuron at a time, and steer them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show [brackets] literally
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Sub-command modules, in the order they appear in --help.
COMMAND_MODULES = ("core", "atlas", "stats", "describe", "irm", "outliers", "data", "serve")


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # that front is not part of this build
            raise
        mod.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns a NeuronscopeError into one line on stderr and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=True)
    except NeuronscopeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
