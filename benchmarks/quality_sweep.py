"""WikiText-2 perplexity (and, with --tasks, zero-shot accuracy) of SmolLM2-135M under many pruning
configurations.

The model is loaded once; before every configuration the dense weights are restored. Calibration
(C4, seeded) and the evaluation windows are computed once. One JSON line per configuration.

    python benchmarks/quality_sweep.py --grid issue3 --out benchmarks/results/quality.jsonl
    python benchmarks/quality_sweep.py --grid zeroshot --tasks classic+piqa --tasks-batch-size 64 \
        --out benchmarks/results/zeroshot.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, machine  # noqa: E402
from trimprune import PruneConfig, load_model, prune  # noqa: E402
from trimprune.calib.data import get_calibration  # noqa: E402
from trimprune.core.records import Kept  # noqa: E402
from trimprune.io.evaluate import evaluate_sets, prepare_eval_sets  # noqa: E402
from trimprune.io.zeroshot import CLASSIC_TASKS, evaluate_tasks, mean_accuracy  # noqa: E402


def zero_shot(model, tok, args) -> dict | None:
    """The harness's scores on --tasks (full sets unless --tasks-limit), with the mean and the seconds."""
    if not args.tasks:
        return None
    tasks = [
        t
        for t in args.tasks.replace("classic", ",".join(CLASSIC_TASKS)).replace("+", ",").split(",")
        if t
    ]
    t = time.perf_counter()
    scores = evaluate_tasks(
        model,
        tok,
        tasks,
        limit=args.tasks_limit,
        batch_size=args.tasks_batch_size,
        tasks_data=args.tasks_data,
    )
    return {
        "tasks": {k: v.to_dict() for k, v in scores.items()},
        "mean_classic": mean_accuracy(scores),
        "seconds": time.perf_counter() - t,
    }


def grid(name: str) -> list[dict]:
    out = []
    if name in ("issue2", "all"):
        out += [dict(scorer="wanda", sparsity=0.5), dict(scorer="magnitude", sparsity=0.5)]
    if name in ("issue3", "all"):
        for sc, sp in itertools.product(["wanda", "sparsegpt"], [0.5, 0.6, 0.7]):
            out.append(dict(scorer=sc, sparsity=sp))
        for sc in ["wanda", "sparsegpt"]:
            out.append(dict(scorer=sc, sparsity=0.5, mask_structure="2:4"))
    if name in ("issue4", "all"):
        for sc, sp, tr in itertools.product(
            ["wanda", "sparsegpt"], [0.5, 0.6, 0.7], ["last-token", "all"]
        ):
            out.append(dict(scorer=sc, sparsity=sp, trim=True, trim_inputs=tr))
    if name in ("issue5", "all"):
        for al, sc, tr, sp in itertools.product(
            ["owl", "alphapruning"], ["wanda", "sparsegpt"], [False, True], [0.6, 0.7]
        ):
            out.append(dict(scorer=sc, sparsity=sp, allocation=al, trim=tr))
        for sc, sp in itertools.product(["wanda", "sparsegpt"], [0.6, 0.7]):
            out.append(dict(scorer=sc, sparsity=sp))  # uniform, no TRIM (also in issue3)
            out.append(dict(scorer=sc, sparsity=sp, trim=True))
    if name == "zeroshot":
        out += [
            dict(scorer="wanda", sparsity=0.5),
            dict(scorer="sparsegpt", sparsity=0.5),
            dict(scorer="wanda", sparsity=0.5, trim=True),
            dict(scorer="sparsegpt", sparsity=0.7, allocation="alphapruning"),
            dict(scorer="wanda", sparsity=0.7, allocation="alphapruning"),
        ]
    if name == "trimvariants":
        for sp, (lm, dm) in itertools.product(
            [0.5, 0.6, 0.7],
            [("mse", "mse"), ("snr", "cosim"), ("cosim_flat", "mse"), ("mse", "cosim")],
        ):
            out.append(
                dict(scorer="wanda", sparsity=sp, trim=True, trim_metric=lm, trim_dim_metric=dm)
            )
    if name == "guard":  # the model guard against TRIM and the scorer alone, all on 128 sequences
        for sc, al, sp in itertools.product(
            ["wanda", "sparsegpt"], ["uniform", "owl", "alphapruning"], [0.6, 0.7, 0.8]
        ):
            g = dict(scorer=sc, sparsity=sp, allocation=al)
            out += [g, g | dict(trim=True), g | dict(trim=True, trim_guard="model")]
    if name == "steer":  # TRIM steering SparseGPT (--trim-sparsegpt steer)
        steer = dict(scorer="sparsegpt", trim=True, trim_sparsegpt="steer")
        for al, sp in itertools.product(["uniform", "alphapruning"], [0.6, 0.7, 0.8]):
            out.append(steer | dict(sparsity=sp, allocation=al))
        for al in ["uniform", "alphapruning"]:
            out.append(steer | dict(sparsity=0.7, allocation=al, trim_guard="model"))
    if name == "learned":
        for sc, al in itertools.product(["wanda", "sparsegpt"], ["lua", "layerif"]):
            out.append(dict(scorer=sc, sparsity=0.7, allocation=al))
    seen, uniq = set(), []
    for g in out:
        k = json.dumps(g, sort_keys=True)
        if k not in seen:
            seen.add(k)
            uniq.append(g)
    return uniq


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--dtype", default=None, help="default: what trimprune prune uses (recorded in every line)"
    )
    ap.add_argument("--grid", default="all")
    ap.add_argument("--only", default=None, help="slice of the grid, e.g. 0:10")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--trim-precision", default="tf32")
    ap.add_argument("--skip-done", action="store_true", help="skip configurations already in --out")
    ap.add_argument("--out", default="benchmarks/results/quality.jsonl")
    ap.add_argument("--alpha-cache-dir", default=None)
    ap.add_argument(
        "--tasks", default=None, help="zero-shot tasks, e.g. classic+piqa (classic = the seven)"
    )
    ap.add_argument("--tasks-limit", type=int, default=None)
    ap.add_argument("--tasks-batch-size", type=int, default=32)
    ap.add_argument("--tasks-data", default=None)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, args.gguf_file, args.dtype, args.device)
    dev = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = dict(
        calib="c4",
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        trim_precision=args.trim_precision,
        alpha_cache_dir=args.alpha_cache_dir,
    )
    calib = get_calibration(PruneConfig.from_flat(base).calib, tok)
    sets = prepare_eval_sets(["wikitext2"], tok, args.seqlen, None, args.eval_limit)
    done = set()
    if args.skip_done and Path(args.out).is_file():
        for line in open(args.out):
            r = json.loads(line)
            done.add(json.dumps(r["config_overrides"], sort_keys=True))
    t = time.perf_counter()
    dense = evaluate_sets(model, sets, 8)["wikitext2"]
    print(
        f"# {machine()} | {dtype} | dense wikitext2 ppl {dense['perplexity']:.4f} ({time.perf_counter() - t:.1f} s)",
        flush=True,
    )
    dense_zs = None if "null" in done else zero_shot(model, tok, args)
    if dense_zs is not None:
        append_jsonl(
            args.out,
            {
                "machine": machine(),
                "model": args.model,
                "dtype": dtype,
                "config_overrides": None,
                "ppl": dense["perplexity"],
                "eval_windows": dense["windows"],
                "zero_shot": dense_zs,
            },
        )
        print(
            f"# dense zero-shot mean {dense_zs['mean_classic']} ({dense_zs['seconds']:.1f} s)",
            flush=True,
        )
    configs = grid(args.grid)
    if args.only:
        a, b = (int(x) if x else None for x in args.only.split(":"))
        configs = configs[a:b]
    for g in configs:
        key = json.dumps(g, sort_keys=True)
        if key in done:
            continue
        model.load_state_dict(state)
        cfg = PruneConfig.from_flat(base | g)
        t = time.perf_counter()
        res = prune(model, tok, cfg, calibration=calib, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        ev = evaluate_sets(model, sets, 8)["wikitext2"]
        ts = [r.trim for r in res.layers.values() if r.trim is not None]
        rec = {
            "machine": machine(),
            "model": args.model,
            "dtype": dtype,
            "config_overrides": g,
            "calib": f"c4 {args.nsamples}x{args.seqlen} seed {args.seed}",
            "ppl": ev["perplexity"],
            "dense_ppl": dense["perplexity"],
            "eval_windows": ev["windows"],
            "achieved_sparsity": res.global_sparsity,
            "prune_seconds": res.timings["prune_seconds"],
            "wall_seconds": wall,
            "trim_search_seconds": res.timings["trim_search_seconds"],
            "trim_kept": sum(t.kept == Kept.TRIM for t in ts),
            "trim_linears": len(ts),
            "allocation_per_block": res.allocation.per_block(),
            "trim_precision": args.trim_precision,
        }
        zs = zero_shot(model, tok, args)
        if zs is not None:
            rec["zero_shot"] = zs
        append_jsonl(args.out, rec)
        print(
            f"{json.dumps(g):<100} ppl {ev['perplexity']:9.3f}  sparsity {res.global_sparsity:.4f}  "
            f"prune {res.timings['prune_seconds']:6.2f} s  trim kept {rec['trim_kept']}/{rec['trim_linears']}"
            + (f"  zero-shot mean {zs['mean_classic']} ({zs['seconds']:.0f} s)" if zs else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
