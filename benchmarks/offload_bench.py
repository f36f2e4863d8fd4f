"""Offloaded pruning against resident pruning on one GPU, random-weight Llama shapes.

1. 8B shape: Wanda with `offload` under a GPU memory cap of a quarter of the model's weight bytes
   (`torch.cuda.set_per_process_memory_fraction`), then resident (no cap) with the same batch size
   and with the automatic one. The masks of the capped offloaded run must equal the resident run's
   of the same batch size.
2. 70B shape (optional, `--big-blocks N`): Wanda with offload on N blocks: seconds per block, peak GPU
   and host memory.

    python benchmarks/offload_bench.py --out benchmarks/results/h200_offload.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SYNTHETIC, append_jsonl, machine, peak_rss_gb, random_calibration, synthetic_model  # noqa: E402

from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.exec.offload import pin  # noqa: E402


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(model, calib, flat: dict, dev: torch.device) -> tuple[dict, object]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    res = prune(model, None, PruneConfig.from_flat(flat), calibration=calib, device=dev, progress=False)
    torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t
    nb = max(r.block for r in res.layers.values()) + 1
    return {"prune_seconds": res.timings["prune_seconds"], "wall_seconds": wall,
            "per_block_seconds": res.timings["prune_seconds"] / nb, "blocks": nb,
            "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 2**30,
            "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(dev) / 2**30, "peak_rss_gb": peak_rss_gb(),
            "achieved_sparsity": res.global_sparsity}, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b", choices=sorted(SYNTHETIC))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4, help="of the capped run and the resident run it is "
                    "compared with")
    ap.add_argument("--cap", type=float, default=0.25, help="GPU memory cap as a fraction of the weight bytes")
    ap.add_argument("--skip-auto", action="store_true", help="no resident run with the automatic batch size")
    ap.add_argument("--compare-serial", action="store_true", help="also the capped run with the hidden-state "
                    "batches copied on the compute stream (not overlapped)")
    ap.add_argument("--big-blocks", type=int, default=0, help="also the 70B shape with this many blocks")
    ap.add_argument("--out", default="benchmarks/results/offload.jsonl")
    args = ap.parse_args(argv)
    dev = torch.device("cuda", 0)
    dtype = torch.bfloat16
    base = {"scorer": "wanda", "sparsity": 0.5, "nsamples": args.nsamples, "seqlen": args.seqlen}
    t0 = time.perf_counter()
    model, _ = synthetic_model(args.model, dev, dtype)      # made on the GPU (fast), then kept in host memory
    model.to("cpu")
    torch.cuda.empty_cache()
    t1 = time.perf_counter()
    pin(model)                  # as load_model(..., offload=True) does on a GPU machine
    pin_s = time.perf_counter() - t1
    calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
    wb = weight_bytes(model)
    total = torch.cuda.get_device_properties(dev).total_memory
    print(f"# {machine()} | {args.model} {wb / 2**30:.1f} GiB of weights, built in {time.perf_counter() - t0:.0f} s "
          f"| weights pinned in {pin_s:.1f} s | calib {args.nsamples}x{args.seqlen} | prefetch "
          f"{os.environ.get('TRIMPRUNE_PREFETCH', '1')}", flush=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []

    cap = args.cap * wb
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    rec, capped = run(model, calib, base | {"offload": True, "batch_size": args.batch_size}, dev)
    rows.append(("offload, capped", args.batch_size, rec))
    if args.compare_serial:          # the same with the hidden-state batches moved on the compute stream
        from trimprune.exec.executor import CudaExecutor

        moves = CudaExecutor._moves
        CudaExecutor._moves = lambda self, device: False
        try:
            model.load_state_dict(state)
            rec, serial = run(model, calib, base | {"offload": True, "batch_size": args.batch_size}, dev)
        finally:
            CudaExecutor._moves = moves
        rec["masks_equal_overlapped"] = all(torch.equal(serial.masks[k], capped.masks[k]) for k in capped.masks)
        rows.append(("offload, capped, batches not overlapped", args.batch_size, rec))
    torch.cuda.set_per_process_memory_fraction(1.0, dev)
    model.load_state_dict(state)
    model.to(dev)
    resident, same = run(model, calib, base | {"batch_size": args.batch_size}, dev)
    rows.append(("resident", args.batch_size, resident))
    equal = set(same.masks) == set(capped.masks) and all(torch.equal(same.masks[k], capped.masks[k]) for k in same.masks)
    if not args.skip_auto:
        model.load_state_dict(state)
        rec, _ = run(model, calib, base, dev)
        rows.append(("resident", "auto", rec))
    for run_name, bs, rec in rows:
        append_jsonl(args.out, {"machine": machine(), "model": args.model, "run": run_name, "batch_size": bs,
                                "cap_gb": cap / 2**30 if run_name.endswith("capped") else None,
                                "weights_gb": wb / 2**30, "pin_seconds": pin_s, "masks_equal_resident": equal, **rec,
                                "nsamples": args.nsamples, "seqlen": args.seqlen, "scorer": "wanda"})
        print(f"{args.model:<10}{run_name:<18}batch {str(bs):<6}prune {rec['prune_seconds']:8.2f} s  "
              f"peak GPU {rec['peak_gpu_gb']:6.2f} GiB (reserved {rec['peak_gpu_reserved_gb']:6.2f})  "
              f"RSS {rec['peak_rss_gb']:6.1f} GiB", flush=True)
    print(f"# capped offloaded masks equal the resident run's (batch {args.batch_size}): {equal}; "
          f"time ratio {rows[0][2]['prune_seconds'] / resident['prune_seconds']:.2f}x", flush=True)
    del model, state, same, capped
    torch.cuda.empty_cache()

    if args.big_blocks:
        t0 = time.perf_counter()
        big, _ = synthetic_model("llama-70b", dev, dtype, args.big_blocks)
        big.to("cpu")
        torch.cuda.empty_cache()
        pin(big)
        calib = random_calibration(big.config.vocab_size, args.nsamples, args.seqlen)
        print(f"# llama-70b shape, {args.big_blocks} blocks, {weight_bytes(big) / 2**30:.1f} GiB, built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        rec, _ = run(big, calib, base | {"offload": True}, dev)
        append_jsonl(args.out, {"machine": machine(), "model": "llama-70b", "run": "offload", "batch_size": "auto",
                                "weights_gb": weight_bytes(big) / 2**30, **rec, "extrapolated_80_blocks_seconds":
                                rec["per_block_seconds"] * 80, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                "scorer": "wanda"})
        print(f"llama-70b  offload {args.big_blocks} blocks: {rec['per_block_seconds']:.2f} s / block -> "
              f"{rec['per_block_seconds'] * 80 / 60:.1f} min for 80; peak GPU {rec['peak_gpu_gb']:.2f} GiB, "
              f"RSS {rec['peak_rss_gb']:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
