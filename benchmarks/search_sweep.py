"""Layer-wise allocations against `--allocation search` on SmolLM2: WikiText-2 perplexity and the
held-out objective, for every scorer x sparsity; and, over the trials of each search, the Spearman rank
correlation between the held-out objective and WikiText-2 perplexity (is the objective a good proxy?).

Every method prunes from the same statistics: the first nsamples - holdout C4 sequences; the last
`--holdout` sequences score the held-out objective (KL(dense || pruned) per token, or NLL). The model is
loaded once and its dense weights restored before every run. One JSON line per (scorer, sparsity,
method), plus one per search trial (`"trial": n`).

    # the GPU run (SmolLM2, C4 128 x 2048, 50 trials, wanda and sparsegpt at 60/70/80 %)
    python benchmarks/search_sweep.py --out benchmarks/results/h200_search.jsonl
    # the multi-fidelity stage against whole trials (CPU, SmolLM2, Wanda 70 %)
    TRIMPRUNE_DATA=../shared/data python benchmarks/search_sweep.py --nsamples 16 --seqlen 256 \
        --trials 24 --scorers wanda --sparsities 0.7 --methods search --no-correlation \
        --eval-limit 40 --search-pruner median --out benchmarks/results/cpu_search_pruner.jsonl
    # a CPU check with tiny settings
    TRIMPRUNE_DATA=../shared/data python benchmarks/search_sweep.py --nsamples 8 --seqlen 128 --trials 3 \
        --scorers wanda --sparsities 0.7 --eval-limit 4 --out /tmp/search_sweep.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, machine  # noqa: E402
from trimprune import PruneConfig, load_model, prune  # noqa: E402
from trimprune.calib.data import get_calibration  # noqa: E402
from trimprune.io.evaluate import evaluate_sets, prepare_eval_sets  # noqa: E402
from trimprune.search import Holdout, search_prune  # noqa: E402

METHODS = ("uniform", "owl", "alphapruning", "atp", "search")


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: Pearson's correlation of the ranks (ties get their mean rank)."""
    if len(x) < 3:
        return None

    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for val in torch.unique(t):  # mean rank of ties
            sel = t == val
            r[sel] = r[sel].mean()
        return r

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument(
        "--nsamples",
        type=int,
        default=128,
        help="calibration sequences, the held-out ones included",
    )
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=int, default=0, help="held-out sequences (0 = nsamples // 8)")
    ap.add_argument("--objective", default="kl", choices=["kl", "nll"])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--search-space", default="rules,free")
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--search-pruner", default="none", choices=["none", "median"])
    ap.add_argument("--search-rung", type=float, default=0.5)
    ap.add_argument("--scorers", default="wanda,sparsegpt")
    ap.add_argument("--sparsities", default="0.6,0.7,0.8")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--trim", action="store_true", help="TRIM on top of every method")
    ap.add_argument(
        "--no-correlation",
        action="store_true",
        help="skip WikiText-2 after every search trial (no rank correlation)",
    )
    ap.add_argument(
        "--eval-limit", type=int, default=None, help="only the first W WikiText-2 windows"
    )
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--alpha-cache-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/search_sweep.jsonl")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, args.gguf_file, args.dtype, args.device)
    dev = next(model.parameters()).device
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = dict(
        calib="c4",
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        search_holdout=args.holdout,
        search_objective=args.objective,
        search_trials=args.trials,
        search_space=args.search_space,
        search_seed=args.search_seed,
        search_rung=args.search_rung,
        alpha_cache_dir=args.alpha_cache_dir,
        trim=args.trim,
    )
    cfg0 = PruneConfig.from_flat(base)
    ids = get_calibration(cfg0.calib, tok)
    h = cfg0.search.holdout_for(ids.shape[0])
    prune_ids, held = ids[: ids.shape[0] - h], ids[ids.shape[0] - h :]
    sets = prepare_eval_sets(["wikitext2"], tok, args.seqlen, None, args.eval_limit)
    t = time.perf_counter()
    dense = evaluate_sets(model, sets, args.eval_batch_size)["wikitext2"]
    objective = Holdout(model, held, args.objective, dev)  # the dense pass, once
    print(
        f"# {machine()} | {args.model} dense wikitext2 ppl {dense['perplexity']:.4f}, held-out NLL "
        f"{objective.dense['nll']:.4f} on {h} x {args.seqlen} ({time.perf_counter() - t:.1f} s)",
        flush=True,
    )
    common = {
        "machine": machine(),
        "model": args.model,
        "calib": f"c4 {args.nsamples}x{args.seqlen} seed {args.seed}",
        "holdout": h,
        "objective": args.objective,
        "dense_ppl": dense["perplexity"],
        "eval_windows": dense["windows"],
        "trim": args.trim,
    }
    for scorer in args.scorers.split(","):
        for sp in (float(x) for x in args.sparsities.split(",")):
            for method in args.methods.split(","):
                model.load_state_dict(state)
                pruner = {"search_pruner": args.search_pruner} if method == "search" else {}
                cfg = PruneConfig.from_flat(
                    base | dict(scorer=scorer, sparsity=sp, allocation=method) | pruner
                )
                t = time.perf_counter()
                trials = []
                if method == "search":

                    def on_trial(number, params, value, metrics, m):
                        rec = {"trial": number, "params": params, "value": value}
                        if not args.no_correlation:
                            rec["ppl"] = evaluate_sets(m, sets, args.eval_batch_size)["wikitext2"][
                                "perplexity"
                            ]
                        trials.append(rec)
                        append_jsonl(
                            args.out,
                            common | {"scorer": scorer, "sparsity": sp, "method": "search"} | rec,
                        )

                    res = search_prune(model, tok, cfg, ids, progress=False, on_trial=on_trial)
                else:
                    res = prune(model, tok, cfg, calibration=prune_ids, progress=False)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t
                ev = evaluate_sets(model, sets, args.eval_batch_size)["wikitext2"]
                held_out = objective.measure()
                rec = common | {
                    "scorer": scorer,
                    "sparsity": sp,
                    "method": method,
                    "ppl": ev["perplexity"],
                    "held_out": held_out,
                    "achieved_sparsity": res.global_sparsity,
                    "allocation_per_block": res.allocation.per_block(),
                    "wall_seconds": wall,
                    "prune_seconds": res.timings["prune_seconds"],
                }
                if method == "search":
                    sr = res.search
                    rec |= {
                        "best": sr["best"],
                        "trials_complete": sum(t["state"] == "complete" for t in sr["trials"]),
                        "trials_total": len(sr["trials"]),
                        "search_seconds": sr["seconds"],
                        "trial_seconds": {
                            st: sum(t["seconds"] or 0.0 for t in sr["trials"] if t["state"] == st)
                            for st in {t["state"] for t in sr["trials"]}
                        },
                        "pruner": sr["pruner"],
                    }
                    if sr["pruner"] != "none":  # the rung's objective against the whole trial's
                        done = [t for t in sr["trials"] if t["state"] == "complete"]
                        rec |= {
                            "rung_block": sr["rung_block"],
                            "trials_stopped": sr["trials_stopped"],
                            "spearman_partial_vs_objective": spearman(
                                [t["partial"]["metrics"][args.objective] for t in done],
                                [t["value"] for t in done],
                            ),
                        }
                    ok = [t for t in trials if "ppl" in t]
                    rec["spearman_objective_vs_ppl"] = spearman(
                        [t["value"] for t in ok], [t["ppl"] for t in ok]
                    )
                append_jsonl(args.out, rec)
                rho = rec.get("spearman_objective_vs_ppl")
                print(
                    f"{scorer:<10} {sp:.2f} {method:<13} ppl {ev['perplexity']:10.3f}  held-out "
                    f"{args.objective} {held_out[args.objective]:.5f}  {wall:7.1f} s"
                    + (
                        f"  best #{rec['best']['number']} {rec['best']['params']['family']}, spearman "
                        f"{rho if rho is None else round(rho, 3)}"
                        if method == "search"
                        else ""
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
