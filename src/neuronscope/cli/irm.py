"""`neuronscope irm train | generate | eval | analyze`: the Injectable Realignment Model from the command line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.table import Table

from ..irm import recipe
from ..irm.sweep import DEFAULT_SETS
from .common import MODEL_HELP, DeviceOpt, DtypeOpt, GgufOpt, console, load_subject

if TYPE_CHECKING:
    from ..irm.model import IRM
    from ..subject import Subject

irm_app = typer.Typer(help="Injectable Realignment Model: train on a frozen LLM, generate, evaluate, analyse.",
                      no_args_is_help=True)
RunArg = typer.Argument(..., help="A run folder made by `neuronscope irm train`.")
ModelOpt = typer.Option(None, "--model", "-m", help="Model to load instead of the one the run names.")


def _run_subject(run_dir: Path, model: Optional[str], gguf_file: Optional[str], dtype: str,
                 device: Optional[str]) -> tuple[IRM, dict[str, Any], Subject]:
    """The run's best IRM, its run.json and the model it was trained on (or `model`), checked to match."""
    from ..irm.training import load_run
    irm, run = load_run(run_dir)
    subject = load_subject(model or run["model"], gguf_file, dtype, device)
    irm.check_subject(subject, strict=True)
    return irm.to(subject.device), run, subject


@irm_app.command("train")
def train(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", "-d", help="CSV, JSONL or Parquet with a text column or "
                              "prompt and response columns (the recipe: `data select --mode frame` rows)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (checkpoints, config, best IRM); "
                                       "default runs/ALIGNMENT."),
    layers: str = typer.Option(recipe.LAYERS, "--layers", "-l", help="Injected layers: all, 0-7, 3,7,11 ..."),
    read_layer: int = typer.Option(0, "--read-layer", help="Layer whose residual the IRM reads."),
    read_site: str = typer.Option("resid.mid", "--read-site", help="resid.mid (after attention) or resid.post."),
    inject_site: str = typer.Option("resid.mid", "--inject-site", help="resid.mid (mid-block, as in the paper) "
                                    "or resid.post (block output)."),
    width: int = typer.Option(recipe.WIDTH, "--width", min=1, help="Hidden width of the IRM's MLP."),
    depth: int = typer.Option(recipe.DEPTH, "--depth", min=0, help="Hidden layers of the IRM's MLP."),
    steps: int = typer.Option(recipe.TRAIN.steps, "--steps", min=1, help="Optimisation steps."),
    batch_size: int = typer.Option(recipe.TRAIN.batch_size, "--batch-size", "-b", min=1),
    lr: float = typer.Option(recipe.TRAIN.lr, "--lr", help="Adam learning rate."),
    l1: float = typer.Option(0.0, "--l1", help="L1 penalty on the IRM's outputs."),
    kl: float = typer.Option(0.0, "--kl", help="Anchor: weight of KL(frozen || IRM-on) on the target tokens "
                             "(keeps the model's own next-token distribution; one more forward a step)."),
    max_len: int = typer.Option(recipe.TRAIN.max_len, "--max-len", min=2, help="Tokens per example (longer ones "
                                "are cut)."),
    val_fraction: float = typer.Option(recipe.TRAIN.val_fraction, "--val-fraction", help="Held-out share of the "
                                       "rows (seeded split)."),
    eval_every: int = typer.Option(recipe.TRAIN.eval_every, "--eval-every", min=1, help="Validate and checkpoint "
                                   "every N steps."),
    patience: int = typer.Option(recipe.TRAIN.patience, "--patience", min=0, help="Stop after N validations "
                                 "without improvement (0: never)."),
    seed: int = typer.Option(0, "--seed"),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap prompts in the model's chat template "
                                        "(default: as the rows were built (their `chat` field), else when the "
                                        "model has a template)."),
    alignment: Optional[str] = typer.Option(None, "--alignment", help="Name of the alignment (default: data "
                                            "file name); an emotion the judge knows makes it `irm eval`'s target."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Train an IRM on a frozen model (only the IRM's weights learn).

    The defaults are the realigning recipe of examples/irm-smollm-sad.sh (all layers, width 256, 60 steps of 4 rows,
    lr 1e-3, 192 tokens, validation every 10 steps, patience 3, chat as the rows were built; docs/irm.md), so
    `irm train -m MODEL --data sad-frame.jsonl --alignment sadness` reproduces it; judge it with
    `irm eval RUN --judge builtin -q examples/questions.txt --scale 0.7`.

    Example: neuronscope irm train -m SmolLM2.gguf --data sad-frame.jsonl --alignment sadness -o runs/sad
    """
    from ..interrupt import Interrupted
    from ..irm.data import read_table
    from ..irm.training import TrainConfig, train_irm
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, l1=l1, kl=kl, max_len=max_len,
                      val_fraction=val_fraction, eval_every=eval_every, patience=patience, seed=seed).validate()
    rows = read_table(data)
    subject = load_subject(model, gguf_file, dtype, device)
    cfg.chat = recipe.resolve_chat(rows, subject) if chat is None else chat
    out = out or Path("runs") / (alignment or data.stem)
    try:
        res = train_irm(subject, data, out, inject_layers=layers, read_layer=read_layer, read_site=read_site,
                        inject_site=inject_site, width=width, depth=depth, config=cfg, resume=resume,
                        alignment=alignment)
    except Interrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(exc.exit_code) from None
    first = next((h.get("val_loss") for h in res.history if "val_loss" in h), None)
    console.print(f"{res.step} steps in {res.seconds:.0f} s{' (stopped early)' if res.stopped_early else ''}; "
                  f"IRM {res.irm.n_parameters():,} parameters; validation loss {_loss(first)} -> "
                  f"{_loss(res.best_val)} (best at step {res.best_step}); chat {cfg.chat}; saved in {out}")


def _loss(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


@irm_app.command("generate")
def generate(
    run_dir: Path = RunArg,
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Chat template (default: as in training)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1, max=4096),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    seed: int = typer.Option(0, "--seed"),
    scale: float = typer.Option(1.0, "--scale", help="Multiply the IRM's output (0 = off, 2 = twice)."),
    model: Optional[str] = ModelOpt,
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """The same prompts with the IRM off and on, side by side.

    Example: neuronscope irm generate runs/anger -p "How do I make tea?"
    """
    from ..irm.generation import generate_side_by_side
    irm, run, subject = _run_subject(run_dir, model, gguf_file, dtype, device)
    use_chat = run["train"].get("chat", False) if chat is None else chat
    rows = generate_side_by_side(subject, irm, prompt, chat=use_chat, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, scale=scale)
    table = Table("prompt", "IRM off", "IRM on", show_lines=True)
    for r in rows:
        table.add_row(r.prompt, r.off, r.on)
    console.print(table)


@irm_app.command("eval")
def evaluate(
    run_dir: Path = RunArg,
    judge: Optional[str] = typer.Option(None, "--judge", help="Judge generated answers: builtin (own emotion "
                                        "lexicon + VADER) or nrc (NRC lexicon via the optional nrclex, research "
                                        "use only). Without it: loss-based evaluation."),
    questions: Optional[Path] = typer.Option(None, "--questions", "-q", help="Held-out neutral questions (one a "
                                             "line), for --judge; e.g. examples/questions.txt."),
    limit: int = typer.Option(40, "--limit", min=2, help="Judge at most N questions."),
    target: Optional[str] = typer.Option(None, "--target", help="Target emotion (default: the run's alignment "
                                         "when the judge knows it)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1, max=4096),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; sampling uses the same seeds "
                                      "with the IRM off and on."),
    seed: int = typer.Option(0, "--seed"),
    scale: float = typer.Option(1.0, "--scale", help="Multiply the IRM's output (the recipe's dose is 0.7)."),
    facts: bool = typer.Option(True, "--facts/--no-facts", help="With --judge: also the factual accuracy on the "
                               "built-in 40 short-answer questions, IRM off vs on."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Aligned rows (default: the run's held-out "
                                        "validation rows)."),
    neutral: Optional[Path] = typer.Option(None, "--neutral", help="Neutral text: .txt (blank-line paragraphs) "
                                           "or a table with a text column."),
    neutral_limit: int = typer.Option(64, "--neutral-limit", min=1, help="Use at most N neutral paragraphs."),
    max_len: Optional[int] = typer.Option(None, "--max-len", min=2, help="Tokens per example (default: as trained)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    model: Optional[str] = ModelOpt,
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Evaluate a run: judged answers to held-out questions (--judge, saved as judged.json in the run), or held-out
    loss with the IRM off vs on on aligned and neutral text (saved as eval.json).

    --judge reports, IRM off vs on (paired): emotion rates, sentiment, repetition, the answers' perplexity under the
    frozen model, factual accuracy on 40 built-in short-answer questions (--no-facts skips it) and the share of
    answers that open with the same sentence as another (memorised frames); with a target, the verdict.

    Example: neuronscope irm eval runs/sad --judge builtin --questions examples/questions.txt --target sadness
    """
    if judge is not None:
        _eval_judged(run_dir, judge, questions, limit, target, max_new_tokens, temperature, seed, scale, batch_size,
                     facts, as_json, (model, gguf_file, dtype, device))
        return
    from ..irm.data import read_table, read_texts
    from ..irm.evaluation import evaluate_irm, held_out_rows
    from ..store import write_json
    irm, run, subject = _run_subject(run_dir, model, gguf_file, dtype, device)
    rows = read_table(data) if data else held_out_rows(run, run_dir)
    texts = read_texts(neutral)[:neutral_limit] if neutral else None
    ev = evaluate_irm(subject, irm, rows, neutral_texts=texts, chat=run["train"].get("chat", False),
                      max_len=max_len or run["train"].get("max_len", 256), batch_size=batch_size)
    ev.data = str(data) if data else "held-out validation rows"
    ev.neutral_source = str(neutral) if neutral else None
    rep = ev.to_json()
    write_json(Path(run_dir) / "eval.json", rep)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    table = Table("text", "loss IRM off", "loss IRM on", "delta", "ppl off", "ppl on", "tokens")
    for k in ("aligned", "neutral"):
        if k in rep:
            r = rep[k]
            table.add_row(k, f"{r['off']:.4f}", f"{r['on']:.4f}", f"{r['delta']:+.4f}", f"{r['ppl_off']:.2f}",
                          f"{r['ppl_on']:.2f}", str(r["tokens"]))
    console.print(table)


def _held_out_questions(run_dir: Path, run: dict[str, Any], questions: Optional[Path], limit: int) -> list[str]:
    """The judged questions: those of the file the run was not trained on, at most `limit`."""
    from ..errors import NeuronscopeError
    from ..irm.evaluation import drop_training_prompts
    from ..irm.synth import read_questions
    if questions is None:
        raise NeuronscopeError("--judge needs --questions: held-out neutral questions, one a line.")
    qs, dropped = drop_training_prompts(run, run_dir, read_questions(questions))
    if dropped:
        typer.echo(f"left out {dropped} question(s) the run was trained on; judging held-out ones only", err=True)
    if len(qs) < 2:
        raise NeuronscopeError(f"Fewer than two of the questions in {questions} are held out (the run was trained "
                               "on the others); give questions it has not seen.")
    return qs[:limit]


def _eval_judged(run_dir: Path, judge: str, questions: Optional[Path], limit: int, target: Optional[str],
                 max_new_tokens: int, temperature: float, seed: int, scale: float, batch_size: int, facts: bool,
                 as_json: bool, load: tuple[Optional[str], Optional[str], str, Optional[str]]) -> None:
    """irm eval --judge: judged answers, factual accuracy and memorised frames, saved as RUN/judged.json."""
    from ..irm.evaluation import judge_irm
    from ..irm.factual import FACTS
    from ..irm.judge import Judge
    from ..store import write_json
    j = Judge(judge)
    irm, run, subject = _run_subject(run_dir, *load)
    qs = _held_out_questions(run_dir, run, questions, limit)
    tgt = target or (run["data"].get("alignment") if run["data"].get("alignment") in j.emotions else None)
    judged = judge_irm(subject, irm, qs, judge=j, target=tgt, chat=run["train"].get("chat", False),
                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, scale=scale,
                       batch_size=batch_size, facts=FACTS if facts else None)
    judged.questions = str(questions)
    rep = judged.to_json()
    write_json(Path(run_dir) / "judged.json", rep)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    print_judged(rep, Path(run_dir) / "judged.json")


def print_judged(rep: dict[str, Any], path: Path) -> None:
    """The judged evaluation as tables and sentences."""
    table = Table("measure", "IRM off", "IRM on", "on - off [95% CI]", "p")
    for k, m in rep["metrics"].items():
        table.add_row(k, f"{m['off']:.4f}", f"{m['on']:.4f}",
                      f"{m['diff']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]", f"{m['p_value']:.2g}")
    f = rep.get("factual")
    if f:
        table.add_row("factual accuracy", f"{f['accuracy_off']:.3f}", f"{f['accuracy_on']:.3f}",
                      f"{f['diff']:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]", f"{f['p_value']:.2g}")
    o = rep["openings"]
    table.add_row("same opening sentence", f"{o['off']['share']:.3f}", f"{o['on']['share']:.3f}", "", "")
    console.print(table)
    if f and f["lost"]:
        console.print(f"facts lost with the IRM on ({len(f['lost'])}/{f['n']}): " + "; ".join(f["lost"][:5]),
                      markup=False)
    if o["on"]["most_common_count"] > 1:
        console.print(f"most common opening with the IRM on ({o['on']['most_common_count']}/{o['on']['n']}): "
                      f"{o['on']['most_common']!r}", markup=False)
    if "verdict" in rep:
        v = rep["verdict"]
        console.print(f"{rep['target']}: x{v['target_ratio']:.2f} (p {v['target_p']:.2g}); criteria "
                      f"({v['criteria']}): {'PASSED' if v['passed'] else 'not met'}")
    console.print(f"judge: {rep['judge']['name']} (vaderSentiment {rep['judge']['vaderSentiment']}); "
                  f"answers in {path}")


@irm_app.command("analyze")
def analyze(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run folders (same model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (report.md, PNGs, analysis.json)."),
    controls: List[Path] = typer.Option([], "--control", "-c", help="A control run (trained the same way on "
                                        "shuffled or neutral text; repeatable): the trained-injection null."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="Prompts, one a line (default: held-out "
                                                "validation prompts of the runs, never training rows)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=0, max=1024, help="Tokens of the frozen "
                                       "model's continuation added to each prompt."),
    top_k: int = typer.Option(10, "--top-k", min=1, help="Top hidden indices per run."),
    n_random: int = typer.Option(20, "--random", min=0, help="Random-init IRMs per run (null)."),
    n_permutations: int = typer.Option(1000, "--permutations", min=10, help="Within-layer permutations (null)."),
    factor: float = typer.Option(10.0, "--factor", help="Massive activation = this multiple of the median."),
    model: Optional[str] = ModelOpt,
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Heat-maps, striation, top indices, recurrence and outlier coincidences, each against chance.

    Example: neuronscope irm analyze runs/anger runs/sad -c runs/control -o report/
    """
    from ..errors import NeuronscopeError
    from ..irm.analysis import analyze_runs
    from ..irm.training import load_run
    prompts = None
    if prompts_file:
        if not prompts_file.is_file():
            raise NeuronscopeError(f"No prompts file at '{prompts_file}'.")
        prompts = [l.strip() for l in prompts_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    _, run = load_run(run_dirs[0])
    subject = load_subject(model or run["model"], gguf_file, dtype, device)
    res = analyze_runs(run_dirs, out, subject=subject, prompts=prompts, max_new_tokens=max_new_tokens, top_k=top_k,
                       controls=controls, n_random=n_random, n_permutations=n_permutations, factor=factor)
    for line in res.findings:
        console.print(line, markup=False)
    console.print(f"report: {Path(out) / 'report.md'}")


@irm_app.command("sweep")
def sweep(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    align: List[str] = typer.Option(..., "--align", "-a", help="NAME=DATA: an alignment and its data file "
                                    "(repeatable), e.g. sadness=sad-frame.jsonl; NAME is the judge's target."),
    control: Path = typer.Option(..., "--control", help="Matched control data, built like the aligned data with "
                                 "neutral sentences (`data select --mode frame -e neutral`): one control run per "
                                 "layer set and seed."),
    questions: Path = typer.Option(..., "--questions", "-q", help="Held-out questions every aligned run is judged "
                                   "on (one a line), e.g. examples/questions.txt."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder (runs/, sweep.json, report/)."),
    sets: str = typer.Option(",".join(DEFAULT_SETS), "--sets", help="Layer sets: q1..q4 (quarters of depth), "
                             "every4 (every depth/8-th layer), all; on SmolLM2's 30 layers q2 = 8-14, q4 = 22-29."),
    seeds: str = typer.Option("0,1", "--seeds", help="Seeds, comma-separated."),
    scale: float = typer.Option(recipe.EVAL_SCALE, "--scale", help="The dose every aligned run is judged at."),
    limit: int = typer.Option(recipe.EVAL_LIMIT, "--limit", min=2, help="Judge at most N questions."),
    judge_tokens: int = typer.Option(recipe.EVAL_MAX_NEW_TOKENS, "--judge-tokens", min=1, help="New tokens per "
                                     "judged answer."),
    facts: bool = typer.Option(True, "--facts/--no-facts", help="Factual accuracy in every judgement."),
    width: int = typer.Option(recipe.WIDTH, "--width", min=1),
    depth: int = typer.Option(recipe.DEPTH, "--depth", min=0),
    steps: int = typer.Option(recipe.TRAIN.steps, "--steps", min=1),
    batch_size: int = typer.Option(recipe.TRAIN.batch_size, "--batch-size", "-b", min=1),
    lr: float = typer.Option(recipe.TRAIN.lr, "--lr"),
    max_len: int = typer.Option(recipe.TRAIN.max_len, "--max-len", min=2),
    val_fraction: float = typer.Option(recipe.TRAIN.val_fraction, "--val-fraction"),
    eval_every: int = typer.Option(recipe.TRAIN.eval_every, "--eval-every", min=1),
    patience: int = typer.Option(recipe.TRAIN.patience, "--patience", min=0),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Chat template on the prompts (default: as "
                                        "the rows were built, else when the model has one)."),
    top_k: int = typer.Option(10, "--top-k", min=1),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", min=0, help="Analysis: tokens of the frozen "
                                       "model's continuation after each prompt."),
    known_dims: str = typer.Option("", "--known-dims", help="Hidden dims to test the significant indices against, "
                                   "besides the model's measured massive dims (e.g. 1415,2533,1512 for Llama-2-7B)."),
    analyze: bool = typer.Option(True, "--analyze/--no-analyze", help="Analyse at the end; --no-analyze only trains "
                                 "and judges (a process working on part of the grid, e.g. one seed, while another "
                                 "takes the rest; a last call over the whole grid analyses)."),
    gguf_file: Optional[str] = GgufOpt,
    dtype: str = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Train the grid layer sets x alignments x seeds with the realigning recipe (the `irm train` defaults) and a
    matched control per layer set and seed, judge every aligned run off vs on (as `irm eval --judge builtin`, at
    --scale), then analyse only the runs that pass, paired with their controls (resumable: run it again to continue).

    Example: neuronscope irm sweep -m SmolLM2.gguf -a sadness=sad-frame.jsonl -a anger=anger-frame.jsonl
    -a joy=joy-frame.jsonl --control neutral-frame.jsonl -q examples/questions.txt -o sweeps/smollm

    In parallel (each run's verdict is kept in its folder): the same command with --seeds 0 --no-analyze and with
    --seeds 1 --no-analyze at once, one thread each (OMP_NUM_THREADS=1), then once with --seeds 0,1.
    """
    from ..interrupt import Interrupted
    from ..irm.data import read_table
    from ..irm.sweep import EvalSettings, run_sweep, sweep_plan
    from ..irm.synth import read_questions
    from ..irm.training import TrainConfig
    pairs = _align_pairs(align)
    seed_list = _ints(seeds, "--seeds")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, max_len=max_len, val_fraction=val_fraction,
                      eval_every=eval_every, patience=patience).validate()
    qs = read_questions(questions)
    subject = load_subject(model, gguf_file, dtype, device)
    cfg.chat = recipe.resolve_chat(read_table(next(iter(pairs.values()))), subject) if chat is None else chat
    plan = sweep_plan(subject, pairs, sets=[s.strip() for s in sets.split(",") if s.strip()], seeds=seed_list,
                      control=control)
    ev = EvalSettings(scale=scale, limit=limit, max_new_tokens=judge_tokens, facts=facts)
    try:
        res = run_sweep(subject, plan, out, questions=qs, config=cfg, width=width, depth=depth, evaluation=ev,
                        analyze=analyze, analysis_kwargs={"top_k": top_k, "max_new_tokens": max_new_tokens,
                                         "known_dims": _ints(known_dims, "--known-dims")})
    except Interrupted as exc:
        typer.echo(str(exc) + " (run the same sweep command again: finished runs are kept)", err=True)
        raise typer.Exit(exc.exit_code) from None
    if not analyze:
        console.print(f"{len(plan)} runs trained; {len(res.analysed)} aligned runs passed their judge; not analysed "
                      "(--no-analyze).")
        return
    for line in res.findings:
        console.print(line, markup=False)
    console.print(f"{len(plan)} runs, {len(res.analysed)} aligned runs passed and were analysed; report: "
                  f"{Path(out) / 'report' / 'report.md'}")


def _align_pairs(align: List[str]) -> dict[str, str]:
    from ..errors import NeuronscopeError
    pairs = {}
    for a in align:
        name, sep, path = a.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise NeuronscopeError(f"--align takes NAME=DATA, got '{a}'.")
        pairs[name.strip()] = path.strip()
    return pairs


def _ints(text: str, option: str) -> list[int]:
    from ..errors import NeuronscopeError
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise NeuronscopeError(f"{option} takes integers separated by commas, got '{text}'.") from None


def register(app: typer.Typer) -> None:
    app.add_typer(irm_app, name="irm")
