"""Offloaded pruning against resident pruning, random-weight Llama shapes.

1. 8B shape (`--model`): Wanda with offload under a GPU memory cap of a quarter of the model's weight bytes
   (`torch.cuda.set_per_process_memory_fraction`), then resident (no cap) with the same batch size and with
   the automatic one. The masks of every capped offloaded run must equal the resident run's of the same
   batch size. `--offload` picks the offloaded runs: `cpu` (weights in pinned host memory), `disk` (the
   model is first saved as safetensors shards into a temporary folder; the prune reads each block from
   there and writes the pruned blocks to an output folder beside it, completed as a Hugging Face folder:
   the timings include that write) or `both`. Peak host memory is the resident set's high-water mark
   during each run (Linux), beside the resident set before it.
2. 70B shape (optional, `--big-blocks N`): Wanda with offload on N blocks: seconds per block, peak GPU
   and host memory.

    python benchmarks/offload_bench.py --offload both --out benchmarks/results/h200_offload.jsonl
    python benchmarks/offload_bench.py --model llama-tiny --offload both --nsamples 8 --seqlen 128 --device cpu \\
        --out /tmp/offload.jsonl              # a quick check of the script on CPU (no cap there)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    SYNTHETIC,
    append_jsonl,
    machine,
    peak_rss_gb,
    random_calibration,
    reset_rss_peak,  # noqa: E402
    rss_gb,
    synthetic_model,
)
from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.exec.offload import pin  # noqa: E402
from trimprune.io.diskmodel import load_disk_model  # noqa: E402
from trimprune.io.export import StagedDir, write_outputs  # noqa: E402


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(
    model, calib, flat: dict, dev: torch.device, output: Path | None = None, storage=None
) -> tuple[dict, object]:
    """One prune; with `output` (a model loaded with offload disk, `storage` its blocks) its blocks are
    written there as they finish and the folder is completed at the end (`write_seconds`)."""
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = rss_gb()
    hwm = reset_rss_peak()
    t = time.perf_counter()
    write = 0.0
    if output is None:
        res = prune(
            model, None, PruneConfig.from_flat(flat), calibration=calib, device=dev, progress=False
        )
    else:
        with StagedDir(output, overwrite=True) as staged:
            storage.write_to(staged.tmp)
            res = prune(
                model,
                None,
                PruneConfig.from_flat(flat),
                calibration=calib,
                storage=storage,
                device=dev,
                progress=False,
            )
            t_write = time.perf_counter()
            write_outputs(output, model, None, res, {}, staged=staged, storage=storage)
            write = time.perf_counter() - t_write
    if cuda:
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t
    nb = max(r.block for r in res.layers.values()) + 1
    return {
        "prune_seconds": res.timings["prune_seconds"],
        "wall_seconds": wall,
        "write_seconds": write,
        "per_block_seconds": res.timings["prune_seconds"] / nb,
        "blocks": nb,
        "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
        "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else None,
        "rss_before_gb": rss_before,
        "peak_rss_run_gb": rss_gb("VmHWM") if hwm else None,
        "peak_rss_gb": peak_rss_gb(),
        "achieved_sparsity": res.global_sparsity,
    }, res


def _gb(x) -> str:
    return "   -  " if x is None else f"{x:6.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="llama-8b", choices=sorted(SYNTHETIC))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="of the capped runs and the resident run they are compared with",
    )
    ap.add_argument(
        "--cap", type=float, default=0.25, help="GPU memory cap as a fraction of the weight bytes"
    )
    ap.add_argument(
        "--offload",
        choices=["cpu", "disk", "both"],
        default="cpu",
        help="the offloaded runs: weights in pinned host memory (cpu), read from safetensors (disk)",
    )
    ap.add_argument(
        "--device", default=None, help="cuda (default when there is one) or cpu (no cap)"
    )
    ap.add_argument(
        "--tmp-dir",
        default=None,
        help="folder for the saved model and the disk run's output "
        "(default: a new temporary folder, removed at the end)",
    )
    ap.add_argument(
        "--skip-auto", action="store_true", help="no resident run with the automatic batch size"
    )
    ap.add_argument(
        "--compare-serial",
        action="store_true",
        help="also the capped cpu-offload run with the "
        "hidden-state batches copied on the compute stream (not overlapped)",
    )
    ap.add_argument(
        "--big-blocks",
        type=int,
        default=0,
        help="also the 70B shape with this many blocks (cpu offload)",
    )
    ap.add_argument("--out", default="benchmarks/results/offload.jsonl")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    kinds = ["cpu", "disk"] if args.offload == "both" else [args.offload]
    base = {"scorer": "wanda", "sparsity": 0.5, "nsamples": args.nsamples, "seqlen": args.seqlen}
    t0 = time.perf_counter()
    model, _ = synthetic_model(
        args.model, dev, dtype
    )  # made on the compute device (fast), kept in host memory
    model.to("cpu")
    pin_s = 0.0
    if cuda:
        torch.cuda.empty_cache()
        t1 = time.perf_counter()
        pin(model)  # as load_model(..., offload="cpu") does on a GPU machine
        pin_s = time.perf_counter() - t1
    calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
    wb = weight_bytes(model)
    print(
        f"# {machine()} | {args.model} {wb / 2**30:.2f} GiB of weights, built in {time.perf_counter() - t0:.0f} s "
        f"| weights pinned in {pin_s:.1f} s | calib {args.nsamples}x{args.seqlen} | prefetch "
        f"{os.environ.get('TRIMPRUNE_PREFETCH', '1')}",
        flush=True,
    )
    own_tmp = args.tmp_dir is None
    tmp = Path(tempfile.mkdtemp(prefix="offload-bench-") if own_tmp else args.tmp_dir)
    try:
        saved = None
        if "disk" in kinds:
            t0 = time.perf_counter()
            saved = tmp / "model"
            model.save_pretrained(saved, max_shard_size="4GB")
            print(
                f"# saved as safetensors to {saved} in {time.perf_counter() - t0:.0f} s", flush=True
            )
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rows, masks = [], {}
        cap = args.cap * wb if cuda else None
        for kind in kinds:
            if cuda:
                total = torch.cuda.get_device_properties(dev).total_memory
                torch.cuda.set_per_process_memory_fraction(cap / total, dev)
            flat = base | {"offload": kind, "batch_size": args.batch_size}
            if kind == "disk":
                disk_model, storage = load_disk_model(str(saved), dtype)
                rec, res = run(disk_model, calib, flat, dev, output=tmp / "pruned", storage=storage)
            else:
                model.load_state_dict(state)
                rec, res = run(model, calib, flat, dev)
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, dev)
            rows.append((f"offload {kind}" + (", capped" if cuda else ""), args.batch_size, rec))
            masks[kind] = res.masks
            if (
                kind == "cpu" and cuda and args.compare_serial
            ):  # hidden-state batches moved on the compute stream
                from trimprune.exec.executor import CudaExecutor

                moves = CudaExecutor._moves
                CudaExecutor._moves = lambda self, device: False
                torch.cuda.set_per_process_memory_fraction(cap / total, dev)
                try:
                    model.load_state_dict(state)
                    rec, serial = run(model, calib, flat, dev)
                finally:
                    CudaExecutor._moves = moves
                    torch.cuda.set_per_process_memory_fraction(1.0, dev)
                rec["masks_equal_overlapped"] = all(
                    torch.equal(serial.masks[k], res.masks[k]) for k in res.masks
                )
                rows.append(("offload cpu, capped, batches not overlapped", args.batch_size, rec))
        model.load_state_dict(state)
        model.to(dev)
        rec, same = run(model, calib, base | {"batch_size": args.batch_size}, dev)
        rows.append(("resident", args.batch_size, rec))
        equal = {
            k: set(same.masks) == set(m)
            and all(torch.equal(same.masks[n], m[n]) for n in same.masks)
            for k, m in masks.items()
        }
        if not args.skip_auto:
            model.load_state_dict(state)
            rec, _ = run(model, calib, base, dev)
            rows.append(("resident", "auto", rec))
        for run_name, bs, rec in rows:
            kind = (
                run_name.split(",")[0].removeprefix("offload ")
                if run_name.startswith("offload")
                else None
            )
            append_jsonl(
                args.out,
                {
                    "machine": machine(),
                    "model": args.model,
                    "run": run_name,
                    "batch_size": bs,
                    "cap_gb": cap / 2**30 if kind and cuda else None,
                    "weights_gb": wb / 2**30,
                    "pin_seconds": pin_s,
                    "masks_equal_resident": equal.get(kind) if kind else None,
                    **rec,
                    "nsamples": args.nsamples,
                    "seqlen": args.seqlen,
                    "scorer": "wanda",
                },
            )
            print(
                f"{args.model:<11}{run_name:<22}batch {str(bs):<6}prune {rec['prune_seconds']:8.2f} s  "
                f"write {rec['write_seconds']:6.2f} s  peak GPU {_gb(rec['peak_gpu_gb'])} GiB (reserved "
                f"{_gb(rec['peak_gpu_reserved_gb'])})  RSS before {_gb(rec['rss_before_gb'])} GiB, peak in the "
                f"run {_gb(rec['peak_rss_run_gb'])} GiB",
                flush=True,
            )
        resident = next(r for n, _, r in rows if n == "resident")
        for kind, ok in equal.items():
            r = next(r for n, _, r in rows if n.startswith(f"offload {kind}"))
            print(
                f"# offloaded ({kind}) masks equal the resident run's (batch {args.batch_size}): {ok}; time ratio "
                f"{r['prune_seconds'] / resident['prune_seconds']:.2f}x",
                flush=True,
            )
        del model, state, same
        if cuda:
            torch.cuda.empty_cache()
    finally:
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    if args.big_blocks:
        t0 = time.perf_counter()
        big, _ = synthetic_model("llama-70b", dev, dtype, args.big_blocks)
        big.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
            pin(big)
        calib = random_calibration(big.config.vocab_size, args.nsamples, args.seqlen)
        print(
            f"# llama-70b shape, {args.big_blocks} blocks, {weight_bytes(big) / 2**30:.1f} GiB, built in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        rec, _ = run(big, calib, base | {"offload": "cpu"}, dev)
        append_jsonl(
            args.out,
            {
                "machine": machine(),
                "model": "llama-70b",
                "run": "offload cpu",
                "batch_size": "auto",
                "weights_gb": weight_bytes(big) / 2**30,
                **rec,
                "extrapolated_80_blocks_seconds": rec["per_block_seconds"] * 80,
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "scorer": "wanda",
            },
        )
        print(
            f"llama-70b  offload {args.big_blocks} blocks: {rec['per_block_seconds']:.2f} s / block -> "
            f"{rec['per_block_seconds'] * 80 / 60:.1f} min for 80; peak GPU {_gb(rec['peak_gpu_gb'])} GiB, "
            f"RSS {rec['peak_rss_gb']:.1f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
