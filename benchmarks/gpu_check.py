"""Quick correctness checks on a GPU (run on the device machine before timing anything).

Tiny random models in float16/float32 on CUDA: every scorer x TRIM mode x allocation runs, hits its
exact sparsity, gives finite perplexity; GPU masks equal CPU masks (float32 Wanda); the Gram metrics
equal explicit metrics on the GPU; every registered fast path equals its pure function; graph replay
and deferred host copies equal eager execution; offloaded pruning and evaluation equal resident ones;
a prune interrupted after a block and resumed from its checkpoint equals the uninterrupted prune;
`--offload disk` (read from safetensors, written as shards) equals resident pruning and evaluation.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import trimprune.session  # noqa: E402
from tiny_models import calib, make, make_llama  # noqa: E402
from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.algo.masks import row_ranks  # noqa: E402
from trimprune.algo.trim.evaluators import ExplicitEvaluator, GramEvaluator, GramSpec  # noqa: E402
from trimprune.algo.trim.metrics import layer_metric  # noqa: E402
from trimprune.algo.trim.search import TrimSearch, TrimSettings  # noqa: E402
from trimprune.core.runtime import Executor  # noqa: E402
from trimprune.exec import CudaExecutor, fastpaths, make_executor, readback  # noqa: E402
from trimprune.io import resume as resume_mod  # noqa: E402
from trimprune.io.evaluate import nll_of_windows  # noqa: E402


def cfg(**flat):
    return PruneConfig.from_flat(flat)


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
        for kw in [
            {},
            {"trim": True},
            {"trim": True, "trim_inputs": "last-token"},
            {"mask_structure": "2:4"},
            {"allocation": "owl"},
            {"allocation": "alphapruning", "alpha_cache_dir": "/tmp/ac"},
            {"trim": True, "trim_input_recalc": True},
            {"trim": True, "trim_precision": "tf32"},
            {"trim": True, "trim_precision": "bf16"},
        ]:
            m = make("llama").to(dev, dtype)
            t = time.perf_counter()
            res = prune(
                m,
                None,
                cfg(scorer=scorer, sparsity=0.5, nsamples=16, seqlen=64, **kw),
                calibration=ids,
                progress=False,
            )
            nll, n = nll_of_windows(m, ids[:4], 4)
            ok = math.isfinite(nll) and abs(res.global_sparsity - 0.5) < 0.02
            check(
                ok,
                f"{str(dtype):15} {scorer:10} {kw} sparsity {res.global_sparsity:.4f} nll/tok {nll / n:.3f} "
                f"{time.perf_counter() - t:.2f}s",
            )

a = make("llama")
b = make("llama").to(dev)
ra = prune(
    a,
    None,
    cfg(scorer="wanda", sparsity=0.6, nsamples=16, seqlen=64),
    calibration=ids,
    progress=False,
)
rb = prune(
    b,
    None,
    cfg(scorer="wanda", sparsity=0.6, nsamples=16, seqlen=64),
    calibration=ids,
    progress=False,
)
same = sum(torch.equal(ra.mask(k), rb.mask(k)) for k in ra.layers)
check(
    same >= len(ra.layers) - 1,
    f"float32 Wanda masks CPU == GPU for {same}/{len(ra.layers)} linears",
)

g = torch.Generator(device="cpu").manual_seed(0)
X = torch.randn(500, 64, generator=g).to(dev)
W = torch.randn(32, 64, generator=g).to(dev)
M = torch.rand(3, 32, 64, generator=g).to(dev) < 0.5
ge, ee = GramEvaluator(X.T @ X, 500), ExplicitEvaluator(X.T.contiguous())
ge.prepare(W)
ee.prepare(W)
for name in ["cosim_flat", "cosim_dim", "mse", "snr"]:
    x, y = layer_metric(name, ge.stats_from_mask(M)), layer_metric(name, ee.stats_from_mask(M))
    check(
        torch.allclose(x, y, rtol=1e-4, atol=1e-6),
        f"gram == explicit on GPU for {name}: {x.tolist()} {y.tolist()}",
    )

# the batched count path (prefix sums + fused select) on the GPU against explicit masks
ex = make_executor(dev)
Xs = torch.randn(2, 400, 96, generator=g).to(dev)
Ws = torch.randn(2, 48, 96, generator=g).to(dev)
Gs = Xs.transpose(1, 2) @ Xs
rk = torch.stack([row_ranks(Ws[p].abs() * Xs[p].norm(dim=0)) for p in range(2)])
k = torch.randint(0, 97, (2, 3, 48), generator=g).to(dev)
ge = GramSpec(400).build(Gs, ex)
ge.prepare(Ws)
fast = ge.stats_from_counts(k, rk)
slow = ge.stats_from_mask(rk.unsqueeze(1) < k.unsqueeze(-1))
for key in ["c", "q", "err"]:  # relative to the row's output energy: q = yy - 2c' + err cancels
    rel = ((getattr(fast, key) - getattr(slow, key)).abs() / (slow.yy + 1)).max().item()
    check(rel < 1e-5, f"count fast path == mask path on GPU ({key}): max rel. diff {rel:.1e}")
res = {}
for mode in ["parallel", "sequential"]:
    res[mode] = TrimSearch(TrimSettings(lr_search=mode), ex).run_many(
        GramSpec(400), Ws, Gs, rk, [0.5, 0.7], [48 * 48, 48 * 67]
    )
agree = sum(
    a.learning_rate == b.learning_rate and torch.equal(a.counts, b.counts)
    for a, b in zip(res["parallel"], res["sequential"])
)
check(
    agree == 2,
    f"TRIM lr search parallel (CUDA graph) == sequential on GPU: {agree}/2 linears, lrs "
    f"{[r.learning_rate for r in res['parallel']]} vs {[r.learning_rate for r in res['sequential']]}",
)

# graph replay on side streams (first use eager, second captured, third replayed) == the same executor
# with graphs off
eager = TrimSearch(TrimSettings(lr_search="parallel"), CudaExecutor(dev, graphs=False)).run_many(
    GramSpec(400), Ws, Gs, rk, [0.5, 0.7], [48 * 48, 48 * 67]
)
graphed = TrimSearch(TrimSettings(lr_search="parallel"), make_executor(dev))
for use in range(3):
    got = graphed.run_many(GramSpec(400), Ws, Gs, rk, [0.5, 0.7], [48 * 48, 48 * 67])
    same = all(
        torch.equal(a.counts, b.counts) and a.summary == b.summary for a, b in zip(eager, got)
    )
    check(
        same,
        f"TRIM search, use {use} of the graph cache (eager, capture, replay) == without graphs: {same}",
    )

# every registered fast path == its pure function
for fps in fastpaths.REGISTRY.values():
    for fp in fps:
        out = fastpaths.check(fp, dev)
        check(
            bool(out) and all(ok for ok, _ in out),
            f"fast path == pure function on GPU: {fp.name}: "
            f"{sum(ok for ok, _ in out)}/{len(out)}; {out[0][1]}",
        )

# deferred host copies (pinned staging, event) == eager copies
tens = {
    "a": torch.randn(5, 3, device=dev, dtype=torch.float64),
    "b": torch.arange(7, device=dev),
    "c": torch.tensor(True, device=dev),
    "d": torch.arange(11, device=dev, dtype=torch.uint8),
}
want = Executor().defer(tens, dict).result()
got = readback.stage(tens, dict).result()
check(
    all(torch.equal(got[n], want[n]) and got[n].dtype == want[n].dtype for n in want),
    "deferred host copies == eager host copies",
)

# the pipeline with prefix tables (default on CUDA) == forming E G per candidate (TRIMPRUNE_TRITON=0)

recs = {}
for flag in ["1", "0"]:
    os.environ["TRIMPRUNE_TRITON"] = flag
    r = prune(
        make("llama").to(dev),
        None,
        cfg(scorer="wanda", sparsity=0.6, nsamples=16, seqlen=64, trim=True, trim_precision="fp32"),
        calibration=ids,
        progress=False,
    )
    recs[flag] = {n: (rec.trim.search.lr, r.masks[n].cpu()) for n, rec in r.layers.items()}
os.environ["TRIMPRUNE_TRITON"] = "1"
same = sum(
    recs["1"][n][0] == recs["0"][n][0] and torch.equal(recs["1"][n][1], recs["0"][n][1])
    for n in recs["1"]
)
check(
    same >= len(recs["1"]) - 1,
    f"pipeline TRIM with prefix tables == with E G per candidate: {same}/{len(recs['1'])}"
    " linears (fp32; a near-tie may flip one)",
)

# the pipeline: CUDA-graph searches overlapping on side streams == the sequential search, linear by linear
recs = {}
for mode in ["parallel", "sequential"]:
    r = prune(
        make("llama").to(dev),
        None,
        cfg(
            scorer="wanda",
            sparsity=0.6,
            nsamples=16,
            seqlen=64,
            trim=True,
            trim_precision="fp32",
            trim_lr_search=mode,
        ),
        calibration=ids,
        progress=False,
    )
    recs[mode] = {n: (rec.trim.search.lr, r.masks[n].cpu()) for n, rec in r.layers.items()}
same = sum(
    recs["parallel"][n][0] == recs["sequential"][n][0]
    and torch.equal(recs["parallel"][n][1], recs["sequential"][n][1])
    for n in recs["parallel"]
)
check(
    same == len(recs["parallel"]),
    f"pipeline TRIM with overlapping graph searches == sequential search: "
    f"{same}/{len(recs['parallel'])} linears",
)

# nothing of a prune stays allocated on the GPU after it returns (graphs, statistics, records)
m = make("llama").to(dev)
used = []
for _ in range(3):
    prune(
        m,
        None,
        cfg(scorer="sparsegpt", sparsity=0.6, nsamples=16, seqlen=64, trim=True),
        calibration=ids,
        progress=False,
    )
    torch.cuda.synchronize()
    used.append(torch.cuda.memory_allocated(dev))
check(used[0] == used[1] == used[2], f"GPU memory allocated after 1, 2, 3 prunes: {used}")

# offloaded pruning (weights and activations in CPU memory, blocks visit the GPU, the next one copied
# ahead on a side stream; and with TRIMPRUNE_PREFETCH=0 the eager block moves) == resident pruning
# ("host activations": the hidden states kept in host memory, copied ahead and back on side streams)
recs, weights = {}, {}
OFFLOADED = ["offload", "offload, host activations", "offload, host activations, no prefetch"]
fits = trimprune.session.activations_fit
for run in ["resident", *OFFLOADED]:
    os.environ["TRIMPRUNE_PREFETCH"] = "0" if run.endswith("no prefetch") else "1"
    trimprune.session.activations_fit = (lambda *a, **k: False) if "host" in run else fits
    off = run != "resident"
    m = make("llama") if off else make("llama").to(dev)
    r = prune(
        m,
        None,
        cfg(scorer="sparsegpt", sparsity=0.6, nsamples=16, seqlen=64, trim=True, offload=off),
        calibration=ids,
        device=dev,
        progress=False,
    )
    recs[run] = {n: r.masks[n] for n in r.layers}
    weights[run] = {k: v.detach().cpu() for k, v in m.state_dict().items()}
os.environ["TRIMPRUNE_PREFETCH"] = "1"
trimprune.session.activations_fit = fits
for run in OFFLOADED:
    same = sum(torch.equal(recs["resident"][n], recs[run][n]) for n in recs["resident"])
    same_w = sum(torch.equal(weights["resident"][k], weights[run][k]) for k in weights["resident"])
    check(
        same == len(recs["resident"]) and same_w == len(weights["resident"]),
        f"{run} SparseGPT+TRIM prune == resident: {same}/{len(recs['resident'])} masks, "
        f"{same_w}/{len(weights['resident'])} tensors",
    )


def disk_offload_checks(dev, ids, resident_masks, resident_weights):
    """--offload disk (blocks read from safetensors on the I/O thread, pinned, copied ahead; pruned blocks
    written as shards) == resident pruning: masks and every weight of the written folder; the offloaded
    evaluation of the pruned model (streamed from the written shards) == the resident pruned model's."""
    from transformers import AutoModelForCausalLM

    from trimprune.io.diskmodel import load_disk_model
    from trimprune.io.export import StagedDir, write_outputs

    ref = make("llama")
    ref.load_state_dict(resident_weights)
    x_ref, _ = nll_of_windows(ref.to(dev), ids[:6], 3)
    with tempfile.TemporaryDirectory() as d:
        make("llama").save_pretrained(Path(d) / "src")
        for run in ["offload disk", "offload disk, no prefetch"]:
            os.environ["TRIMPRUNE_PREFETCH"] = "0" if run.endswith("no prefetch") else "1"
            m, storage = load_disk_model(str(Path(d) / "src"), torch.float32)
            out = Path(d) / run.replace(",", "").replace(" ", "-")
            with StagedDir(out) as staged:
                storage.write_to(staged.tmp)
                r = prune(
                    m,
                    None,
                    cfg(
                        scorer="sparsegpt",
                        sparsity=0.6,
                        nsamples=16,
                        seqlen=64,
                        trim=True,
                        offload="disk",
                    ),
                    calibration=ids,
                    storage=storage,
                    device=dev,
                    progress=False,
                )
                write_outputs(out, m, None, r, {}, staged=staged, storage=storage)
            written = AutoModelForCausalLM.from_pretrained(out).state_dict()
            same = sum(torch.equal(resident_masks[n], r.masks[n]) for n in resident_masks)
            same_w = sum(torch.equal(resident_weights[k], written[k]) for k in resident_weights)
            check(
                same == len(resident_masks) and same_w == len(resident_weights),
                f"{run} SparseGPT+TRIM prune == resident: {same}/{len(resident_masks)} masks, "
                f"{same_w}/{len(resident_weights)} tensors written",
            )
            x, _ = nll_of_windows(m, ids[:6], 3, device=dev, offload=True, storage=storage)
            check(
                abs(x - x_ref) / abs(x_ref) < 1e-5,
                f"{run}: eval of the written pruned model == resident ({x:.5f} vs {x_ref:.5f})",
            )
    os.environ["TRIMPRUNE_PREFETCH"] = "1"


disk_offload_checks(dev, ids, recs["resident"], weights["resident"])

m = make("gemma3").to(dev)
x1, _ = nll_of_windows(m, ids[:6], 3)
m.cpu()
x2, _ = nll_of_windows(m, ids[:6], 3, device=dev, offload=True)
check(abs(x1 - x2) / abs(x1) < 1e-5, f"offloaded eval == plain eval ({x1:.5f} vs {x2:.5f})")


# interrupted after block 1 (of 4) and resumed from the resume state == uninterrupted: weights, masks, records
class _Stop(Exception):
    pass


def _stop_after(k):
    def hook(block):
        if block == k:
            raise _Stop

    return hook


for dtype, off, kw in [
    (torch.float16, False, dict(scorer="wanda", trim=True)),
    (torch.bfloat16, False, dict(scorer="sparsegpt", allocation="owl")),
    (torch.float16, False, dict(scorer="sparsegpt", trim=True)),
    (torch.float32, True, dict(scorer="wanda", trim=True)),
]:
    flat = dict(kw, sparsity=0.6, nsamples=16, seqlen=64, offload=off)

    def fresh():
        m = make_llama(4, dtype=dtype)
        return m if off else m.to(dev)

    runs = []
    for _ in range(2):  # two uninterrupted runs: is the GPU run deterministic?
        m = fresh()
        runs.append((m, prune(m, None, cfg(**flat), calibration=ids, device=dev, progress=False)))
    with tempfile.TemporaryDirectory() as d:
        resume_mod._after_commit = _stop_after(1)
        try:
            prune(
                fresh(),
                None,
                cfg(**flat, checkpoint_dir=d),
                calibration=ids,
                device=dev,
                progress=False,
            )
        except _Stop:
            pass
        resume_mod._after_commit = lambda block: None
        m = fresh()
        res = prune(
            m,
            None,
            cfg(**flat, checkpoint_dir=d, resume=True),
            calibration=ids,
            device=dev,
            progress=False,
        )
    for label, (m0, r0) in [("resumed", (m, res)), ("rerun", runs[1])]:
        mr, rr = runs[0]
        w = all(
            torch.equal(a, b) for a, b in zip(mr.state_dict().values(), m0.state_dict().values())
        )
        mk = all(torch.equal(rr.masks[n], r0.masks[n]) for n in rr.masks)
        check(
            w and mk and rr.layers == r0.layers and rr.block_safeguard == r0.block_safeguard,
            f"{label} == uninterrupted, {str(dtype):15} offload={off} {kw}: weights {w}, masks {mk}, records "
            f"{rr.layers == r0.layers}"
            + (f", resumed_from_block {r0.resumed_from_block}" if label == "resumed" else ""),
        )
print("FAILURES:", fails)
sys.exit(1 if fails else 0)
