"""Quick correctness checks on a GPU (run on the device machine before timing anything).

Tiny random models in float16/float32 on CUDA: every scorer x TRIM mode x allocation runs, hits its
exact sparsity, gives finite perplexity; GPU masks equal CPU masks (float32 Wanda); the Gram metrics
equal explicit metrics on the GPU; offloaded evaluation equals plain evaluation.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import calib, make  # noqa: E402

from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.evaluate import nll_of_windows  # noqa: E402
from trimprune.quality import ExplicitEvaluator, GramEvaluator, layer_metric  # noqa: E402

dev = torch.device("cuda")
fails = 0


def check(cond, msg):
    global fails
    if not cond:
        fails += 1
    print(("ok   " if cond else "FAIL ") + msg, flush=True)


ids = calib(16, 64)
for dtype in [torch.float16, torch.bfloat16, torch.float32]:
    for scorer in ["magnitude", "wanda", "sparsegpt"]:
        for kw in [{}, {"trim": True}, {"trim": True, "trim_inputs": "last-token"}, {"mask_structure": "2:4"},
                   {"allocation": "owl"}, {"allocation": "alphapruning", "alpha_cache_dir": "/tmp/ac"},
                   {"trim": True, "trim_input_recalc": True}, {"trim": True, "trim_precision": "tf32"},
                   {"trim": True, "trim_precision": "bf16"}]:
            m = make("llama").to(dev, dtype)
            t = time.perf_counter()
            res = prune(m, None, PruneConfig(scorer=scorer, sparsity=0.5, nsamples=16, seqlen=64, **kw),
                        calibration=ids, progress=False)
            nll, n = nll_of_windows(m, ids[:4], 4)
            ok = math.isfinite(nll) and abs(res.global_sparsity - 0.5) < 0.02
            check(ok, f"{str(dtype):15} {scorer:10} {kw} sparsity {res.global_sparsity:.4f} nll/tok {nll / n:.3f} "
                      f"{time.perf_counter() - t:.2f}s")

a = make("llama")
b = make("llama").to(dev)
ra = prune(a, None, PruneConfig(scorer="wanda", sparsity=0.6, nsamples=16, seqlen=64), calibration=ids, progress=False)
rb = prune(b, None, PruneConfig(scorer="wanda", sparsity=0.6, nsamples=16, seqlen=64), calibration=ids, progress=False)
same = sum(torch.equal(ra.mask(k), rb.mask(k)) for k in ra.layers)
check(same >= len(ra.layers) - 1, f"float32 Wanda masks CPU == GPU for {same}/{len(ra.layers)} linears")

g = torch.Generator(device="cpu").manual_seed(0)
X = torch.randn(500, 64, generator=g).to(dev)
W = torch.randn(32, 64, generator=g).to(dev)
M = torch.rand(3, 32, 64, generator=g).to(dev) < 0.5
ge, ee = GramEvaluator(X.T @ X, 500), ExplicitEvaluator(X.T.contiguous())
ge.prepare(W)
ee.prepare(W)
for name in ["cosim_flat", "cosim_dim", "mse", "snr"]:
    x, y = layer_metric(name, ge.stats_from_mask(M)), layer_metric(name, ee.stats_from_mask(M))
    check(torch.allclose(x, y, rtol=1e-4, atol=1e-6), f"gram == explicit on GPU for {name}: {x.tolist()} {y.tolist()}")

# the batched count path (prefix sums + fused select) on the GPU, graph-captured, against explicit masks
from trimprune.masks import row_ranks  # noqa: E402
from trimprune.trim import TrimSearch, TrimSettings  # noqa: E402

Xs = torch.randn(2, 400, 96, generator=g).to(dev)
Ws = torch.randn(2, 48, 96, generator=g).to(dev)
Gs = Xs.transpose(1, 2) @ Xs
rk = torch.stack([row_ranks(Ws[p].abs() * Xs[p].norm(dim=0)) for p in range(2)])
k = torch.randint(0, 97, (2, 3, 48), generator=g).to(dev)
ge = GramEvaluator(Gs, 400)
ge.prepare(Ws)
fast = ge.stats_from_counts(k, rk)
slow = ge.stats_from_mask(rk.unsqueeze(1) < k.unsqueeze(-1))
for key in ["c", "q", "err"]:      # relative to the row's output energy: q = yy - 2c' + err cancels
    rel = ((fast[key] - slow[key]).abs() / (slow["yy"] + 1)).max().item()
    check(rel < 1e-5, f"count fast path == mask path on GPU ({key}): max rel. diff {rel:.1e}")
res = {}
for mode in ["parallel", "sequential"]:
    ts = TrimSearch(TrimSettings(lr_search=mode))
    res[mode] = ts.run_many(lambda src: GramEvaluator(src, 400), ("gram-check",), Ws, Gs, rk, [0.5, 0.7],
                            [48 * 48, 48 * 67])
agree = sum(a.learning_rate == b.learning_rate and torch.equal(a.counts, b.counts)
            for a, b in zip(res["parallel"], res["sequential"]))
check(agree == 2, f"TRIM lr search parallel (CUDA graph) == sequential on GPU: {agree}/2 linears, lrs "
                  f"{[r.learning_rate for r in res['parallel']]} vs {[r.learning_rate for r in res['sequential']]}")

# the cross term of the quadratic prefix table: Triton kernel == tensor-code reference (float64)
from trimprune.kernels import pruned_cross, pruned_cross_reference  # noqa: E402

for P, R, N, shared in [(1, 5, 7, False), (2, 37, 70, True), (3, 130, 333, False), (2, 1536, 576, True)]:
    Xk = torch.randn(P, 3 * N, N, generator=g).to(dev)
    Gk = Xk.transpose(1, 2) @ Xk
    if shared:
        Gk = Gk[:1].expand(P, N, N)
    Wk = torch.randn(P, R, N, generator=g).to(dev)
    rkk = torch.stack([row_ranks(torch.randn(R, N, generator=g).to(dev)) for _ in range(P)])
    got = pruned_cross(Wk, rkk, Gk).double()
    want = pruned_cross_reference(Wk.double(), rkk, Gk.double(), chunk_elems=2**26)
    rel = ((got - want).abs().amax() / want.abs().amax()).item()
    check(rel < 1e-5, f"Triton cross term == reference for P={P} rows={R} in={N} shared G={shared}: rel. {rel:.1e}")

# the fused TRIM iterations (one Triton kernel) == the tensor code, on the GPU
from trimprune.kernels import trim_iterations  # noqa: E402

agree = 0
for seed in range(8):
    P, R, N, T = 3, 300 + 97 * seed, 96, 400
    Xs = torch.randn(P, T, N, generator=g).to(dev) * torch.rand(N, generator=g).to(dev) * 3
    Wf = torch.randn(P, R, N, generator=g).to(dev)
    rkf = torch.stack([row_ranks(Wf[p].abs() * Xs[p].norm(dim=0)) for p in range(P)])
    lm = ["cosim_flat", "cosim_dim", "mse", "mse_dim"][seed % 4]
    dm = ["cosim", "mse"][seed % 2]
    ts = TrimSearch(TrimSettings(layer_metric=lm, dim_metric=dm))
    ev, s3, blm, bdq, _ = ts._start(lambda src: GramEvaluator(src, T, tables="on"), Wf, Xs.transpose(1, 2) @ Xs,
                                    rkf, torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64, device=dev))
    lrs = torch.tensor(ts.all_lrs, dtype=torch.float64, device=dev)
    os.environ["TRIMPRUNE_TRITON"] = "0"
    bx, bm, bit = ts._iterate(ev, rkf, s3, blm, bdq, lrs)
    os.environ["TRIMPRUNE_TRITON"] = "1"
    fx, fm, fit = trim_iterations(ev.count_tables(), ev.yy, s3.view(P), blm[:, 0], bdq[:, 0], lrs, 10, 0.95,
                                  int(0.95 * N + 1e-9), T, lm, dm)
    agree += bool(torch.equal(bx, fx) and torch.equal(bit, fit) and (bm - fm).abs().max() <= 1e-12)
check(agree == 8, f"fused TRIM iterations == tensor code on GPU: {agree}/8 (4 layer x 2 dim metrics, 9 rates)")

# the pipeline with prefix tables (default on CUDA) == forming E G per candidate (TRIMPRUNE_TRITON=0)

recs = {}
for flag in ["1", "0"]:
    os.environ["TRIMPRUNE_TRITON"] = flag
    r = prune(make("llama").to(dev), None, PruneConfig(scorer="wanda", sparsity=0.6, nsamples=16, seqlen=64, trim=True,
                                                       trim_precision="fp32"), calibration=ids, progress=False)
    recs[flag] = {n: (rec["trim"]["lr"], r.masks[n].cpu()) for n, rec in r.layers.items()}
os.environ["TRIMPRUNE_TRITON"] = "1"
same = sum(recs["1"][n][0] == recs["0"][n][0] and torch.equal(recs["1"][n][1], recs["0"][n][1]) for n in recs["1"])
check(same >= len(recs["1"]) - 1, f"pipeline TRIM with prefix tables == with E G per candidate: {same}/{len(recs['1'])}"
                                  " linears (fp32; a near-tie may flip one)")

# the pipeline: CUDA-graph searches overlapping on side streams == the sequential search, linear by linear
recs = {}
for mode in ["parallel", "sequential"]:
    r = prune(make("llama").to(dev), None, PruneConfig(scorer="wanda", sparsity=0.6, nsamples=16, seqlen=64, trim=True,
                                                       trim_precision="fp32", trim_lr_search=mode),
              calibration=ids, progress=False)
    recs[mode] = {n: (rec["trim"]["lr"], r.masks[n].cpu()) for n, rec in r.layers.items()}
same = sum(recs["parallel"][n][0] == recs["sequential"][n][0] and torch.equal(recs["parallel"][n][1],
                                                                                recs["sequential"][n][1])
           for n in recs["parallel"])
check(same == len(recs["parallel"]), f"pipeline TRIM with overlapping graph searches == sequential search: "
                                     f"{same}/{len(recs['parallel'])} linears")

m = make("gemma3").to(dev)
x1, _ = nll_of_windows(m, ids[:6], 3)
m.cpu()
x2, _ = nll_of_windows(m, ids[:6], 3, device=dev, offload=True)
check(abs(x1 - x2) / abs(x1) < 1e-5, f"offloaded eval == plain eval ({x1:.5f} vs {x2:.5f})")
print("FAILURES:", fails)
sys.exit(1 if fails else 0)
