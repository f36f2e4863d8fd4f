"""Where a prune waits: host vs device time per phase of a block, without the profiler's host overhead.

    python benchmarks/block_timeline.py --model synthetic:smollm2-135m --trim all [--set FIELD=VALUE ...]

Records a CUDA event and the host clock at each phase boundary of every block (no synchronisation
added). For each phase it prints the mean host time and device time per block, and how often the
device had already caught up with the host when the phase ended (lag < 0.1 ms: the device was
waiting for the host, i.e. the phase is host-bound). With --busy, a second run under the CUDA-only
profiler gives the device's busy time (union of kernels and copies on all streams), hence its idle time.
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

from common import bench_model, config_overrides, machine, random_calibration  # noqa: E402

from trimprune import PruneConfig, prune  # noqa: E402
from trimprune import pipeline, trim  # noqa: E402
from trimprune.models import resolve_device, resolve_dtype  # noqa: E402

MARKS: list = []


def mark(label: str) -> None:
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    MARKS.append((label, time.perf_counter(), e))


def around(cls, attr, before=None, after=None):
    fn = getattr(cls, attr)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        if before:
            mark(before)
        out = fn(*a, **k)
        if after:
            mark(after)
        return out
    setattr(cls, attr, wrapped)


def instrument():
    BP, TS = pipeline.BlockPruner, trim.TrimSearch
    around(BP, "__call__", before="block start (recompute of the previous block queued)", after="block end")
    around(BP, "_collect", after="statistics forward queued")
    around(BP, "_trim", after="trim done (results on the host)")
    around(TS, "finish", before="searches launched, work meanwhile queued")
    around(BP, "_prune_group", after="masks / weights set (group)")
    around(BP, "_block_safeguard", after="block safeguard queued")


def instrument_fine():
    """More marks inside the search set-up (--fine)."""
    from trimprune import engine
    BP, TS = pipeline.BlockPruner, trim.TrimSearch
    around(BP, "_member", after="member copied")
    around(TS, "launch", after="search class launched")
    around(BP, "_flush", before="flush start", after="flush end")
    around(BP, "_base_outcomes", after="scorer-alone outcomes queued")
    around(engine, "forward_block_all", before="block forward start", after="block forward queued")


def analyse(marks, t_host0, e0):
    torch.cuda.synchronize()
    seg = defaultdict(lambda: [0.0, 0.0, 0, 0])
    prev = None
    for label, h, e in marks:
        hd = (h - t_host0) * 1e3
        dd = e0.elapsed_time(e)
        if prev is not None:
            key = f"{prev[0]} -> {label}"
            s = seg[key]
            s[0] += hd - prev[1]
            s[1] += dd - prev[2]
            s[2] += 1
            s[3] += (dd - hd) < 0.1
        prev = (label, hd, dd)
    return seg, prev[1], prev[2]


def busy_ms(prof) -> float:
    iv = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    tot, end = 0.0, -1
    for a, b in iv:
        if b <= end:
            continue
        tot += b - max(a, end)
        end = b
    return tot / 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:smollm2-135m")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--trim", default="all", help="none, all, last-token, sample:N")
    ap.add_argument("--trim-precision", default="tf32")
    ap.add_argument("--scorer", default="wanda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3, help="runs; the first is a warm-up and not reported")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a PruneConfig field (as prune_bench.py --set)")
    ap.add_argument("--busy", action="store_true", help="one more run under the CUDA-only profiler: device idle time")
    ap.add_argument("--fine", action="store_true", help="more marks inside the search set-up")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="one more run under cProfile: the N functions with the most host time")
    ap.add_argument("--callers", action="append", default=[], metavar="PATTERN",
                    help="with --cprofile: also who calls the functions matching PATTERN, and how long they take")
    args = ap.parse_args(argv)
    dev = resolve_device(None)
    if dev.type != "cuda":
        ap.error("needs a CUDA device")
    dtype = resolve_dtype(None, dev)
    model, tok = bench_model(args.model, args.gguf_file, dev, dtype, args.layers)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
    overrides = config_overrides(args.set, ap.error)
    t = args.trim

    def config():
        cfg = PruneConfig(scorer=args.scorer, sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen,
                          trim=t != "none", trim_inputs=t if t != "none" else "all", trim_precision=args.trim_precision)
        for f, v in overrides.items():
            setattr(cfg, f, v)
        return cfg

    instrument()
    if args.fine:
        instrument_fine()
    print(f"# {machine()} | {args.model} | {args.scorer} trim={t} {overrides} | calib {args.nsamples}x{args.seqlen}")
    for run in range(args.repeat):
        model.load_state_dict(state)
        torch.cuda.synchronize()
        MARKS.clear()
        e0 = torch.cuda.Event(enable_timing=True)
        e0.record()
        h0 = time.perf_counter()
        res = prune(model, None, config(), calib, progress=False)
        seg, host_end, dev_end = analyse(MARKS, h0, e0)
        print(f"run {run}: prune_seconds {res.timings['prune_seconds']:.3f}; last mark host {host_end:.1f} ms, "
              f"device {dev_end:.1f} ms")
        if run == 0 and args.repeat > 1:
            continue
        nb = max(1, sum(label == "block end" for label, _, _ in MARKS))
        print(f"    {'phase (mean per occurrence)':<100}{'host ms':>9}{'device ms':>11}{'starved':>9}"
              f"{'per block':>10}{'host ms/block':>14}")
        for k, (hs, ds, n, starved) in seg.items():
            print(f"    {k[:100]:<100}{hs / n:>9.2f}{ds / n:>11.2f}{starved / n:>9.0%}{n / nb:>10.1f}{hs / nb:>14.2f}")
    if args.busy:
        model.load_state_dict(state)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = prune(model, None, config(), calib, progress=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        b = busy_ms(prof)
        print(f"profiled run (CUDA activity only): wall {wall * 1e3:.0f} ms, device busy {b:.0f} ms, "
              f"idle {wall * 1e3 - b:.0f} ms")
    if args.cprofile:
        import cProfile
        import pstats
        model.load_state_dict(state)
        torch.cuda.synchronize()
        with cProfile.Profile() as cp:
            prune(model, None, config(), calib, progress=False)
        st = pstats.Stats(cp)
        st.sort_stats("tottime").print_stats(args.cprofile)
        st.sort_stats("cumulative").print_stats("trimprune", args.cprofile)
        for pat in args.callers:
            st.print_callers(pat)


if __name__ == "__main__":
    main()
