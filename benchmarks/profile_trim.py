"""Where the time of a prune goes, phase by phase (each phase synchronised, exclusive times).

    python benchmarks/profile_trim.py --model synthetic:smollm2-135m --trim none,all,last-token
    python benchmarks/profile_trim.py --model synthetic:smollm2-135m --trim all --kernels 25

Wraps the pipeline's phases (statistics forward, TRIM search and its parts, mask/update, block
safeguard, recompute forward) with device synchronisation, so the numbers are per phase and not
skewed by asynchronous execution; the synchronisation itself adds a little to the total. With
--kernels N also prints the N most expensive CUDA kernels of one run (torch.profiler).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_model, machine, random_calibration  # noqa: E402

from trimprune import PruneConfig, prune  # noqa: E402
from trimprune import engine, pipeline, trim  # noqa: E402
from trimprune.models import resolve_device, resolve_dtype  # noqa: E402

TIMES: dict = defaultdict(float)
COUNTS: dict = defaultdict(int)
_stack: list = []


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase(name, fn, top_only=False):
    @functools.wraps(fn)
    def wrapped(*a, **k):
        if top_only and _stack:          # counted in the enclosing phase
            return fn(*a, **k)
        _sync()
        t0 = time.perf_counter()
        _stack.append(0.0)
        try:
            return fn(*a, **k)
        finally:
            _sync()
            dt = time.perf_counter() - t0
            child = _stack.pop()
            TIMES[name] += dt - child
            COUNTS[name] += 1
            if _stack:
                _stack[-1] += dt
    return wrapped


def instrument():
    BP = pipeline.BlockPruner
    for attr, name in [("_collect", "statistics forward"), ("_trim", "trim (other)"),
                       ("_prune_group", "mask/update + safeguard metric"), ("_block_safeguard", "block safeguard")]:
        setattr(BP, attr, phase(name, getattr(BP, attr)))
    TS = trim.TrimSearch
    # launches are not synchronised (the shape classes' searches overlap on side streams); their
    # device time shows up in "trim finish (wait for the searches, results)"
    TS.finish = phase("trim finish (wait for the searches, results)", TS.finish)
    pipeline.row_ranks = phase("row ranks", pipeline.row_ranks)
    pipeline.evaluator_source = phase("evaluator source", pipeline.evaluator_source)
    engine.forward_block_all = phase("block forward (recompute, dense guard stream)", engine.forward_block_all,
                                     top_only=True)
    engine.capture = phase("capture", engine.capture)
    pipeline.engine = engine


def label(name, fn):
    """Mark calls of fn as a named range in the profiler trace (no synchronisation)."""
    @functools.wraps(fn)
    def wrapped(*a, **k):
        with torch.profiler.record_function(name):
            return fn(*a, **k)
    return wrapped


def annotate():
    BP = pipeline.BlockPruner
    for attr in ["_collect", "_trim", "_prune_group", "_block_safeguard", "_record"]:
        setattr(BP, attr, label("trimprune::" + attr.strip("_"), getattr(BP, attr)))
    TS = trim.TrimSearch
    for attr in ["launch", "finish"]:
        setattr(TS, attr, label("trimprune::trim." + attr, getattr(TS, attr)))
    engine.forward_block_all = label("trimprune::forward_block_all", engine.forward_block_all)
    pipeline.engine = engine


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:smollm2-135m")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--trim", default="none,all,last-token")
    ap.add_argument("--trim-precision", default="tf32")
    ap.add_argument("--scorer", default="wanda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--kernels", type=int, default=0)
    ap.add_argument("--trace", default=None,
                    help="write a gzipped Chrome trace (host + device) of the last run to this path; phases "
                         "are then not synchronised, so the trace shows the real overlap")
    args = ap.parse_args(argv)
    dev = resolve_device(None)
    dtype = resolve_dtype(None, dev)
    model, _ = bench_model(args.model, args.gguf_file, dev, dtype, args.layers)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
    if args.trace:
        annotate()
    else:
        instrument()
    print(f"# {machine()} | {args.model} | {args.scorer} | calib {args.nsamples}x{args.seqlen} | {dtype}")
    for t in args.trim.split(","):
        for run in range(args.repeat):
            model.load_state_dict(state)
            TIMES.clear()
            COUNTS.clear()
            cfg = PruneConfig(scorer=args.scorer, sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen,
                              trim=t != "none", trim_inputs=t if t != "none" else "all",
                              trim_precision=args.trim_precision)
            prof = None
            last = run == args.repeat - 1 and t != "none" and torch.cuda.is_available()
            if last and args.trace:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
            elif last and args.kernels:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
            _sync()
            t0 = time.perf_counter()
            res = prune(model, None, cfg, calib, progress=False)
            _sync()
            total = time.perf_counter() - t0
            if prof is not None:
                prof.__exit__(None, None, None)
            parts = " | ".join(f"{k} {v:.3f}s/{COUNTS[k]}" for k, v in sorted(TIMES.items(), key=lambda kv: -kv[1]))
            print(f"trim={t} run={run} prune_seconds={res.timings['prune_seconds']:.3f} wall={total:.3f} :: {parts}")
            if prof is not None and args.trace:
                import gzip
                import os
                import tempfile
                tmp = tempfile.mktemp(suffix=".json")
                prof.export_chrome_trace(tmp)
                with open(tmp, "rb") as f, gzip.open(args.trace, "wb") as g:
                    g.write(f.read())
                os.unlink(tmp)
                print(f"trace: {args.trace}")
            elif prof is not None:
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels))


if __name__ == "__main__":
    main()
