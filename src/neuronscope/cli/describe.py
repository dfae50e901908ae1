"""`neuronscope describe`: neuron descriptions into an atlas folder (and search them); `neuronscope cluster`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..specs import parse_neuron_refs
from .common import GgufOpt, console, load_subject


def describe(
    atlas_dir: Path = typer.Argument(..., help="The atlas folder (with decodes and/or corpus statistics)."),
    explainer: Optional[str] = typer.Option(None, "--explainer", "-x", help="An explainer LLM: a local instruct "
                                            "model (folder, .gguf, hub id) or an OpenAI-compatible URL."),
    explainer_model: str = typer.Option("default", "--explainer-model", help="Model name sent to a URL explainer."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The studied model, to recompute per-token "
                                        "activations for highlighting and scoring (needed for scores)."),
    gguf_file: Optional[str] = GgufOpt,
    neurons: Optional[str] = typer.Option(None, "--neurons", help="Which neurons: 3:17,5:100-120 (both "
                                          "polarities) or 3:17+ / 3:17- (default: all)."),
    candidates: int = typer.Option(3, "--candidates", min=1, help="Explainer candidates per neuron."),
    simulator: str = typer.Option("auto", "--simulator", help="tokens, llm (the explainer) or auto."),
    search: Optional[str] = typer.Option(None, "--search", "-s", help="Only search the stored descriptions."),
    k: int = typer.Option(20, "-k", min=1, help="Results shown with --search."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Describe again neurons already described."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe neurons (per polarity) from their decoded tokens and exemplars; optionally with an explainer LLM
    whose candidates a simulator scores (Pearson correlation on held-out exemplars).

    Example: neuronscope describe atlas-smollm --neurons 20:1234 --explainer http://localhost:8000/v1 --model M
    Search:  neuronscope describe atlas-smollm --search "animals"
    """
    from ..describe import Descriptions, describe_atlas
    if search is not None:
        rows = Descriptions.open(atlas_dir).search(search, k=k)
    else:
        subject = load_subject(model, gguf_file) if model else None
        items = parse_neuron_refs(neurons) if neurons else None
        descs = describe_atlas(atlas_dir, explainer=explainer if explainer is None or not explainer.startswith(
            "http") else _url_explainer(explainer, explainer_model), subject=subject, neurons=items,
            n_candidates=candidates, simulator=simulator, overwrite=overwrite, progress=True)
        if items is None:
            console.print(f"described {Descriptions.count_rows(atlas_dir)} neuron polarities in {atlas_dir}")
            return
        rows = []
        for it in items:
            for p in ([it[2]] if len(it) == 3 else ["pos", "neg"]):
                d = descs.get(it[0], it[1], p)
                if d:
                    rows.append({"layer": it[0], "neuron": it[1], "polarity": p, "text": d["text"],
                                 "score": d["score"]})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("neuron", "pol", "score", "description")
    for r in rows:
        table.add_row(f"{r['layer']}:{r['neuron']}", r["polarity"],
                      "" if r["score"] is None else f"{r['score']:.3f}", r["text"])
    console.print(table)


def _url_explainer(url: str, model: str):
    from ..describe import OpenAIExplainer
    return OpenAIExplainer(url, model=model)


def cluster(
    atlas_dir: Path = typer.Argument(..., help="The atlas folder."),
    neurons: str = typer.Option(..., "--neurons", help="The neurons to group: 3:17+,4:5-,20:1234 (+ pos, - neg; "
                                "default pos)."),
    threshold: float = typer.Option(0.6, "--threshold", help="Average-linkage distance cut (1 - cosine)."),
    min_size: int = typer.Option(2, "--min-size", min=1, help="Smallest cluster shown."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Group neurons into concepts by their decoded token distributions (and description embeddings).

    Example: neuronscope cluster atlas-smollm --neurons 20:1234+,21:77+,25:3-
    """
    from ..describe import cluster_neurons
    items = [it if len(it) == 3 else (it[0], it[1], "pos") for it in parse_neuron_refs(neurons)]
    groups = cluster_neurons(atlas_dir, items, threshold=threshold, min_size=min_size)
    if as_json:
        typer.echo(json.dumps(groups, indent=2))
        return
    if not groups:
        console.print(f"no cluster of {min_size} or more neurons at distance < {threshold}")
        return
    table = Table("cluster", "members", "shared tokens")
    for g in groups:
        table.add_row(g["name"], " ".join(f"{l}:{n}{'+' if p == 'pos' else '-'}" for l, n, p in g["members"]),
                      ", ".join(repr(t) for t in g["tokens"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("describe")(describe)
    app.command("cluster")(cluster)
