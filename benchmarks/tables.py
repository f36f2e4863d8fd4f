"""Print the Markdown tables of docs/results.md from the JSON-lines results in benchmarks/results."""

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


def speed(name):
    """Warm runs (run > 0) of a prune_bench file: range and median of prune_seconds, peak GPU memory."""
    import statistics

    rows = load(name)
    print("| scorer | TRIM | warm runs | prune s (median) | peak GPU GB |")
    print("|---|---|---:|---:|---:|")
    for sc, tr in dict.fromkeys((r["scorer"], r["trim"]) for r in rows):
        n = [
            r["prune_seconds"]
            for r in rows
            if (r["scorer"], r["trim"], r["run"] > 0) == (sc, tr, True)
        ]
        pk = [r["peak_gpu_gb"] for r in rows if (r["scorer"], r["trim"]) == (sc, tr)]
        print(
            f"| {sc} | {tr} | {len(n)} | {min(n):.2f}–{max(n):.2f} ({statistics.median(n):.2f}) | "
            f"{min(pk):.2f}–{max(pk):.2f} |"
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
    if what in ("speed", "all"):
        speed("h200_bench_smol.jsonl")
        speed("h200_bench_smolsyn.jsonl")
    if what in ("zeroshot", "all"):
        zeroshot("h200_zeroshot.jsonl")
    if what.startswith("bench:"):
        bench(what.split(":", 1)[1])
