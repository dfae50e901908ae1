"""`neuronscope atlas build|show|search|compare`: the neuron atlas from the command line (thin over
`neuronscope.atlas`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import NeuronscopeError
from ..refs import format_index_set
from .common import DeviceOpt, DtypeOpt, GgufOpt, ModelArg, console, err_console, fmt_prob, load_subject

if TYPE_CHECKING:
    from ..describe.records import Description

atlas_app = typer.Typer(help="Decode every MLP neuron through the LM head; show, search and compare atlases.",
                        no_args_is_help=True)


@atlas_app.command("build")
def build(
    model: Optional[str] = ModelArg,
    out: Path = typer.Option(..., "--out", "-o", help="Atlas folder to write (one per model)."),
    top_k: int = typer.Option(20, "--top-k", "-k", min=1, help="Tokens kept per neuron and site."),
    no_norm: bool = typer.Option(False, "--no-norm", help="Do not apply the final norm's gain before the LM head."),
    sites: Optional[str] = typer.Option(None, "--sites", help="Comma list of up, gate, down.pos, down.neg "
                                        "(default: all the model has)."),
    chunk: Optional[int] = typer.Option(None, "--chunk", min=1, help="Neurons per GEMM (bounds memory; default "
                                        "256 on a CPU, 2048 on a GPU)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Decode only these layers, e.g. 0-3,8 (default: "
                                         "all); the others are absent from the atlas."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an atlas built with other options (only "
                                   "neuronscope's own files: a folder it did not write is always refused)."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Decode every neuron's up/gate rows and down column through the LM head into an atlas folder.

    Interrupted builds resume per layer when run again. Example: neuronscope atlas build -o atlas-smollm
    """
    from ..atlas import build_atlas
    from ..interrupt import Interrupted
    subject = load_subject(model, gguf_file, dtype, device)
    try:
        atlas = build_atlas(subject, out, top_k=top_k, apply_norm=not no_norm, sites=sites, chunk=chunk,
                            progress=not quiet, overwrite=overwrite, device=device, layers=layers)
    except Interrupted as exc:              # Ctrl-C: the finished layers are saved; say so and how to resume
        typer.echo(str(exc), err=True)
        raise typer.Exit(exc.exit_code) from None
    secs = atlas.manifest["atlas"].get("build_seconds_last_run")
    built = "" if len(atlas.layers) == atlas.n_layers else f" (built: layers {format_index_set(atlas.layers)})"
    console.print(f"atlas of {escape(atlas.model_name)}: {atlas.n_layers} layers{built} x {atlas.n_neurons} neurons, "
                  f"sites {', '.join(atlas.sites)}, top {atlas.top_k} -> {escape(str(atlas.folder))}"
                  + (f" ({secs:.1f} s)" if secs is not None else ""))


def _parse_neuron(text: str) -> tuple[int, int]:
    from ..errors import NeuronscopeError
    from ..specs import parse_neuron_refs
    try:
        refs = parse_neuron_refs(text)
    except NeuronscopeError:
        refs = []
    if len(refs) != 1 or len(refs[0]) != 2:
        raise NeuronscopeError(f"Cannot read the neuron '{text}'; write LAYER:NEURON, like 20:1234.")
    return refs[0]


@atlas_app.command("show")
def show(
    atlas_dir: Path = typer.Argument(..., help="Atlas folder."),
    neuron: str = typer.Argument(..., help="LAYER:NEURON, like 20:1234."),
    k: int = typer.Option(10, "--k", "-k", min=1, help="Tokens shown per site."),
    exemplars: int = typer.Option(5, "--exemplars", "-e", min=0, help="Top and bottom exemplars shown (needs stats)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one neuron's decoded tokens per site (and its corpus exemplars when the atlas has stats).

    Example: neuronscope atlas show atlas-smollm 20:1234
    """
    from ..atlas import Atlas
    atlas = Atlas.open(atlas_dir)
    layer, i = _parse_neuron(neuron)
    dec = atlas.neuron(layer, i)
    descs, note = _descriptions(atlas_dir, layer, i)
    if as_json:
        decodes = {s: [d.to_json() for d in v[:k]] for s, v in dec.items()}
        typer.echo(json.dumps({"layer": layer, "neuron": i, "decodes": decodes,
                               "descriptions": {p: d.to_json() for p, d in descs.items()},
                               "descriptions_note": note}, indent=2))
        return
    console.print(f"[bold]neuron {layer}:{i}[/bold] of {escape(atlas.model_name)}"
                  f" (final norm gain {'applied' if atlas.apply_norm else 'not applied'})")
    _print_descriptions(descs, note)
    table = Table(*(f"{s}" for s in dec), title="top tokens (probability)", title_justify="left")
    for r in range(min(k, atlas.top_k)):
        table.add_row(*(f"{escape(repr(dec[s][r].token))} {fmt_prob(dec[s][r].prob)}" for s in dec))
    console.print(table)
    if exemplars:
        _show_exemplars(atlas_dir, layer, i, exemplars)


def _descriptions(atlas_dir: Path, layer: int, i: int) -> tuple[dict[str, Description], str | None]:
    """{polarity: stored description with every candidate} of one neuron, or ({}, why there are none)."""
    from ..describe import Descriptions
    from ..errors import NeuronscopeError
    try:
        D = Descriptions.open(atlas_dir)
    except NeuronscopeError as exc:
        return {}, str(exc)
    out = {p: D.get(layer, i, p, candidates=True) for p in ("pos", "neg")}
    return {p: d for p, d in out.items() if d is not None}, None


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _print_descriptions(descs: dict[str, Description], note: str | None) -> None:
    if note:
        console.print(f"[dim]no descriptions: {escape(note)}[/dim]")
        return
    for pol, d in descs.items():
        mark = "interpretable" if d.interpretable else "not interpretable"
        console.print(f"[bold]{pol}[/bold] ({escape(d.source)}, r {_fmt(d.score)}, detection "
                      f"{_fmt(d.detection)}, {mark}): {escape(d.text)}")
        table = Table("kind", "description", "r", "detection", "output", "effect (nats)", title_justify="left")
        for c in d.candidates or []:
            table.add_row(escape(c.source), escape(c.text), _fmt(c.score), _fmt(c.detection),
                          _fmt(c.output_score), _fmt(c.effect, "+.2f"))
        console.print(table)


def _show_exemplars(atlas_dir: Path, layer: int, i: int, n: int) -> None:
    from ..atlas.folder import AtlasFolder
    from ..errors import NeuronscopeError
    try:
        from ..parts import open_stats
        stats = open_stats(AtlasFolder.open(atlas_dir))
    except ImportError:
        console.print("[dim]no exemplars: the stats package is not available in this build.[/dim]")
        return
    except NeuronscopeError as exc:
        console.print(f"[dim]no exemplars: {escape(str(exc))}[/dim]")
        return
    # the normalisation levels and divisors have one home (stats/levels.py, through NeuronStats)
    (lv_hi, lv_lo), (div_hi, div_lo) = stats.norm_levels(), stats.norm_scale([layer])
    for pol, level, q, title in (("pos", lv_hi, float(div_hi[0, i]), "top"),
                                 ("neg", lv_lo, float(div_lo[0, i]), "bottom")):
        rows = stats.exemplars(layer, i, polarity=pol, n=n)
        table = Table("norm. act", "window (firing token in [ ])", title=f"{title} exemplars (act / |q({level:g})|)",
                      title_justify="left")
        for ex in rows:
            p = ex.position
            toks = ex.tokens
            lo = max(0, p - 12)
            text = "".join(escape(t) for t in toks[lo:p]) + f"[bold red]\\[{escape(toks[p])}][/bold red]" + \
                "".join(escape(t) for t in toks[p + 1:p + 5])
            table.add_row(f"{ex.activation / q:+.2f}", text.replace("\n", "⏎"))
        console.print(table)


@atlas_app.command("search")
def search(
    atlas_dir: Path = typer.Argument(..., help="Atlas folder."),
    query: str = typer.Argument(..., help="A concept: a word or phrase (\"animals\", \"family relatives\")."),
    side: str = typer.Option("both", "--side", help="reads: neurons that fire on the concept's words or in text "
                             "about it; writes: neurons whose write vector or measured output effect promotes its "
                             "words; both: each neuron on its better side; description: the older ranking by "
                             "the embedding of the descriptions alone."),
    k: int = typer.Option(20, "--k", "-k", min=1, help="Neurons listed."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Only these layers: 20-29 or 3,5,7."),
    sites: Optional[str] = typer.Option(None, "--sites", help="With --tokens-only: comma list of sites to search."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With --side description or --tokens-only: "
                                        "adds the cosine of each neuron's write vector with the concept's "
                                        "unembedding rows (default: the model recorded in the atlas, when on disk)."),
    no_model: bool = typer.Option(False, "--no-model", help="Leave the model side out (no model load)."),
    embedder: str = typer.Option("default", "--embedder", help="Sentence embedder: a folder, a hub id, 'default' "
                                 "(all-MiniLM-L6-v2, `neuronscope models pull all-minilm-l6-v2`) or 'none' "
                                 "(= --tokens-only)."),
    interpretable: bool = typer.Option(False, "--interpretable", help="With --side description: only neurons "
                                       "whose description is interpretable."),
    tokens_only: bool = typer.Option(False, "--tokens-only", help="Rank by decoded tokens only (no embedder, no "
                                     "model load)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Find the neurons of a concept and say which side they are on: `reads` (they fire on its words or in text
    about it, from the statistics' strongest activations) or `writes` (their write vector or measured output effect
    promotes its words), with the evidence. Needs statistics and `neuronscope describe` (its window embeddings);
    the first search of a folder builds its concept evidence (about a minute on SmolLM2).

    Examples: neuronscope atlas search atlas-smollm "family relatives"
              neuronscope atlas search atlas-smollm "months of the year" --side writes --json
    """
    if side not in ("reads", "writes", "both", "description"):
        raise NeuronscopeError(f"--side must be reads, writes, both or description, got '{side}'.")
    from ..concepts.evidence import has_concept_evidence
    if tokens_only or embedder.lower() == "none" or side == "description" or not has_concept_evidence(atlas_dir):
        if not (tokens_only or embedder.lower() == "none" or side == "description"):
            err_console.print(f"[yellow]'{escape(str(atlas_dir))}' has no statistics with window embeddings "
                              "(`neuronscope stats`, then `neuronscope describe`): neurons by description / decoded "
                              "tokens, without sides.[/yellow]", highlight=False)
        _search_by_description(atlas_dir, query, k, sites, model, no_model, embedder, interpretable, tokens_only,
                               as_json)
        return
    from ..atlas.folder import AtlasFolder
    from ..concepts.search import concept_search
    from ..refs import parse_index_set
    n_layers = int(AtlasFolder.open(atlas_dir).section("model").get("n_layers") or 10**6)
    res = concept_search(atlas_dir, query, side=side, k=k, embedder=None if embedder == "default" else embedder,
                         layers=None if layers is None else parse_index_set(layers, n_layers, what="layer"))
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    sup = res.support
    console.print(f"[bold]{escape(res.query)}[/bold]: {sup.n_words} concept words in the corpus "
                  f"({escape(', '.join(sup.words[:8]))}), {sup.n_windows} windows about it; "
                  f"{res.seconds * 1000:.0f} ms")
    table = Table("neuron", "side", "score", "reads", "writes", "sep.", "evidence", "description",
                  title=f"neurons for {query!r} ({side})", title_justify="left")
    for h in res.hits:
        ev = ("reads " + ", ".join(h.read_words) if h.side == "reads" else
              ("says " if h.measured else "promotes ") + ", ".join(h.write_words))
        table.add_row(h.ref, h.side, f"{h.score:.2f}", f"{h.reads:.2f}", f"{h.writes:.2f}", f"{h.separation:.1f}x",
                      escape(ev), escape((h.description or "")[:70]))
    console.print(table)


def _search_by_description(atlas_dir: Path, query: str, k: int, sites: Optional[str], model: Optional[str],
                           no_model: bool, embedder: str, interpretable: bool, tokens_only: bool,
                           as_json: bool) -> None:
    """The older searches: by the embedding of the descriptions, or by decoded tokens only."""
    from ..atlas import Atlas
    from ..concepts.semantic import semantic_search
    from ..describe.index import load_index
    from ..atlas.folder import AtlasFolder
    model_note = ""
    no_model = no_model or tokens_only
    if model is None and not no_model:
        found = AtlasFolder.open(atlas_dir).model_path()
        if found is not None:
            model = str(found)
        else:
            model_note = "; without the model side: the atlas's model is not on disk, pass --model"
    subject = load_subject(model) if model and not no_model else None
    no_index = not (tokens_only or embedder.lower() == "none") and load_index(atlas_dir) is None
    cols: list[tuple[str, str]]
    rows: list[dict[str, Any]]
    if tokens_only or embedder.lower() == "none" or no_index:
        atlas = Atlas.open(atlas_dir)
        rows = [r.to_json() for r in atlas.search(query, k=k, sites=sites, subject=subject)]
        title = f"neurons for {query!r} (decoded tokens only" + (
            "; run `neuronscope describe` for search by meaning" if no_index else "") + model_note + ")"
        cols = [("site", "site"), ("score", "score")]
    else:
        rows = [h.to_json() for h in semantic_search(atlas_dir, query, k=k, interpretable=interpretable,
                                                     embedder=None if embedder == "default" else embedder,
                                                     subject=subject)]
        title = f"neurons for {query!r} by description" + (" (interpretable only)" if interpretable else "") + (
            f" ({model_note[2:]})" if model_note else "")
        cols = [("pol", "polarity"), ("score", "score"), ("sim", "similarity"), ("desc. score", "desc_score")]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("layer", "neuron", *(c for c, _ in cols), "description / top tokens", title=title,
                  title_justify="left")
    for r in rows:
        vals = [r.get(key) for _, key in cols]
        text = r.get("description") or " | ".join(repr(t) for t in r["tokens"])
        table.add_row(str(r["layer"]), str(r["neuron"]),
                      *("" if v is None else (fmt_prob(v) if isinstance(v, float) else str(v)) for v in vals),
                      escape(text))
    console.print(table)


@atlas_app.command("compare")
def compare(
    atlas_a: Path = typer.Argument(..., help="Atlas folder of model A (e.g. the base model)."),
    atlas_b: Path = typer.Argument(..., help="Atlas folder of model B (e.g. the instruct model)."),
    site: str = typer.Option("up", "--site", help="Site compared (up: Davies 2025)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for compare.json and agreement.png "
                                       "(default: ATLAS_B/compare-<name of A>)."),
    n_changed: int = typer.Option(10, "--changed", min=0, help="Most-changed neurons listed."),
) -> None:
    """Share of neurons whose top-1 token agrees between two atlases (per layer and overall), mean top-k overlap,
    the most changed neurons, a PNG plot and a JSON summary.

    Example: neuronscope atlas compare atlas-smollm-base atlas-smollm-instruct -o cmp
    """
    from ..atlas import compare_atlases
    out = out or Path(atlas_b) / f"compare-{Path(atlas_a).name}"
    s = compare_atlases(atlas_a, atlas_b, site=site, out_dir=out, n_changed=n_changed)
    table = Table("layer", "top-1 agree", f"top-{s.top_k} overlap", title=f"{site}: A={escape(s.a.model)} "
                  f"B={escape(s.b.model)}", title_justify="left")
    for r in s.per_layer:
        table.add_row(str(r.layer), f"{100 * r.top1_agreement:.1f}%", f"{100 * r.topk_overlap:.1f}%")
    table.add_row("all", f"{100 * s.top1_agreement:.1f}%", f"{100 * s.topk_overlap:.1f}%", style="bold")
    console.print(table)
    if s.changed_most:
        ch = Table("neuron", "overlap", "A tokens", "B tokens", title="changed most", title_justify="left")
        for c in s.changed_most:
            ch.add_row(f"{c.layer}:{c.neuron}", f"{100 * c.topk_overlap:.0f}%",
                       escape(" | ".join(c.tokens_a)), escape(" | ".join(c.tokens_b)))
        console.print(ch)
    console.print(f"summary: {escape(str(Path(out) / 'compare.json'))}  plot: {escape(s.plot or '')}")


def register(app: typer.Typer) -> None:
    app.add_typer(atlas_app, name="atlas")
