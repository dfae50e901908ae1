"""`neuronscope describe`: scored neuron descriptions into an atlas folder (show, filter and search them);
`neuronscope cluster`: named clusters of neurons."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import typer
from rich.markup import escape
from rich.table import Table

from ..specs import parse_neuron_refs
from .common import GgufOpt, console, load_subject

if TYPE_CHECKING:
    from ..describe import Descriptions
    from ..describe.records import Description

Ref = tuple[int, int] | tuple[int, int, str]

EmbedderOpt = typer.Option("default", "--embedder", help="Sentence embedder for the semantic index: a folder, a "
                           "hub id, 'default' (all-MiniLM-L6-v2 from `neuronscope models pull all-minilm-l6-v2`) "
                           "or 'none'.")


def _items(text: str) -> list[Ref]:
    return parse_neuron_refs(text)


def describe(
    atlas_dir: Path = typer.Argument(..., help="The atlas folder (with corpus statistics; decodes add 'promotes')."),
    explainer: Optional[str] = typer.Option(None, "--explainer", "-x", help="An explainer LLM: a local instruct "
                                            "model (folder, .gguf, hub id) or an OpenAI-compatible URL "
                                            "(llama.cpp server, vLLM, Ollama: see docs/describe.md)."),
    explainer_model: str = typer.Option("default", "--explainer-model", help="Model name sent to a URL explainer."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The studied model, for the real activations "
                                        "that scores need (default: the model the atlas names, when on disk)."),
    gguf_file: Optional[str] = GgufOpt,
    neurons: Optional[str] = typer.Option(None, "--neurons", help="Which neurons to describe: 3:17,5:100-120 "
                                          "(both polarities) or 3:17+ / 3:17- (default: all)."),
    candidates: int = typer.Option(3, "--candidates", min=1, help="Explainer candidates per neuron."),
    simulator: str = typer.Option("tokens", "--simulator", help="Simulator of explainer candidates: tokens or llm "
                                  "(the explainer predicts the firing tokens)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Pearson r from which a description can be "
                                    "interpretable (recorded in the manifest)."),
    detection_threshold: float = typer.Option(0.75, "--detection-threshold", help="Detection balanced accuracy from "
                                              "which a description can be interpretable (chance 0.5; recorded)."),
    outputs: str = typer.Option("auto", "--outputs", help="Which neurons get a measured output description (their "
                                "causal effect on the next token): auto (all when the estimate fits 30 min, else "
                                "every 8th neuron of each layer), all, or none. Any neuron on demand: --neurons "
                                "L:N --outputs all."),
    embedder: str = EmbedderOpt,
    show: Optional[str] = typer.Option(None, "--show", help="Only print stored descriptions of these neurons."),
    search: Optional[str] = typer.Option(None, "--search", "-s", help="Only search the stored descriptions' words "
                                         "(semantic search: `neuronscope atlas search`)."),
    interpretable: bool = typer.Option(False, "--interpretable", help="With --show/--search/--list: only "
                                       "interpretable descriptions."),
    list_: bool = typer.Option(False, "--list", help="Only print the stored descriptions (with -k, --layers, "
                               "--source, --min-score, --min-detection), best scores first."),
    layers: Optional[str] = typer.Option(None, "--layers", help="With --list: only these layers (0-3,8)."),
    source: Optional[str] = typer.Option(None, "--source", help="With --list: only descriptions kept from this kind: "
                                         "label, context, explainer, or output (those with a measured output "
                                         "description)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="With --list: Pearson r from this value."),
    min_detection: Optional[float] = typer.Option(None, "--min-detection", help="With --list: detection from this "
                                                  "value."),
    k: int = typer.Option(20, "-k", min=1, help="Rows printed with --search / --list."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Describe again neurons already described."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe every neuron and polarity: a token label (what fires it), a context description (what the text
    around its activations is about, from sentence embeddings; needs the embedder), and an output description (what
    its causal effect makes the model say); with --explainer, also LLM-written candidates. Every input-side kind is
    scored on the same held-out windows by Pearson r (simulated vs real activations) and detection (balanced
    accuracy of windows that fire vs not; a generic description scores 0.5); interpretable = both reach their
    thresholds; the best is kept with its source and every kind is stored (`atlas show` prints them all).

    Example: neuronscope describe atlas-smollm
             neuronscope describe atlas-smollm --neurons 20:1234 --outputs all
             neuronscope describe atlas-smollm --neurons 20:1234 --explainer http://localhost:8080/v1
             neuronscope describe atlas-smollm --list --interpretable --layers 10-20 --source context -k 50
    """
    from ..describe import Descriptions, describe_atlas
    from ..describe.records import DescriptionMatch
    rows: Sequence[Description | DescriptionMatch]
    if search is not None:
        rows = Descriptions.open(atlas_dir).search(search, k=k, interpretable=interpretable)
    elif show is not None or list_:
        D = Descriptions.open(atlas_dir)
        if list_:
            from ..refs import parse_index_set
            if source is not None and source not in ("label", "context", "explainer", "output"):
                from ..errors import NeuronscopeError
                raise NeuronscopeError(f"--source is label, context, explainer or output, got {source!r}.")
            rows = D.all(interpretable=interpretable, source=source, min_score=min_score,
                         min_detection=min_detection,
                         layers=None if layers is None else parse_index_set(layers, _n_layers(atlas_dir), what="layer"))
            rows = sorted(rows, key=lambda r: -((r.score or 0.0) + (r.detection or 0.5) - 0.5))[:k]
        else:
            assert show is not None
            rows = [r for r in _rows(D, _items(show)) if r.interpretable or not interpretable]
    else:
        subject = load_subject(model, gguf_file) if model else None
        items = _items(neurons) if neurons else None
        explainer_obj: object = explainer
        if explainer is not None and explainer.startswith("http"):
            from ..describe import OpenAIExplainer
            explainer_obj = OpenAIExplainer(explainer, model=explainer_model)
        D = describe_atlas(atlas_dir, explainer=explainer_obj, subject=subject, neurons=items,
                           n_candidates=candidates, simulator=simulator, threshold=threshold, embedder=embedder,
                           detection_threshold=detection_threshold, outputs=outputs, overwrite=overwrite,
                           progress=True)
        if items is None:
            from ..atlas.folder import AtlasFolder
            sec = AtlasFolder.open(atlas_dir).section("descriptions")
            s = sec.get("scores_all", {})
            o = sec.get("scores_output", {})
            console.print(f"described {sec['described']} neuron polarities in {escape(str(atlas_dir))}: median "
                          f"r {s.get('median')}, median detection {s.get('detection_median')}, "
                          f"{100 * s.get('share_interpretable', 0):.1f}% interpretable (r >= {sec['threshold']} and "
                          f"detection >= {sec.get('detection_threshold')}); output descriptions measured for "
                          f"{o.get('n', 0)}, {100 * o.get('share_interpretable', 0):.1f}% of them held on held-out "
                          f"prompts; {sec['seconds_last_run']['total']:.0f} s")
            return
        rows = _rows(D, items)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    table = Table("neuron", "pol", "r", "detection", "source", "description")
    for r in rows:
        d = r.description if isinstance(r, DescriptionMatch) else r
        table.add_row(f"{d.layer}:{d.neuron}", d.polarity,
                      "" if d.score is None else f"{d.score:.3f}" + ("" if d.interpretable else " ·"),
                      "" if d.detection is None else f"{d.detection:.2f}", d.source, escape(d.text))
    console.print(table)
    console.print("[dim]· below the interpretable threshold[/dim]")


def _n_layers(atlas_dir: Path) -> int:
    from ..atlas.folder import AtlasFolder
    return int(AtlasFolder.open(atlas_dir).section("model").get("n_layers") or 10**6)


def _rows(D: Descriptions, items: Sequence[Ref]) -> list[Description]:
    rows = []
    for it in items:
        for p in ([it[2]] if len(it) == 3 else ["pos", "neg"]):
            d = D.get(it[0], it[1], p)
            if d:
                rows.append(d)
    return rows


def cluster(
    atlas_dir: Path = typer.Argument(..., help="The atlas folder."),
    neurons: str = typer.Option(..., "--neurons", help="The neurons to group: 3:17+,4:5-,20:1234 (+ pos, - neg; "
                                "default pos)."),
    by: str = typer.Option("auto", "--by", help="meaning: by the topics their activation evidence reads and "
                           "writes, syntax/format groups apart (the Monitor's active concepts); description: by the "
                           "embeddings of their descriptions; auto: meaning where the atlas has statistics and "
                           "window embeddings."),
    threshold: float = typer.Option(0.6, "--threshold", help="With --by description: average-linkage cut on "
                                    "cosine distance."),
    min_size: int = typer.Option(3, "--min-size", min=1, help="Smallest cluster shown."),
    embedder: str = EmbedderOpt,
    explainer: Optional[str] = typer.Option(None, "--explainer", "-x", help="With --by description: an LLM to name "
                                            "the clusters (local model or OpenAI-compatible URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Group neurons into named concepts: by meaning (the topic most of what each writes, else reads, belongs to;
    syntax and format groups; docs/concepts.md) or by the embeddings of their descriptions (average linkage on
    cosine distance, cut 0.6). Each cluster prints a --steer form for `neuronscope generate`.

    Example: neuronscope cluster atlas-smollm --neurons 20:1234+,21:77+,25:3-
    """
    from ..concepts.evidence import has_concept_evidence
    from ..errors import NeuronscopeError
    if by not in ("auto", "meaning", "description"):
        raise NeuronscopeError(f"--by must be auto, meaning or description, got '{by}'.")
    items = [it if len(it) == 3 else (it[0], it[1], "pos") for it in _items(neurons)]
    emb = None if embedder == "default" else embedder
    if by == "meaning" or (by == "auto" and has_concept_evidence(atlas_dir) and explainer is None):
        from ..concepts.clusters import concept_clusters
        groups = concept_clusters(atlas_dir, items, min_size=min_size, embedder=emb)
    else:
        from ..concepts.by_description import cluster_neurons
        groups = cluster_neurons(atlas_dir, items, threshold=threshold, min_size=min_size, embedder=emb,
                                 explainer=explainer)
    if as_json:
        typer.echo(json.dumps([g.to_dict() for g in groups], indent=2))
        return
    if not groups:
        console.print(f"no cluster of {min_size} or more neurons")
        return
    table = Table("cluster", "kind", "size", "coherence", "members (--steer form)")
    for g in groups:
        table.add_row(escape(g.name), g.kind, str(g.size), f"{g.coherence:.2f}", g.steer)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("describe")(describe)
    app.command("cluster")(cluster)
