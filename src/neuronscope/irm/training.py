"""Training an IRM on a frozen LLM: seeded batches, Adam on the IRM's parameters only, validation at intervals,
early stopping, checkpoints of the IRM alone (plus optimizer state), exact resume.

    result = train_irm(subject, "anger.jsonl", "runs/anger", inject_layers="0-29", config=TrainConfig(steps=300))

Run folder: run.json (model, fingerprint, IRM and training options, data file + sha256, split, status, history),
irm.safetensors + irm.json (the best IRM by validation loss; the last one when there is no validation split),
checkpoints/step-NNNNNN/ (irm, optimizer, trainer state) and checkpoints/latest.json naming the newest complete one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import NeuronscopeError
from ..store import load_tensors, read_json, save_tensors, write_json
from .data import (Example, collate, file_sha256, kl_to_frozen, lm_loss, read_table, split, table_kind,
                   tokenize_rows)
from .model import IRM

if TYPE_CHECKING:
    from ..subject import Subject

RUN = "run.json"
SPLIT = "split.json"


@dataclass
class TrainConfig:
    """Training options (all recorded in run.json)."""
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    l1: float = 0.0               # L1 penalty on the IRM's outputs (mean |out| per element)
    kl: float = 0.0               # anchor: weight of KL(frozen || IRM-on) on the target tokens (one more forward)
    max_len: int = 256
    val_fraction: float = 0.1
    eval_every: int = 50
    patience: int = 4             # validations without improvement before stopping; 0 = never stop early
    min_delta: float = 1e-4
    seed: int = 0
    chat: bool = False            # apply the chat template to prompts
    keep_checkpoints: int = 2

    def validate(self) -> "TrainConfig":
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise NeuronscopeError("steps, batch size and eval interval must all be at least 1.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NeuronscopeError(f"The learning rate must be a positive number, got {self.lr}.")
        if not (self.l1 >= 0 and math.isfinite(self.l1)):
            raise NeuronscopeError(f"The L1 weight must be >= 0, got {self.l1}.")
        if not (self.kl >= 0 and math.isfinite(self.kl)):
            raise NeuronscopeError(f"The KL anchor weight must be >= 0, got {self.kl}.")
        if self.patience < 0:
            raise NeuronscopeError("patience must be >= 0.")
        return self


@dataclass
class TrainResult:
    irm: IRM
    run_dir: Path
    step: int
    best_val: float | None
    best_step: int | None
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class TrainState:
    """The trainer's state, saved as checkpoints/step-N/trainer.json (the same keys as before it was a class)."""
    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    running: float | None = None

    @staticmethod
    def read(path: Path) -> "TrainState":
        d = read_json(path)
        return TrainState(**{k: d[k] for k in TrainState.__dataclass_fields__ if k in d})


@dataclass
class _Run:
    """What one training run works with (internal to train_irm)."""
    subject: Subject
    irm: IRM
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    run_dir: Path
    info: dict[str, Any]
    train: list[Example]
    val: list[Example]
    pad: int
    state: TrainState

    def write(self, **extra: Any) -> None:
        write_json(self.run_dir / RUN, dict(self.info, step=self.state.step, history=self.state.history, **extra))

    def checkpoint(self) -> None:
        _save_checkpoint(self.run_dir, self.irm, self.opt, self.state, self.cfg.keep_checkpoints)


# ---- public API --------------------------------------------------------------------------------------------------
def train_irm(subject: Subject, data: str | Path | Sequence[dict[str, Any]], run_dir: str | Path, *,
              inject_layers: str | Sequence[int] | None = "all", read_layer: int = 0, read_site: str = "resid.mid",
              inject_site: str = "resid.mid", width: int = 256, depth: int = 1, input_norm: bool = True,
              config: TrainConfig | None = None, resume: bool = False, progress: bool = True,
              alignment: str | None = None) -> TrainResult:
    """Train an IRM on `subject` (frozen) with the rows in `data` (a CSV/JSONL/Parquet path or a list of dicts).

    resume=True continues from run_dir's newest checkpoint (the options must match); a run folder that already
    holds a run is never overwritten without it.
    """
    cfg = (config or TrainConfig()).validate()
    run_dir = Path(run_dir)
    rows, data_info = _load_rows(data)
    data_info["alignment"] = alignment or data_info.get("alignment") or "alignment"
    irm = IRM.for_subject(subject, inject_layers, read_layer=read_layer, read_site=read_site,
                          inject_site=inject_site, width=width, depth=depth, input_norm=input_norm, seed=cfg.seed)
    irm.to(subject.device)
    plan = {"irm": irm.config.to_dict(), "train": asdict(cfg), "data": data_info}
    existing = run_dir / RUN
    if existing.is_file() and not resume:
        raise NeuronscopeError(f"'{run_dir}' already holds a run; pass --resume to continue it or pick a new folder.")
    if resume and existing.is_file():
        _check_same_plan(read_json(existing), plan)
    _freeze_check(subject)
    r = _prepare(subject, irm, cfg, run_dir, rows, plan, resume)
    _train_loop(r, progress)
    return _finish(r)


def _prepare(subject: Subject, irm: IRM, cfg: TrainConfig, run_dir: Path, rows: list[dict[str, Any]],
             plan: dict[str, Any], resume: bool) -> _Run:
    """Tokenise and split the rows, build the optimizer, restore a checkpoint, write run.json, validate step 0."""
    examples = tokenize_rows(subject, rows, chat=cfg.chat, max_len=cfg.max_len)
    train_idx, val_idx = split(len(examples), cfg.val_fraction, cfg.seed)
    write_json(run_dir / SPLIT, {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "train": train_idx,
                                 "val": val_idx, "n_examples": len(examples),
                                 "val_rows": [examples[i].row for i in val_idx]})
    opt = torch.optim.Adam(irm.parameters(), lr=cfg.lr)
    state = TrainState()
    ck = latest_checkpoint(run_dir) if resume else None
    if ck is not None:
        irm.load_state_dict(load_tensors(ck / "irm.safetensors", device=str(subject.device)))
        _load_optimizer(opt, ck / "optim.safetensors", subject.device)
        state = TrainState.read(ck / "trainer.json")
    info = dict(plan, status="running", model=subject.name, fingerprint=subject.fingerprint,
                n_train=len(train_idx), n_val=len(val_idx), irm_parameters=irm.n_parameters())
    r = _Run(subject, irm, opt, cfg, run_dir, info, [examples[i] for i in train_idx],
             [examples[i] for i in val_idx], _pad_id(subject), state)
    r.write()
    if not r.val and not (run_dir / "irm.safetensors").is_file():
        irm.save(run_dir)
    if r.val and state.step == 0 and not state.history:
        v = validation_loss(subject, irm, r.val, cfg.batch_size, r.pad)
        state.history.append({"step": 0, "val_loss": v})
        state.best_val, state.best_step = v, 0
        irm.save(run_dir)
    return r


def _train_loop(r: _Run, progress: bool) -> None:
    """Steps until the end or early stopping; on SIGINT / SIGTERM keep the step's work and raise Interrupted."""
    from tqdm.auto import tqdm
    from ..interrupt import StopRequest
    st, cfg = r.state, r.cfg
    bar = tqdm(total=cfg.steps, initial=min(st.step, cfg.steps), desc="irm train", unit="step",
               disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter() - st.seconds
    stop = StopRequest("IRM training")
    try:
        stop.__enter__()
        while st.step < cfg.steps and not st.stopped_early:
            batch = collate(_batch_examples(r.train, st.step, cfg.batch_size, cfg.seed), r.pad)
            _, lm = train_step(r.subject, r.irm, r.opt, batch, cfg.l1, cfg.kl)
            st.step += 1
            st.running = lm if st.running is None else 0.9 * st.running + 0.1 * lm
            bar.update(1)
            bar.set_postfix(loss=f"{st.running:.4f}", val=_fmt(st.best_val))
            if st.step % cfg.eval_every == 0 or st.step == cfg.steps:
                _validate(r)
                st.seconds = time.perf_counter() - t0
                r.checkpoint()
                r.write()
            if stop:   # SIGINT / SIGTERM: keep this step's work, then stop
                st.seconds = time.perf_counter() - t0
                r.checkpoint()
                r.write(status="interrupted", seconds=st.seconds)
                raise stop.interrupted(f"IRM training stopped after step {st.step}; saved in {r.run_dir}. "
                                       "Run the same command with --resume to continue.")
    finally:
        stop.__exit__(None, None, None)
        bar.close()
    st.seconds = time.perf_counter() - t0


def _validate(r: _Run) -> None:
    """Validation at an eval step: keep the best IRM, count validations without improvement (early stopping)."""
    st, cfg = r.state, r.cfg
    rec: dict[str, Any] = {"step": st.step, "train_loss": st.running}
    if not r.val:
        r.irm.save(r.run_dir)
    else:
        v = validation_loss(r.subject, r.irm, r.val, cfg.batch_size, r.pad)
        rec["val_loss"] = v
        if st.best_val is None or v < st.best_val - cfg.min_delta:
            st.best_val, st.best_step, st.bad_evals = v, st.step, 0
            r.irm.save(r.run_dir)
        else:
            st.bad_evals += 1
            st.stopped_early = bool(cfg.patience and st.bad_evals >= cfg.patience)
    st.history.append(rec)


def _finish(r: _Run) -> TrainResult:
    """The last checkpoint, the final run.json, and the best IRM."""
    st = r.state
    ck = latest_checkpoint(r.run_dir)
    if ck is None or read_json(r.run_dir / "checkpoints" / "latest.json")["step"] != st.step:
        r.checkpoint()
    if not r.val:
        r.irm.save(r.run_dir)
    r.write(status="stopped early" if st.stopped_early else "done", best_val=st.best_val, best_step=st.best_step,
            seconds=st.seconds)
    best = IRM.load(r.run_dir, device=r.subject.device)
    return TrainResult(best, r.run_dir, st.step, st.best_val, st.best_step, st.stopped_early, st.history, st.seconds)


def train_step(subject: Subject, irm: IRM, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               l1: float = 0.0, kl: float = 0.0) -> tuple[float, float]:
    """One optimisation step of the IRM on one batch; returns (total loss, LM loss) as floats."""
    loss, lm = irm_loss(subject, irm, batch, l1, kl)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return float(loss.detach()), float(lm.detach())


def irm_loss(subject: Subject, irm: IRM, batch: dict[str, torch.Tensor], l1: float = 0.0,
             kl: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, LM loss) tensors of one batch: the LM loss on the targets with the IRM on, plus l1 x mean
    |IRM output| and kl x KL(frozen || IRM-on) on the target positions (the frozen model's next-token distribution
    from a no-grad forward without hooks, so the anchor's gradient reaches the IRM alone)."""
    outs: list[torch.Tensor] = []
    dev = subject.device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    with irm.attached(subject, on_output=(lambda o, ctx: outs.append(o)) if l1 > 0 else None):
        logits = subject.model(input_ids=ids, attention_mask=mask).logits
    lm = lm_loss(logits, batch["labels"])
    loss = lm
    if l1 > 0:
        m = mask.bool()
        loss = loss + l1 * torch.stack([o[m].abs().mean() for o in outs]).mean()
    if kl > 0:
        with torch.no_grad():
            frozen = subject.model(input_ids=ids, attention_mask=mask).logits
        loss = loss + kl * kl_to_frozen(frozen, logits, batch["labels"])
    return loss, lm


@torch.no_grad()
def validation_loss(subject: Subject, irm: IRM | None, examples: Sequence[Example], batch_size: int,
                    pad_id: int) -> float:
    """Token-weighted mean next-token loss on `examples`, with the IRM on (or the frozen model when irm is None)."""
    from contextlib import nullcontext
    total = torch.zeros(2, dtype=torch.float64)
    ctx = irm.attached(subject) if irm is not None else nullcontext()
    with ctx:
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size], pad_id)
            logits = subject.model(input_ids=b["input_ids"].to(subject.device),
                                   attention_mask=b["attention_mask"].to(subject.device)).logits
            total += lm_loss(logits, b["labels"], reduction="sum").double().cpu()
    return float(total[0] / total[1].clamp(min=1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    p = Path(run_dir) / "checkpoints" / "latest.json"
    if not p.is_file():
        return None
    ck = Path(run_dir) / "checkpoints" / read_json(p)["dir"]
    return ck if ck.is_dir() else None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[IRM, dict[str, Any]]:
    """The best IRM of a run folder and its run.json."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN).is_file():
        raise NeuronscopeError(
            f"'{run_dir}' is not an IRM run folder (no {RUN}); make one with `neuronscope irm train`.")
    return IRM.load(run_dir, device=device), read_json(run_dir / RUN)


# ---- internals ---------------------------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _load_rows(data: str | Path | Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if isinstance(data, (str, Path)):
        path = Path(data)
        rows = read_table(path)
        info = {"path": str(path.resolve()), "sha256": file_sha256(path), "rows": len(rows),
                "alignment": path.stem}
    else:
        rows = [dict(r) for r in data]
        if not rows:
            raise NeuronscopeError("No training rows given.")
        digest = __import__("hashlib").sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        info = {"path": None, "sha256": digest, "rows": len(rows)}
    info["kind"] = table_kind(rows)
    return rows, info


def _check_same_plan(saved: dict[str, Any], plan: dict[str, Any]) -> None:
    keys = [("data", "sha256"), ("irm", "inject_layers"), ("irm", "read_layer"), ("irm", "read_site"),
            ("irm", "inject_site"), ("irm", "width"), ("irm", "depth"), ("irm", "model_fingerprint"),
            ("train", "seed"), ("train", "batch_size"), ("train", "lr"), ("train", "max_len"),
            ("train", "val_fraction"), ("train", "chat"), ("train", "l1"), ("train", "kl")]
    defaults = {("train", "kl"): 0.0}         # options added later: a run saved before them used the default
    for a, b in keys:
        was = saved.get(a, {}).get(b, defaults.get((a, b)))
        if was != plan[a][b]:
            raise NeuronscopeError(f"Cannot resume: {a}.{b} was {was!r} in this run and is now "
                                   f"{plan[a][b]!r}; use the same options or a new run folder.")


def _freeze_check(subject: Subject) -> None:
    subject.model.requires_grad_(False)
    if any(p.requires_grad for p in subject.model.parameters()):
        raise NeuronscopeError("The model's weights must be frozen to train an IRM.")


def _pad_id(subject: Subject) -> int:
    tok = subject.tokenizer
    for v in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if v is not None:
            return int(v)
    return 0


def _batch_examples(train: Sequence[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The batch for a global step: epoch e uses a permutation seeded by (seed, e); a function of step alone."""
    per_epoch = max(1, math.ceil(len(train) / batch_size))
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    perm = torch.randperm(len(train), generator=g).tolist()
    return [train[j] for j in perm[i * batch_size:(i + 1) * batch_size]]


def _save_checkpoint(run_dir: Path, irm: IRM, opt: torch.optim.Optimizer, state: TrainState, keep: int) -> None:
    ck_root = run_dir / "checkpoints"
    name = f"step-{state.step:06d}"
    ck = ck_root / name
    ck.mkdir(parents=True, exist_ok=True)
    save_tensors(ck / "irm.safetensors", irm.state_dict())
    _save_optimizer(opt, ck / "optim.safetensors")
    write_json(ck / "trainer.json", asdict(state))
    write_json(ck_root / "latest.json", {"dir": name, "step": state.step})
    old = sorted(p for p in ck_root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[:max(0, len(old) - max(0, keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    save_tensors(path, tensors, metadata={"param_groups": json.dumps(sd["param_groups"])})


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, device: str | torch.device) -> None:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    flat = load_tensors(path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict({"state": state, "param_groups": groups})


__all__ = ["TrainConfig", "TrainResult", "TrainState", "train_irm", "train_step", "irm_loss", "validation_loss",
           "load_run", "latest_checkpoint"]
