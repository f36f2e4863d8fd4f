"""Mixture-of-experts pruning time, memory and coverage on random weights in real shapes.

    python benchmarks/moe_bench.py --model qwen3-30b-a3b --out benchmarks/results/h200_moe.jsonl
    python benchmarks/moe_bench.py --model mixtral-8x7b --layers 8 --config floor --config wanda

Each configuration builds the model afresh (seeded N(0, 0.02) weights, bf16, directly on the
device; the router's weights too, so routing is close to uniform) and prunes it on seeded random
calibration tokens (--nsamples x --seqlen):

- floor: the capture and two forwards of every block (transformers' own experts forward), nothing
  else: what no layer-sequential prune can go below (`multi_gpu_bench.floor`);
- wanda, wanda+trim (TRIM on all tokens), sparsegpt, at --sparsity.

One JSON line per configuration: prune seconds, seconds per block, the ratio to the floor of the
same run, peak GPU memory and host RSS, and the coverage: the fraction of the blocks' weight
parameters (2-D and 3-D) that were pruned, per kind, counted from the result's records against the
model's parameters (routers are excluded by design and counted apart).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, machine, peak_rss_gb, random_calibration  # noqa: E402
from multi_gpu_bench import floor  # noqa: E402
from trimprune import PruneConfig, prune  # noqa: E402
from trimprune.core.model import ModelAdapter  # noqa: E402

SHAPES = {
    # Qwen3-30B-A3B: 48 blocks, 128 experts, 8 active, hidden 2048, expert intermediate 768
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            vocab_size=151936,
            max_position_embeddings=4096,
        ),
    ),
    # Mixtral-8x7B: 32 blocks, 8 experts, 2 active, hidden 4096, intermediate 14336
    "mixtral-8x7b": (
        "MixtralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
    ),
    # tiny shapes of the same families (a CPU smoke run of this script)
    "qwen3-moe-tiny": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            vocab_size=512,
        ),
    ),
}

CONFIGS = {
    "floor": {"scorer": "wanda"},
    "wanda": {"scorer": "wanda"},
    "wanda+trim": {"scorer": "wanda", "trim": True, "trim_inputs": "all"},
    "sparsegpt": {"scorer": "sparsegpt"},
}


def build(name: str, device: torch.device, dtype: torch.dtype, layers: int | None):
    import transformers

    cls_name, kw = SHAPES[name]
    kw = dict(kw)
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model.eval()


def _kind(name: str) -> str:
    if ".experts." in name and ".shared_expert" not in name:
        return "experts"
    if "attn" in name:
        return "attention"
    return "mlp"


def coverage(model, result) -> dict:
    """Fractions of the blocks' weight parameters pruned (from the records), per kind; routers
    (excluded by design) apart."""
    adapter = ModelAdapter.from_model(model)
    total = {"attention": 0, "mlp": 0, "experts": 0, "router": 0, "other": 0}
    for block in adapter.blocks:
        for n, p in block.named_parameters():
            if p.dim() < 2:
                continue
            if n.endswith("gate.weight") and ".mlp.gate." in f".{n}":
                total["router"] += p.numel()
            elif "experts." in n and "shared_expert" not in n:
                total["experts"] += p.numel()
            elif "attn" in n:
                total["attention"] += p.numel()
            elif "mlp" in n:
                total["mlp"] += p.numel()
            else:
                total["other"] += p.numel()
    pruned = {"attention": 0, "mlp": 0, "experts": 0}
    for full, rec in result.layers.items():
        pruned[_kind(full)] += rec.shape[0] * rec.shape[1]
    weights = sum(v for k, v in total.items() if k != "router")
    out = {k: (pruned[k] / total[k] if total[k] else None) for k in pruned}
    out["all"] = sum(pruned.values()) / weights
    out["router_share"] = total["router"] / (weights + total["router"])
    out["experts_share"] = total["experts"] / weights
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="number of blocks (default: all)")
    ap.add_argument("--config", action="append", default=None, choices=sorted(CONFIGS))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/moe_bench.jsonl")
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    configs = args.config or list(CONFIGS)
    floor_s = None
    print(f"# {machine()} | {args.model} | calib {args.nsamples}x{args.seqlen} | {dtype}")
    print(
        f"{'config':<12}{'blocks':>7}{'prune s':>10}{'per block':>11}{'x floor':>9}"
        f"{'peak GPU GB':>13}{'peak RSS GB':>13}{'pruned':>8}{'experts':>9}"
    )
    for name in configs:
        model = build(args.model, dev, dtype, args.layers)
        blocks = model.config.num_hidden_layers
        calib = random_calibration(model.config.vocab_size, args.nsamples, args.seqlen)
        flat = {
            "sparsity": args.sparsity,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "calib": "c4",
        } | CONFIGS[name]
        cfg = PruneConfig.from_flat(flat)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cov: dict = {}
        t0 = time.perf_counter()
        if name == "floor":
            secs = floor(model, calib, cfg, dev, False)
        else:
            res = prune(model, None, cfg, calibration=calib, device=dev, progress=False)
            secs = res.timings["prune_seconds"]
            cov = coverage(model, res)
        wall = time.perf_counter() - t0
        if name == "floor":
            floor_s = secs
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
        rec = {
            "machine": machine(),
            "model": args.model,
            "blocks": blocks,
            "config": name,
            "sparsity": args.sparsity,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "dtype": str(dtype),
            "prune_seconds": secs,
            "wall_seconds": wall,
            "per_block_seconds": secs / blocks,
            "x_floor": secs / floor_s if floor_s else None,
            "peak_gpu_gb": peak,
            "peak_rss_gb": peak_rss_gb(),
            "coverage": cov,
        }
        if name != "floor":
            rec["timings"] = {k: v for k, v in res.timings.items() if isinstance(v, float)}
        append_jsonl(args.out, rec)
        xf = f"{rec['x_floor']:.2f}" if rec["x_floor"] else "-"
        print(
            f"{name:<12}{blocks:>7}{secs:>10.2f}{secs / blocks:>11.3f}{xf:>9}{peak:>13.2f}"
            f"{rec['peak_rss_gb']:>13.2f}{cov.get('all', 0):>8.3f}{cov.get('experts') or 0:>9.3f}",
            flush=True,
        )
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
