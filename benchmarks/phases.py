"""Where a prune spends its time, phase by phase (the phases the pipeline names: capture, allocation,
block, statistics, trim search, masks, block safeguard, records, recompute).

    python benchmarks/phases.py --model synthetic:smollm2-135m --trim none,all --mode sync
    python benchmarks/phases.py --trim all --mode events           # host vs device per phase, no added syncs
    python benchmarks/phases.py --trim all --mode trace --trace t.json.gz [--kernels 20]

--mode sync: the device is synchronised at every phase boundary, so each phase's (exclusive) time
includes its device work. --mode events: a CUDA event at every boundary, nothing synchronised: per
phase the host time, the device time, and how often the device had caught up with the host when the
phase ended ("starved": the phase is host-bound). --mode trace: the last run under torch.profiler,
phases as `trimprune::<phase>` ranges (a Chrome trace with --trace, the top kernels with --kernels;
`trace_summary.py` sums a trace up per stream). --cprofile N: one more run under cProfile.
Random calibration tokens; the first run of each configuration includes warm-up and graph captures.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_dtype, bench_model, config_overrides, machine, random_calibration  # noqa: E402
from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.io.models import resolve_device  # noqa: E402


def sync_table(phases) -> str:
    return " | ".join(
        f"{k} {v:.3f}s/{phases.counts[k]}"
        for k, v in sorted(phases.totals.items(), key=lambda kv: -kv[1])
    )


def events_table(phases) -> list[str]:
    """Per segment between consecutive boundaries (named by the boundary that ends it): mean host and
    device ms, and the share of occurrences where the device had caught up with the host (< 0.1 ms)."""
    torch.cuda.synchronize()
    m0 = phases.marks[0]
    seg = defaultdict(lambda: [0.0, 0.0, 0, 0])
    prev = None
    for m in phases.marks:
        h, d = (m.host - m0.host) * 1e3, m0.event.elapsed_time(m.event)
        if prev is not None:
            s = seg[f"{m.phase} {m.edge}"]
            s[0] += h - prev[0]
            s[1] += d - prev[1]
            s[2] += 1
            s[3] += (d - h) < 0.1
        prev = (h, d)
    blocks = max(1, phases.counts.get("block", 0))
    out = [
        f"    {'segment ending at':<28}{'host ms':>9}{'device ms':>11}{'starved':>9}{'per block':>10}"
        f"{'host ms/block':>14}"
    ]
    for k, (hs, ds, n, starved) in seg.items():
        out.append(
            f"    {k:<28}{hs / n:>9.2f}{ds / n:>11.2f}{starved / n:>9.0%}{n / blocks:>10.1f}{hs / blocks:>14.2f}"
        )
    out.append(f"    last boundary: host {prev[0]:.1f} ms, device {prev[1]:.1f} ms after the first")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="synthetic:smollm2-135m")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--layers", type=int, default=None, help="synthetic models: number of blocks")
    ap.add_argument("--dtype", default=None, help="default: what trimprune prune uses (printed)")
    ap.add_argument(
        "--trim", default="none,all", help="comma list of none, all, last-token, sample:N"
    )
    ap.add_argument("--trim-precision", default="tf32")
    ap.add_argument("--scorer", default="wanda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mode", choices=["time", "sync", "events", "trace"], default="sync")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a PruneConfig field (as prune_bench.py --set)",
    )
    ap.add_argument(
        "--trace",
        default=None,
        help="--mode trace: write the last run's Chrome trace here (.json.gz)",
    )
    ap.add_argument(
        "--kernels",
        type=int,
        default=0,
        help="--mode trace: print the N kernels with most device time",
    )
    ap.add_argument(
        "--cprofile",
        type=int,
        default=0,
        metavar="N",
        help="one more run under cProfile: the N functions with the most host time",
    )
    args = ap.parse_args(argv)
    dev = resolve_device(None)
    dtype = bench_dtype(args.model, args.gguf_file, args.dtype, dev)
    model, _ = bench_model(args.model, args.gguf_file, dev, dtype, args.layers)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
    overrides = config_overrides(args.set, ap.error)
    print(
        f"# {machine()} | {args.model} | {args.scorer} {overrides} | calib {args.nsamples}x{args.seqlen} | {dtype} "
        f"| mode {args.mode}"
    )
    for t in args.trim.split(","):
        cfg = PruneConfig.from_flat(
            dict(
                scorer=args.scorer,
                sparsity=0.5,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                trim=t != "none",
                trim_inputs=t if t != "none" else "all",
                trim_precision=args.trim_precision,
            )
            | overrides
        )
        for run in range(args.repeat):
            model.load_state_dict(state)
            last = run == args.repeat - 1
            prof = None
            if last and args.mode == "trace" and dev.type == "cuda":
                prof = torch.profiler.profile(
                    activities=[
                        torch.profiler.ProfilerActivity.CPU,
                        torch.profiler.ProfilerActivity.CUDA,
                    ]
                )
                prof.__enter__()
            t0 = time.perf_counter()
            res = prune(model, None, cfg, calib, progress=False, profile=args.mode)
            wall = time.perf_counter() - t0
            if prof is not None:
                prof.__exit__(None, None, None)
            print(
                f"trim={t} run={run} prune_seconds={res.timings['prune_seconds']:.3f} wall={wall:.3f}"
            )
            if args.mode in ("sync", "time", "trace"):
                print("    " + sync_table(res.phases))
            elif args.mode == "events" and (run > 0 or args.repeat == 1):
                print("\n".join(events_table(res.phases)))
            if prof is not None and args.trace:
                prof.export_chrome_trace(args.trace)
                print(f"trace: {args.trace}")
            if prof is not None and args.kernels:
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels))
    if args.cprofile:
        import cProfile
        import pstats

        model.load_state_dict(state)
        with cProfile.Profile() as cp:
            prune(model, None, cfg, calib, progress=False)
        st = pstats.Stats(cp)
        st.sort_stats("tottime").print_stats(args.cprofile)
        st.sort_stats("cumulative").print_stats("trimprune", args.cprofile)


if __name__ == "__main__":
    main()
