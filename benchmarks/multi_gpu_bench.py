"""Pruning on 1 and on N GPUs of one machine (`torchrun`, NCCL), random-weight Llama shapes.

    python benchmarks/multi_gpu_bench.py --gpus 1,2 --model llama-8b --out benchmarks/results/h200x2_multi.jsonl
    python benchmarks/multi_gpu_bench.py --gpus 1,2 --model llama-70b --layers 4 --offload --config wanda

The driver starts `torchrun --standalone --nproc-per-node N` on this script once for each N of --gpus;
every worker builds the same random weights (seeded) on its GPU, takes the same random calibration
tokens (each rank prunes on its share), and runs each configuration of --config once after a short
warm-up prune (CUDA, cuBLAS and NCCL initialisation):

- floor: the two calibration forwards per block of a prune (statistics pass without statistics, then
  the recompute), nothing else: what no layer-sequential prune can go below;
- wanda, wanda+trim (TRIM, all tokens), wanda+trim-last (TRIM on each sequence's last token),
  sparsegpt, sparsegpt+trim.

Rank 0 appends one JSON line per configuration: prune seconds, peak GPU memory and host RSS of every
rank, every rank's phase totals, and (with --breakdown, on N > 1) a second run where every collective
synchronises the GPU before and after it, so that its time is the transfer plus the wait for the
slowest rank (the load imbalance of the per-linear work split). `--cap-gb G` adds a run of the first
configuration on one GPU capped at G GiB (`torch.cuda.set_per_process_memory_fraction`), batch size
automatic. The driver prints the table with the speed-up of N GPUs over one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SYNTHETIC,
    append_jsonl,
    machine,
    peak_rss_gb,
    random_calibration,
    synthetic_model,
)
from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.core.model import ModelAdapter  # noqa: E402
from trimprune.core.ranks import Ranks  # noqa: E402
from trimprune.engine.capture import capture
from trimprune.engine.walk import Streams, walk  # noqa: E402
from trimprune.exec import make_executor  # noqa: E402
from trimprune.exec.distributed import init_from_env, launched, shutdown  # noqa: E402
from trimprune.exec.offload import pin  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gpu_gb(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0


CONFIGS = {
    "floor": {"scorer": "wanda"},
    "wanda": {"scorer": "wanda"},
    "wanda+trim": {"scorer": "wanda", "trim": True, "trim_inputs": "all"},
    "wanda+trim-last": {"scorer": "wanda", "trim": True, "trim_inputs": "last-token"},
    "sparsegpt": {"scorer": "sparsegpt"},
    "sparsegpt+trim": {"scorer": "sparsegpt", "trim": True, "trim_inputs": "all"},
}


def floor(
    model, calib: torch.Tensor, config: PruneConfig, dev: torch.device, offload: bool
) -> float:
    """Seconds of the capture and two forwards of every block over this rank's share (no statistics,
    no pruning): the same batches and streams as `prune`."""
    from trimprune.session import activations_fit, auto_batch_size

    ranks = Ranks.current()
    adapter = ModelAdapter.from_model(model)
    ids = calib[ranks.share(calib.shape[0])]
    bs = auto_batch_size(adapter, config, dev, next(model.parameters()).dtype)
    batches = list(ids.split(bs, 0))
    ex = make_executor(dev, "time")
    sync(dev)
    t = time.perf_counter()
    try:
        on_dev = offload and activations_fit(
            adapter, ids.shape[0], 0, ids.shape[1], dev, next(model.parameters()).dtype
        )
        captured = capture(
            model, adapter, batches, dev, offload=offload, ex=ex, ranks=ranks, keep_on_device=on_dev
        )
        with torch.no_grad():
            walk(
                adapter,
                captured,
                Streams(captured.hidden),
                lambda run: run.forward(run.streams.main, keep_outputs=False),
                offload=offload,
                progress=False,
                ex=ex,
            )
    finally:
        ex.close()
    sync(dev)
    return time.perf_counter() - t


class CollectiveTimer:
    """Wraps `Ranks`' collectives: the GPU is synchronised before and after each, its time is summed by
    kind (the transfer plus the wait for the slowest rank)."""

    KINDS = {
        "sum_": "all-reduce",
        "sum_int": "all-reduce",
        "counts": "all-gather",
        "broadcast_": "broadcast",
        "cat": "all-gather",
        "gather": "gather objects",
        "barrier": "barrier",
    }

    def __init__(self, dev):
        self.dev, self.seconds, self.calls, self.saved = (
            dev,
            defaultdict(float),
            defaultdict(int),
            {},
        )

    def __enter__(self):
        depth = [0]
        for name, kind in self.KINDS.items():
            orig = getattr(Ranks, name)
            self.saved[name] = orig

            def timed(*a, _orig=orig, _kind=kind, **kw):
                if depth[0]:  # nested (cat -> counts): counted by the outer call
                    return _orig(*a, **kw)
                depth[0] += 1
                sync(self.dev)
                t = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    sync(self.dev)
                    self.seconds[_kind] += time.perf_counter() - t
                    self.calls[_kind] += 1
                    depth[0] -= 1

            setattr(Ranks, name, timed)
        return self

    def __exit__(self, *a):
        for name, orig in self.saved.items():
            setattr(Ranks, name, orig)


def one_run(model, state, calib, name: str, flat: dict, dev, profile: str = "time") -> dict:
    model.load_state_dict(state)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    Ranks.current().barrier()
    sync(dev)
    t = time.perf_counter()
    if name == "floor":
        secs = floor(model, calib, PruneConfig.from_flat(flat), dev, flat.get("offload", False))
        phases, sparsity = {}, 0.0
    else:
        res = prune(
            model,
            None,
            PruneConfig.from_flat(flat),
            calibration=calib,
            device=dev,
            progress=False,
            profile=profile,
        )
        secs, phases, sparsity = (
            res.timings["prune_seconds"],
            dict(res.phases.totals),
            res.global_sparsity,
        )
    sync(dev)
    Ranks.current().barrier()
    return {
        "prune_seconds": secs,
        "wall_seconds": time.perf_counter() - t,
        "phases": phases,
        "achieved_sparsity": sparsity,
        "peak_gpu_gb": peak_gpu_gb(dev),
        "peak_rss_gb": peak_rss_gb(),
    }


def worker(args) -> None:
    dev = (
        torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    )  # CPU: a smoke test (gloo)
    if launched():
        dev = init_from_env(torch.device("cuda") if dev.type == "cuda" else dev)
    ranks = Ranks.current()
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    model, _ = synthetic_model(args.model, dev, dtype, args.layers)
    if args.offload and dev.type == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()
        pin(model)  # as load_model(..., offload=True) does on a GPU machine
    state = {
        k: v.to("cpu", copy=True) for k, v in model.state_dict().items()
    }  # host copy: restores weights
    build = time.perf_counter() - t0
    calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
    nblocks = model.config.num_hidden_layers
    base = {
        "sparsity": args.sparsity,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "offload": args.offload,
    }
    if args.batch_size:
        base["batch_size"] = args.batch_size
    if ranks.main:
        print(
            f"# {machine()} | {ranks.world} GPU(s) | {args.model} {nblocks} blocks, built in {build:.0f} s | calib "
            f"{args.nsamples}x{args.seqlen} | offload {args.offload}",
            flush=True,
        )
    warm = base | {"scorer": "wanda", "nsamples": 2 * ranks.world, "batch_size": 1}
    one_run(model, state, calib[: 2 * ranks.world], "wanda", warm, dev)

    def record(name: str, rec: dict, extra: dict) -> None:
        per_rank = ranks.gather(rec)
        if ranks.main:
            out = {
                "machine": machine(),
                "gpus": ranks.world,
                "model": args.model,
                "blocks": nblocks,
                "config": name,
                "sparsity": args.sparsity,
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "dtype": str(dtype),
                "offload": args.offload,
                **extra,
                "prune_seconds": max(r["prune_seconds"] for r in per_rank),
                "per_block_seconds": max(r["prune_seconds"] for r in per_rank) / nblocks,
                "peak_gpu_gb": [r["peak_gpu_gb"] for r in per_rank],
                "peak_rss_gb": [r["peak_rss_gb"] for r in per_rank],
                "achieved_sparsity": per_rank[0]["achieved_sparsity"],
                "phases": [r["phases"] for r in per_rank],
            }
            append_jsonl(args.out, out)
            ph = per_rank[0]["phases"]
            top = ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1])[:5]
            )
            print(
                f"{name:<16}{str(extra.get('run', '')):<12}{out['prune_seconds']:8.2f} s  peak GPU "
                f"{max(out['peak_gpu_gb']):6.1f} GiB  RSS {max(out['peak_rss_gb']):6.1f} GiB  | rank 0: {top}",
                flush=True,
            )

    for name in args.config:
        flat = base | CONFIGS[name]
        record(name, one_run(model, state, calib, name, flat, dev), {"run": "timed"})
        if args.breakdown and ranks.parallel and name != "floor":
            with CollectiveTimer(dev) as ct:
                rec = one_run(model, state, calib, name, flat, dev, profile="sync")
            rec["collectives"] = dict(ct.seconds)
            rec["collective_calls"] = dict(ct.calls)
            per_rank = ranks.gather(rec["collectives"])
            record(name, rec, {"run": "breakdown", "collectives": per_rank})
            if ranks.main:
                for r, c in enumerate(per_rank):
                    print(
                        f"    rank {r} collectives (synchronised, incl. waiting): "
                        + ", ".join(
                            f"{k} {v:.2f} s" for k, v in sorted(c.items(), key=lambda kv: -kv[1])
                        ),
                        flush=True,
                    )
    if args.cap_gb and not ranks.parallel and dev.type == "cuda":
        name = args.config[0] if args.config[0] != "floor" else "wanda"
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total, dev)
        flat = {k: v for k, v in (base | CONFIGS[name]).items() if k != "batch_size"}
        try:
            rec = one_run(model, state, calib, name, flat, dev)
            record(name, rec, {"run": f"cap {args.cap_gb:g} GiB", "cap_gb": args.cap_gb})
        except torch.OutOfMemoryError as e:
            print(
                f"{name} under a {args.cap_gb} GiB cap: out of memory ({str(e).splitlines()[0]})",
                flush=True,
            )
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
    shutdown()


def table(path: str, start: int) -> None:
    """The driver's summary of the lines this invocation appended: seconds per configuration and GPU count,
    and the speed-up over one GPU."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[start:]]
    timed = {(r["config"], r["gpus"]): r for r in rows if r.get("run") == "timed"}
    gpus = sorted({g for _, g in timed})
    print(
        f"\n{'config':<16}"
        + "".join(f"{f'{g} GPU s':>12}" for g in gpus)
        + "".join(f"{f'{g}/1 speed-up':>14}" for g in gpus[1:])
    )
    for name in dict.fromkeys(c for c, _ in timed):
        secs = [timed.get((name, g), {}).get("prune_seconds") for g in gpus]
        line = f"{name:<16}" + "".join(f"{s:>12.2f}" if s else f"{'-':>12}" for s in secs)
        if secs[0]:
            line += "".join(f"{secs[0] / s:>13.2f}x" if s else f"{'-':>14}" for s in secs[1:])
        print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpus", default="1,2", help="comma list of GPU counts (driver)")
    ap.add_argument("--model", default="llama-8b", choices=sorted(SYNTHETIC))
    ap.add_argument(
        "--layers", type=int, default=None, help="number of blocks (default: the shape's)"
    )
    ap.add_argument(
        "--config",
        action="append",
        choices=sorted(CONFIGS),
        default=None,
        help="repeatable (default floor, wanda, wanda+trim, sparsegpt)",
    )
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=0, help="per rank (default automatic)")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="N > 1: a second, synchronised run timing collectives",
    )
    ap.add_argument(
        "--cap-gb", type=float, default=0.0, help="one GPU: also a run capped at this many GiB"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/multi_gpu.jsonl")
    args = ap.parse_args(argv)
    args.config = args.config or ["floor", "wanda", "wanda+trim", "sparsegpt"]
    if args.worker:
        return worker(args)
    start = len(Path(args.out).read_text().splitlines()) if Path(args.out).exists() else 0
    fwd, skip = [], False  # the arguments, less --gpus, for the workers
    for a in argv if argv is not None else sys.argv[1:]:
        if skip or a == "--gpus" or a.startswith("--gpus="):
            skip = a == "--gpus"
            continue
        fwd.append(a)
    for n in [int(g) for g in args.gpus.split(",")]:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            __file__,
            "--worker",
            *fwd,
        ]
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(
            cmd,
            env=os.environ
            | {
                "NCCL_NVLS_ENABLE": "0",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1",
            },
        )
        if rc:
            print(f"{n} GPU(s): exit {rc}", flush=True)
    if Path(args.out).exists():
        table(args.out, start)


if __name__ == "__main__":
    main()
