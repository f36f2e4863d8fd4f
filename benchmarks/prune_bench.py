"""Prune time and peak memory.

    python benchmarks/prune_bench.py --model smollm2-135m --scorer wanda --sparsity 0.5 --nsamples 128 --seqlen 2048
    python benchmarks/prune_bench.py --model synthetic:llama-8b --scorer wanda --trim --nsamples 128 --seqlen 2048

`synthetic:NAME` builds a random-weight Llama of that shape directly on the device (timing only;
random tokens as calibration). Each configuration is pruned --repeat times on fresh weights; the
first run includes CUDA warm-up, the table reports the best (and all) runs. Results are appended
as JSON lines to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Timer,
    append_jsonl,
    bench_dtype,
    bench_model,
    config_overrides,
    machine,
    peak_rss_gb,  # noqa: E402
    random_calibration,
)
from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.calib.data import get_calibration  # noqa: E402
from trimprune.io.models import resolve_device  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--layers", type=int, default=None, help="synthetic models: number of blocks")
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--dtype", default=None, help="default: what trimprune prune uses (printed and recorded)"
    )
    ap.add_argument("--scorer", action="append", default=None, help="repeatable (default wanda)")
    ap.add_argument(
        "--trim",
        default="none",
        help='comma list of none, all, last-token, sample:N ("both" = none,all,last-token)',
    )
    ap.add_argument(
        "--trim-precision", default="tf32", help="comma list of fp32, tf32, bf16 (trimmed runs)"
    )
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a PruneConfig field in every run (repeatable; VALUE as JSON, else a string), "
        "e.g. --set trim_iterations=1 --set trim_block_safeguard=false",
    )
    ap.add_argument("--out", default="benchmarks/results/prune_bench.jsonl")
    args = ap.parse_args(argv)
    overrides = config_overrides(args.set, ap.error)

    dev = resolve_device(args.device)
    dtype = bench_dtype(args.model, args.gguf_file, args.dtype, dev)
    t0 = time.perf_counter()
    model, tok = bench_model(args.model, args.gguf_file, dev, dtype, args.layers, args.offload)
    load_s = time.perf_counter() - t0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = dict(
        sparsity=args.sparsity,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        offload=args.offload,
    )
    if tok is None:
        calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
        calib_s = 0.0
    else:
        t1 = time.perf_counter()
        calib = get_calibration(PruneConfig.from_flat(base).calib, tok)
        calib_s = time.perf_counter() - t1
    spec = "none,all,last-token" if args.trim == "both" else args.trim
    trims = []
    for t in spec.split(","):
        if t == "none":
            trims.append((None, None))
        else:
            trims += [(t, p) for p in args.trim_precision.split(",")]
    print(
        f"# {machine()} | model {args.model} ({load_s:.1f} s load) | calib {args.nsamples}x{args.seqlen} "
        f"({calib_s:.2f} s data) | dtype {dtype}"
    )
    print(
        f"{'scorer':<10}{'trim':<16}{'run':>4}{'prune s':>10}{'per block s':>12}{'trim s':>9}{'peak GPU GB':>12}"
        f"{'peak RSS GB':>12}"
    )
    for scorer in args.scorer or ["wanda"]:
        for trim, prec in trims:
            for rep in range(args.repeat):
                model.load_state_dict(state)
                flat = base | {"scorer": scorer} | overrides
                if trim:
                    flat |= {"trim": True, "trim_inputs": trim, "trim_precision": prec}
                cfg = PruneConfig.from_flat(flat)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                with Timer() as t:
                    res = prune(model, tok, cfg, calibration=calib, device=dev, progress=False)
                nb = max(r.block for r in res.layers.values()) + 1
                rec = {
                    "machine": machine(),
                    "model": args.model,
                    "scorer": scorer,
                    "trim": trim or "none",
                    "trim_precision": prec,
                    "sparsity": args.sparsity,
                    "nsamples": args.nsamples,
                    "seqlen": args.seqlen,
                    "dtype": str(dtype),
                    "run": rep,
                    "offload": args.offload,
                    "prune_seconds": res.timings["prune_seconds"],
                    "allocation_seconds": res.timings.get("allocation_seconds"),
                    "wall_seconds": t.seconds,
                    "calibration_data_seconds": calib_s,
                    "per_block_seconds": res.timings["prune_seconds"] / nb,
                    "trim_search_seconds": res.timings["trim_search_seconds"],
                    "mask_and_update_seconds": res.timings["mask_and_update_seconds"],
                    "peak_gpu_gb": res.timings.get("peak_gpu_memory_gb"),
                    "peak_rss_gb": peak_rss_gb(),
                    "achieved_sparsity": res.global_sparsity,
                    "load_seconds": load_s,
                    "overrides": overrides,
                }
                append_jsonl(args.out, rec)
                print(
                    f"{scorer:<10}{(trim or 'none') + ('/' + prec if prec else ''):<16}{rep:>4}{rec['prune_seconds']:>10.2f}"
                    f"{rec['per_block_seconds']:>12.3f}{rec['trim_search_seconds']:>9.2f}"
                    f"{(rec['peak_gpu_gb'] or 0):>12.2f}{rec['peak_rss_gb']:>12.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
