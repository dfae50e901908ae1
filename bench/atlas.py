"""Benchmark of the atlas build (issue 3) on SmolLM2-135M-Instruct: GEMM rate of this machine, the up_proj site's
effective rate against it, the plain chunked matmul+topk and the naive per-neuron loop, and (with --full) the whole
atlas's time and peak memory. Every ratio is measured in this one run; times are medians.

    .venv/bin/python bench/atlas.py [--model GGUF] [--reps 3] [--full] [--llama8b (GPU only)]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parent.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--naive-neurons", type=int, default=192)
    ap.add_argument("--layers", type=int, default=None, help="use only the first N layers (a shorter run)")
    ap.add_argument("--full", action="store_true", help="also time the whole atlas (all sites) in a subprocess")
    ap.add_argument("--full-chunks", default="256", help="chunk sizes for --full, comma-separated")
    ap.add_argument("--llama8b", action="store_true", help="time a Llama-3.1-8B-shaped up_proj decode (GPU)")
    args = ap.parse_args()
    from neuronscope.atlas import decode, naive_decode
    from neuronscope.atlas.decode import shuffled_unembedding
    from neuronscope.subject import Subject

    res: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.llama8b:
        res["llama8b"] = llama8b()
        print(json.dumps(res, indent=2))
        return
    s = Subject.load(args.model)
    spec, m = s.spec, s.model
    g = spec.final_norm_gain(m)
    n_layers = min(args.layers or s.n_layers, s.n_layers)
    U = torch.cat([spec.read_vectors(m, l)["up"].detach().float() * g for l in range(n_layers)]).contiguous()
    W = spec.unembedding(m).detach().float().contiguous()
    Ws, perm = shuffled_unembedding(W)
    n, h = U.shape
    V = W.shape[0]
    flops = 2.0 * n * h * V
    res.update(model=s.name, layers=n_layers, neurons=n, hidden=h, vocab=V, site_gflop=flops / 1e9)

    sq = torch.randn(2048, 2048)
    t_sq, _ = median_time(lambda: torch.mm(sq, sq), 5)
    res["gemm_square_2048_gflops"] = 2 * 2048 ** 3 / t_sq / 1e9

    def pure_gemm():                      # the same GEMM the site needs, chunked, nothing else
        for c in range(0, n, 512):
            torch.mm(U[c:c + 512], W.T)

    def fused():
        decode(U, Ws, k=20, method="fused", permutation=perm)

    def plain():
        decode(U, W, k=20, method="plain", chunk=512)

    times = {"gemm": [], "fused": [], "plain": []}
    for _ in range(args.reps):            # interleaved, so that a busy spell hits all three alike
        for name, fn in (("gemm", pure_gemm), ("fused", fused), ("plain", plain)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["site_seconds"] = {k: round(v, 2) for k, v in med.items()}
    res["site_seconds_all"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
    res["gemm_rate_gflops"] = flops / med["gemm"] / 1e9
    res["fused_rate_gflops"] = flops / med["fused"] / 1e9
    res["plain_rate_gflops"] = flops / med["plain"] / 1e9
    res["fused_vs_gemm"] = med["gemm"] / med["fused"]
    res["plain_vs_gemm"] = med["gemm"] / med["plain"]
    res["fused_vs_square_gemm_rate"] = res["fused_rate_gflops"] / res["gemm_square_2048_gflops"]

    k = args.naive_neurons
    t_naive, _ = median_time(lambda: naive_decode(U[:k], W, 20), max(1, args.reps - 1))
    res["naive_seconds_per_neuron"] = t_naive / k
    res["fused_seconds_per_neuron"] = med["fused"] / n
    res["fused_vs_naive"] = res["naive_seconds_per_neuron"] / res["fused_seconds_per_neuron"]
    a, b = naive_decode(U[:64], W, 20), decode(U[:64], Ws, k=20, method="fused", permutation=perm)["pos"]
    res["fused_equals_naive_ids_first64"] = float((a.ids == b.ids).float().mean())

    if args.full:
        res["full_atlas"] = full_build(args.model, [int(c) for c in args.full_chunks.split(",")])
    print(json.dumps(res, indent=2))


def full_build(model: str, chunks: list[int]) -> dict:
    """Build the whole atlas in a fresh process; report its time and peak RSS over the loaded model's RSS."""
    code = (
        "import time, json, sys\n"
        "from neuronscope.subject import Subject\n"
        "from neuronscope.atlas import build_atlas\n"
        "from neuronscope.stats.compute import peak_rss\n"
        "s = Subject.load(sys.argv[1]); s.fingerprint\n"
        "base = peak_rss() / 1024\n"
        "t = time.perf_counter(); a = build_atlas(s, sys.argv[2], progress=False, chunk=int(sys.argv[3]))\n"
        "el = time.perf_counter() - t\n"
        "peak = peak_rss() / 1024\n"
        "print(json.dumps({'seconds': el, 'rss_after_load_mb': base / 1024, 'peak_rss_mb': peak / 1024, "
        "'sites': a.sites}))\n")
    out = {}
    for chunk in chunks:
        with tempfile.TemporaryDirectory() as d:
            p = subprocess.run([sys.executable, "-c", code, model, os.path.join(d, "atlas"), str(chunk)],
                               capture_output=True, text=True, check=True)
            out[f"chunk_{chunk}"] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def llama8b() -> dict:
    """Up_proj site of a Llama-3.1-8B-shaped model (32 x 14336 neurons, hidden 4096, vocab 128256), random
    weights: the whole site decoded to top-20 tokens (TF32 first pass + exact fp32 re-score, then both sides), the
    same-shape bf16 GEMM alone (the peak the decode can reach), and the plain fp32 matmul + topk."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    from neuronscope.atlas import decode
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(128256, 4096, device=dev, generator=g) * 0.02
    U = torch.randn(14336, 4096, device=dev, generator=g) * 0.02     # one layer's vectors, reused for the 32
    L, chunk = 32, 2048
    flops = 2 * L * 14336 * 4096 * 128256
    out: dict = {"gpu": torch.cuda.get_device_name(), "tflop": flops / 1e12}

    def timed(fn, reps: int = 3) -> float:
        fn()                                            # warm-up (and one-off conversions)
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def site(sides, approx="tf32"):
        for _ in range(L):
            decode(U, W, k=20, sides=sides, method="twopass", chunk=chunk, approx_dtype=approx)

    Wb, Ub = W.bfloat16(), U.bfloat16()

    def gemm():
        for _ in range(L):
            for c in range(0, 14336, chunk):
                Ub[c:c + chunk] @ Wb.T

    def plain32():
        for _ in range(L):
            for c in range(0, 14336, chunk):
                torch.topk(U[c:c + chunk] @ W.T, 20, dim=1)

    out["site_pos_s"] = timed(lambda: site(("pos",)))
    out["site_pos_neg_s"] = timed(lambda: site(("pos", "neg")), reps=1)
    out["bf16_gemm_s"] = timed(gemm)
    t = time.perf_counter()
    plain32()                                           # cuBLAS is warm by now: one run
    torch.cuda.synchronize()
    out["fp32_matmul_topk_s"] = time.perf_counter() - t
    out["bf16_gemm_tflops"] = flops / out["bf16_gemm_s"] / 1e12
    out["site_pos_tflops"] = flops / out["site_pos_s"] / 1e12
    out["ratio_site_to_bf16_gemm"] = out["bf16_gemm_s"] / out["site_pos_s"]
    out["speedup_vs_fp32_matmul_topk"] = out["fp32_matmul_topk_s"] / out["site_pos_s"]
    # decode agrees with the exact fp32 top-20 on the first chunk
    d = decode(U[:256], W, k=20, method="twopass", approx_dtype="tf32")["pos"]
    ref = torch.topk(U[:256] @ W.T, 20, dim=1).indices
    out["exact_agreement_first_256"] = float((torch.sort(d.ids, 1).values == torch.sort(ref, 1).values).float().mean())
    return out


if __name__ == "__main__":
    main()
