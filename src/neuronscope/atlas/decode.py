"""Decoding vectors through the LM head: top-k tokens, their logits and probabilities, fast and exact.

`decode(vectors, W_U, k=...)` returns, per side ("pos": tokens the vectors promote, "neg": tokens they suppress,
i.e. the decode of the negated vector), the top-k token ids, logits and softmax probabilities (with the full
log-sum-exp over the vocabulary, computed in the same pass).

Three methods give the same answer:
- "fused" (the CPU default): the vocabulary is cut into cache-sized blocks; each block's logits come from one
  GEMM into a reused buffer, add to a running log-sum-exp, and only the entries above a per-row threshold (the
  k-th largest logit of the first, larger block, a lower bound of the final k-th largest) are kept as candidates.
  No full-vocabulary top-k is ever run, and the logits never leave the cache. Chunks of vectors run on one
  single-threaded worker per core (no thread barriers inside the many small per-block ops).
- "twopass" (the GPU default, with bf16): a low-precision first pass proposes every token whose logit could be in
  the top-k given a rigorous bound on the rounding error, and the candidates are re-scored exactly (float32 on a
  GPU); tests force it with float32/float64 and with bf16 on CPU to show it equals the plain result.
- "plain": one matmul, `topk` and `logsumexp` (the reference).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from ..errors import NeuronscopeError
from .records import DecodedToken

if TYPE_CHECKING:
    from ..subject import Subject

SIDES = ("pos", "neg")


@dataclass
class Decoded:
    """Top-k of one side for n vectors: ids [n, k] (int64), logits [n, k], probs [n, k], lse [n] (float32)."""
    ids: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    lse: torch.Tensor


def decode(vectors: torch.Tensor, unembedding: torch.Tensor, *, k: int = 20, sides: Sequence[str] = ("pos",),
           method: str = "auto", chunk: int = 256, vocab_block: int = 1024,
           approx_dtype: torch.dtype | str | None = None,
           exact_dtype: torch.dtype = torch.float32, permutation: torch.Tensor | None = None) -> dict[str, Decoded]:
    """Decode `vectors` [n, H] through `unembedding` [V, H] (gain already folded into the vectors).

    Returns {side: Decoded} for each requested side. `chunk` rows are decoded at a time (memory is bounded by
    chunk x vocab_block for "fused", chunk x V for the others). `permutation` (fused only): the order in which
    vocabulary rows are visited, as given by `shuffled_unembedding` (a random first block gives a tight threshold).
    """
    n, h = vectors.shape
    V = unembedding.shape[0]
    if unembedding.shape[1] != h:
        raise NeuronscopeError(f"Vectors have {h} dimensions but the unembedding has {unembedding.shape[1]}.")
    if not 1 <= k <= V:
        raise NeuronscopeError(f"top_k must be between 1 and the vocabulary size {V}, got {k}.")
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise NeuronscopeError(f"Unknown decode side(s) {bad or sides}; use 'pos' and/or 'neg'.")
    if method == "auto":
        method = "twopass" if unembedding.device.type == "cuda" else "fused"
    if method not in ("fused", "twopass", "plain"):
        raise NeuronscopeError(f"Unknown decode method '{method}'; use auto, fused, twopass or plain.")
    starts = list(range(0, n, max(1, chunk)))

    if method == "twopass":
        approx = approx_dtype or ("tf32" if unembedding.device.type == "cuda" else torch.bfloat16)
        if approx not in _UNIT_ROUNDOFF:
            raise NeuronscopeError(f"approx_dtype must be one of {sorted(map(str, _UNIT_ROUNDOFF))}, got {approx!r}.")
        Wa = unembedding.to(torch.float32 if approx == "tf32" else approx)   # converted once, not per chunk
        wmax = unembedding.float().norm(dim=1).max()

    def one(c: int) -> dict[str, Decoded]:
        u = vectors[c:c + chunk]
        if method == "plain":
            return _decode_plain(u, unembedding, k, sides)
        if method == "twopass":
            return _decode_twopass(u, unembedding, Wa, wmax, k, sides, approx, exact_dtype)
        return _decode_fused(u, unembedding, k, sides, vocab_block, permutation)

    workers = min(torch.get_num_threads(), len(starts)) if method == "fused" and unembedding.device.type == "cpu" \
        else 1
    if workers > 1:
        # One single-threaded worker per core, each on its own chunk: no thread barrier inside the many small
        # per-block ops (with intra-op threads, a busy machine stalls every op on its slowest thread).
        from concurrent.futures import ThreadPoolExecutor
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(one, starts))
        finally:
            torch.set_num_threads(threads)
    else:
        results = [one(c) for c in starts]
    return {s: Decoded(*(torch.cat([getattr(r[s], f) for r in results]) for f in ("ids", "logits", "probs", "lse")))
            for s in sides}


def shuffled_unembedding(unembedding: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 contiguous copy of W_U with its rows in a fixed random order, and that order (for `decode`)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(unembedding.shape[0], generator=g).to(unembedding.device)
    return unembedding.detach().float()[perm].contiguous(), perm


# ---- plain (reference) ---------------------------------------------------------------------------------------
def _decode_plain(u: torch.Tensor, W: torch.Tensor, k: int, sides: Sequence[str]) -> dict[str, Decoded]:
    logits = u.float() @ W.float().T
    out = {}
    for s in sides:
        x = logits if s == "pos" else -logits
        vals, ids = x.topk(k, dim=1)
        lse = torch.logsumexp(x, dim=1)
        out[s] = Decoded(ids.long(), vals, (vals - lse[:, None]).exp(), lse)
    return out


# ---- fused blocked GEMM + threshold candidates + running log-sum-exp ----------------------------------------------
def _decode_fused(u: torch.Tensor, W: torch.Tensor, k: int, sides: Sequence[str], block: int,
                  perm: torch.Tensor | None, first_blocks: int = 4) -> dict[str, Decoded]:
    """Per vocabulary block: one GEMM into a reused buffer, exp into a second buffer and a row sum (the running
    sum of exp(logit)), and a compare against each row's threshold to keep candidates. The first, larger block
    sets the thresholds (its k-th largest logit per row). Rows whose logits are too large or small for an unshifted
    float32 exp (|max| > 80) are recomputed with an exact `logsumexp`."""
    u = u.float().contiguous()
    W = W if W.dtype == torch.float32 else W.float()
    n, V = u.shape[0], W.shape[0]
    first = min(V, max(first_blocks * block, k))
    buf = torch.empty(n, max(block, first), dtype=torch.float32, device=u.device)
    tmp = torch.empty_like(buf)
    b0 = buf[:, :first]
    torch.mm(u, W[:first].T, out=b0)
    state: dict[str, dict[str, Any]] = {}
    ex = torch.exp(b0, out=tmp[:, :first])
    for s in sides:
        v0, i0 = (b0 if s == "pos" else torch.neg(b0)).topk(k, dim=1)
        acc = (ex.sum(1) if s == "pos" else ex.reciprocal().sum(1)).double()
        tau = v0[:, -1:].clone()                    # k-th largest of the first block <= final k-th largest
        state[s] = dict(tau=tau if s == "pos" else -tau, acc=acc,
                        rows=[torch.arange(n, device=u.device).repeat_interleave(k)],
                        cols=[i0.reshape(-1)], vals=[v0.reshape(-1)])
    for b in range(first, V, block):
        e = min(V, b + block)
        x = buf[:, :e - b]
        t = tmp[:, :e - b]
        torch.mm(u, W[b:e].T, out=x)
        torch.exp(x, out=t)
        for s in sides:
            st = state[s]
            if s == "pos":
                st["acc"] += t.sum(1)
                mask = torch.gt(x, st["tau"])
            else:
                st["acc"] += t.reciprocal_().sum(1)
                mask = torch.lt(x, st["tau"])
            r, c = mask.nonzero(as_tuple=True)
            if r.numel():
                st["rows"].append(r)
                st["cols"].append(c + b)
                st["vals"].append(x[r, c] if s == "pos" else -x[r, c])
    out = {}
    for s in sides:
        st = state[s]
        vals, ids = _ragged_topk(torch.cat(st["rows"]), torch.cat(st["cols"]), torch.cat(st["vals"]), n, k)
        lse = st["acc"].log().float()
        redo = (vals[:, 0].abs() > 80.0) | ~torch.isfinite(lse)
        if redo.any():
            z = u[redo] @ W.T
            lse[redo] = torch.logsumexp(z if s == "pos" else -z, 1)
        if perm is not None:
            ids = perm[ids]
        out[s] = Decoded(ids.long(), vals, (vals - lse[:, None]).exp(), lse)
    return out


def _ragged_topk(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row of a ragged set of (row, col, value) candidates (every row has at least k)."""
    order = torch.argsort(rows, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = torch.bincount(rows, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    width = int(counts.max())
    dense_v = torch.full((n, width), float("-inf"), device=vals.device, dtype=vals.dtype)
    dense_c = torch.zeros((n, width), device=vals.device, dtype=cols.dtype)
    dense_v[rows, pos] = vals
    dense_c[rows, pos] = cols
    top_v, j = dense_v.topk(k, dim=1)
    return top_v, dense_c.gather(1, j)


# ---- two passes: low-precision proposal, exact re-score --------------------------------------------------------
# unit roundoff of the first pass's inputs; "tf32": fp32 tensors multiplied on tensor cores with 10-bit mantissas
# (counted as truncation, 2**-10, to be safe whatever the hardware's rounding)
_UNIT_ROUNDOFF: dict[torch.dtype | str, float] = {
    torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, "tf32": 2.0 ** -10, torch.float32: 2.0 ** -24,
    torch.float64: 2.0 ** -53}
_GATHER_BYTES = 1 << 29         # the exact re-score gathers candidate rows of W in blocks of at most this size


@contextmanager
def _tf32_matmul() -> Iterator[None]:
    """fp32 matrix products on TF32 tensor cores inside the block (CUDA; no effect on a CPU)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = old


def _decode_twopass(u: torch.Tensor, W: torch.Tensor, Wa: torch.Tensor, wmax: torch.Tensor, k: int,
                    sides: Sequence[str], approx: torch.dtype | str, exact: torch.dtype) -> dict[str, Decoded]:
    """First pass in `approx` precision; every token whose approximate logit is within twice the rounding-error
    bound of the approximate k-th value is re-scored in `exact` precision, so the final top-k is exact."""
    if approx == "tf32":
        with _tf32_matmul():
            A = u.float() @ Wa.T                                   # [n, V] approximate logits
    else:
        A = (u.to(approx) @ Wa.T).float()
    ur = _UNIT_ROUNDOFF[approx]
    h = u.shape[1]
    # |A - exact| <= (2ur + ur^2 + h*2^-23) * sum|u||w| + 2^-23*|A| (inputs rounded, fp32 accumulation counted as
    # truncating, output rounded); sum|u||w| <= |u|_2 * max_j |w_j|_2.
    unorm = u.float().norm(dim=1)
    acc_err = h * 2.0 ** -23 if approx != torch.float64 else h * 2.0 ** -52
    out_err = max(ur if approx in (torch.bfloat16, torch.float16) else 0.0, 2.0 ** -23)
    eps = (2 * ur + ur * ur + acc_err) * unorm * wmax + out_err * A.abs().amax(1)
    eps = eps * 1.01 + 1e-30
    out = {}
    ue = u.to(exact)
    for s in sides:
        x = A if s == "pos" else -A
        vk = x.topk(k, dim=1).values[:, -1]
        ncand = int((x >= (vk - 2 * eps)[:, None]).sum(1).max())
        cand = x.topk(min(ncand, x.shape[1]), dim=1).indices           # a superset of the exact top-k
        rows = max(1, _GATHER_BYTES // max(1, cand.shape[1] * h * ue.element_size()))
        ex = torch.cat([torch.einsum("nh,nch->nc", ue[r:r + rows], W[cand[r:r + rows]].to(exact))
                        for r in range(0, cand.shape[0], rows)])
        if s == "neg":
            ex = -ex
        vals, j = ex.topk(k, dim=1)
        ids = cand.gather(1, j)
        lse = torch.logsumexp(x, 1)
        vals = vals.float()
        out[s] = Decoded(ids.long(), vals, (vals - lse[:, None]).exp(), lse)
    return out


def naive_decode(vectors: torch.Tensor, unembedding: torch.Tensor, k: int = 20) -> Decoded:
    """The per-neuron loop a first implementation would write (softmax of W_U @ v, then top-k): the benchmark's
    baseline, and a readable statement of what `decode` computes for the "pos" side."""
    ids, logits, probs, lses = [], [], [], []
    W = unembedding.float()
    for v in vectors.float():
        z = W @ v
        p = torch.softmax(z, 0)
        pv, pi = p.topk(k)
        ids.append(pi)
        probs.append(pv)
        logits.append(z[pi])
        lses.append(torch.logsumexp(z, 0))
    return Decoded(torch.stack(ids), torch.stack(logits), torch.stack(probs), torch.stack(lses))


def token_text(i: int, vocab: Sequence[str] | None, tokenizer: Any) -> str:
    """How a decoded id reads: its vocabulary string, else the tokenizer's decoding, else "<id>"."""
    if vocab is not None and 0 <= i < len(vocab):
        return vocab[i]
    return tokenizer.decode([i]) if tokenizer is not None else f"<{i}>"


def decode_neuron(subject: Subject, layer: int, neuron: int, *, k: int = 5, apply_norm: bool = True,
                  unembedding: torch.Tensor | None = None, gain: torch.Tensor | None = None,
                  vocab: list[str] | None = None) -> dict[str, list[DecodedToken]]:
    """One neuron decoded through the LM head, from the weights: {site: [DecodedToken, ...]} for
    up, gate (gated MLPs), down.pos and down.neg, best first (the format of `Atlas.neuron`).

    The one home of "decode one neuron" (an atlas decodes all of them with `decode`): logits = W_U (g * v), g the
    final norm's gain when apply_norm. unembedding/gain: float32 copies to reuse across calls (W_U is large)."""
    spec, hf = subject.spec, subject.model
    subject.check_layer(layer)
    subject.check_neurons([neuron])
    with torch.no_grad():
        W = unembedding if unembedding is not None else spec.unembedding(hf).detach().float()
        g = (gain if gain is not None else spec.final_norm_gain(hf).detach().float()) if apply_norm else None
        jobs: list[tuple[str, torch.Tensor, tuple[str, ...]]] = [
            (site, m[neuron], ("pos",)) for site, m in spec.read_vectors(hf, layer).items()]
        jobs.append(("down", spec.write_vectors(hf, layer)[neuron], ("pos", "neg")))
        out: dict[str, list[DecodedToken]] = {}
        for name, vec, sides in jobs:
            v = vec.detach().float().to(W.device)
            if g is not None:
                v = v * g.to(W.device)
            for side, d in decode(v.unsqueeze(0), W, k=k, sides=sides, method="plain").items():
                site = name if name != "down" else f"down.{side}"
                ids = d.ids[0].tolist()
                out[site] = [DecodedToken(token_text(i, vocab, subject.tokenizer), i, float(lg), float(p))
                             for i, lg, p in zip(ids, d.logits[0].tolist(), d.probs[0].tolist())]
    order = ("up", "gate", "down.pos", "down.neg")
    return {s: out[s] for s in order if s in out}
