"""Print the Markdown tables of benchmarks/RESULTS.md from the JSON-lines results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

R = Path(__file__).resolve().parent / "results"


def load(name):
    p = R / name
    return [json.loads(line) for line in open(p)] if p.is_file() else []


def quality_index(*files):
    idx = {}
    for f in files:
        for r in load(f):
            idx[json.dumps(r["config_overrides"], sort_keys=True)] = r
    return idx


def q(idx, **kw):
    r = idx.get(json.dumps(kw, sort_keys=True))
    return f"{r['ppl']:.3f}" if r else "-"


def issue3(idx):
    print("| sparsity | Wanda | SparseGPT |")
    print("|---|---:|---:|")
    for sp in [0.5, 0.6, 0.7]:
        print(
            f"| {int(sp * 100)} % | {q(idx, scorer='wanda', sparsity=sp)} | {q(idx, scorer='sparsegpt', sparsity=sp)} |"
        )
    print(
        f"| 2:4 | {q(idx, scorer='wanda', sparsity=0.5, mask_structure='2:4')} | "
        f"{q(idx, scorer='sparsegpt', sparsity=0.5, mask_structure='2:4')} |"
    )


def issue4(idx):
    print("| scorer | sparsity | alone | + TRIM (last-token) | + TRIM (all tokens) |")
    print("|---|---|---:|---:|---:|")
    for sc in ["wanda", "sparsegpt"]:
        for sp in [0.5, 0.6, 0.7]:
            print(
                f"| {sc} | {int(sp * 100)} % | {q(idx, scorer=sc, sparsity=sp)} | "
                f"{q(idx, scorer=sc, sparsity=sp, trim=True, trim_inputs='last-token')} | "
                f"{q(idx, scorer=sc, sparsity=sp, trim=True, trim_inputs='all')} |"
            )


def issue5(idx):
    print(
        "| sparsity | scorer | uniform | uniform + TRIM | OWL | OWL + TRIM | AlphaPruning | AlphaPruning + TRIM |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for sp in [0.6, 0.7]:
        for sc in ["wanda", "sparsegpt"]:
            cells = [q(idx, scorer=sc, sparsity=sp), q(idx, scorer=sc, sparsity=sp, trim=True)]
            for al in ["owl", "alphapruning"]:
                cells += [
                    q(idx, scorer=sc, sparsity=sp, allocation=al, trim=False),
                    q(idx, scorer=sc, sparsity=sp, allocation=al, trim=True),
                ]
            print(f"| {int(sp * 100)} % | {sc} | " + " | ".join(cells) + " |")


def same_as(old_file, new_file):
    """Configurations of two quality sweeps whose perplexity, kept-TRIM count and sparsity are equal."""
    old, new = quality_index(old_file), quality_index(new_file)
    same = [
        k
        for k in new
        if k in old
        and all(old[k][f] == new[k][f] for f in ("ppl", "trim_kept", "achieved_sparsity"))
    ]
    print(
        f"{len(same)} of {len(new)} configurations identical (perplexity, linears that kept TRIM, sparsity)"
    )


def speed(old_file, new_file):
    """Warm runs (run > 0) of prune_bench files of two code versions: range and median of prune_seconds."""
    import statistics

    old, new = load(old_file), load(new_file)
    print(
        "| scorer | TRIM | 4450ba2 prune s (median) | current prune s (median) | current / 4450ba2 | "
        "peak GPU GB 4450ba2 / current |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for sc, tr in dict.fromkeys((r["scorer"], r["trim"]) for r in new):
        o = [
            r["prune_seconds"]
            for r in old
            if (r["scorer"], r["trim"], r["run"] > 0) == (sc, tr, True)
        ]
        n = [
            r["prune_seconds"]
            for r in new
            if (r["scorer"], r["trim"], r["run"] > 0) == (sc, tr, True)
        ]
        po = max(r["peak_gpu_gb"] for r in old if (r["scorer"], r["trim"]) == (sc, tr))
        pn = [r["peak_gpu_gb"] for r in new if (r["scorer"], r["trim"]) == (sc, tr)]
        print(
            f"| {sc} | {tr} | {min(o):.2f}–{max(o):.2f} ({statistics.median(o):.2f}) | {min(n):.2f}–{max(n):.2f} "
            f"({statistics.median(n):.2f}) | {statistics.median(n) / statistics.median(o):.3f} | "
            f"{po:.2f} / {min(pn):.2f}–{max(pn):.2f} |"
        )


ZS_TASKS = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
)


def zeroshot(name):
    """acc per task (acc_norm in brackets where the harness gives it), the mean of the seven classic tasks."""
    print("| configuration | WikiText-2 | " + " | ".join(ZS_TASKS) + " | mean (7) | eval s |")
    print("|---|---:|" + "---:|" * (len(ZS_TASKS) + 2))
    for r in load(name):
        g = r["config_overrides"]
        label = (
            "dense"
            if g is None
            else " ".join(
                [g["scorer"], f"{g['sparsity']:.0%}"]
                + ([g["allocation"]] if g.get("allocation") else [])
                + (["+ TRIM"] if g.get("trim") else [])
            )
        )
        z = r["zero_shot"]
        cells = []
        for t in ZS_TASKS:
            s = z["tasks"][t]
            cells.append(
                f"{s['acc']:.4f}" + (f" ({s['acc_norm']:.4f})" if s["acc_norm"] is not None else "")
            )
        print(
            f"| {label} | {r['ppl']:.3f} | "
            + " | ".join(cells)
            + f" | **{z['mean_classic']:.4f}** | "
            f"{z['seconds']:.0f} |"
        )


def bench(name):
    rows = load(name)
    print("| model | scorer | TRIM | run | prune s | s / block | peak GPU GB | peak RSS GB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["trim"] if r["trim"] == "none" else f"{r['trim']} ({r.get('trim_precision')})"
        gpu = "–" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
        model = "SmolLM2-135M" if r["model"] in ("/root/w", "smollm2-135m") else r["model"]
        print(
            f"| {model} | {r['scorer']} | {t} | {r['run']} | {r['prune_seconds']:.2f} | "
            f"{r['per_block_seconds']:.3f} | {gpu} | {r['peak_rss_gb']:.1f} |"
        )


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    idx = quality_index("h200_quality.jsonl")
    if what in ("issue3", "all"):
        issue3(idx)
    if what in ("issue4", "all"):
        issue4(idx)
    if what in ("issue5", "all"):
        issue5(idx)
    if what in ("same", "all"):
        same_as("h200_quality_4450ba2.jsonl", "h200_quality.jsonl")
    if what in ("speed", "all"):
        speed("h200_bench_smol_4450ba2.jsonl", "h200_bench_smol.jsonl")
        speed("h200_bench_smolsyn_4450ba2.jsonl", "h200_bench_smolsyn.jsonl")
    if what in ("zeroshot", "all"):
        zeroshot("h200_zeroshot.jsonl")
    if what.startswith("bench:"):
        bench(what.split(":", 1)[1])
