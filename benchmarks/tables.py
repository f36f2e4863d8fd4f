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
    return f"{r['ppl']:.2f}" if r else "-"


def issue3(idx):
    print("| sparsity | Wanda | SparseGPT |")
    print("|---|---:|---:|")
    for sp in [0.5, 0.6, 0.7]:
        print(f"| {int(sp * 100)} % | {q(idx, scorer='wanda', sparsity=sp)} | {q(idx, scorer='sparsegpt', sparsity=sp)} |")
    print(f"| 2:4 | {q(idx, scorer='wanda', sparsity=0.5, mask_structure='2:4')} | "
          f"{q(idx, scorer='sparsegpt', sparsity=0.5, mask_structure='2:4')} |")


def issue4(idx):
    print("| scorer | sparsity | alone | + TRIM (last-token) | + TRIM (all tokens) |")
    print("|---|---|---:|---:|---:|")
    for sc in ["wanda", "sparsegpt"]:
        for sp in [0.5, 0.6, 0.7]:
            print(f"| {sc} | {int(sp * 100)} % | {q(idx, scorer=sc, sparsity=sp)} | "
                  f"{q(idx, scorer=sc, sparsity=sp, trim=True, trim_inputs='last-token')} | "
                  f"{q(idx, scorer=sc, sparsity=sp, trim=True, trim_inputs='all')} |")


def issue5(idx):
    print("| sparsity | scorer | uniform | uniform + TRIM | OWL | OWL + TRIM | AlphaPruning | AlphaPruning + TRIM |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for sp in [0.6, 0.7]:
        for sc in ["wanda", "sparsegpt"]:
            cells = [q(idx, scorer=sc, sparsity=sp), q(idx, scorer=sc, sparsity=sp, trim=True)]
            for al in ["owl", "alphapruning"]:
                cells += [q(idx, scorer=sc, sparsity=sp, allocation=al, trim=False),
                          q(idx, scorer=sc, sparsity=sp, allocation=al, trim=True)]
            print(f"| {int(sp * 100)} % | {sc} | " + " | ".join(cells) + " |")


def bench(name):
    rows = load(name)
    print("| model | scorer | TRIM | run | prune s | s / block | peak GPU GB | peak RSS GB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["trim"] if r["trim"] == "none" else f"{r['trim']} ({r.get('trim_precision')})"
        gpu = "–" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
        model = "SmolLM2-135M" if r["model"] in ("/root/w", "smollm2-135m") else r["model"]
        print(f"| {model} | {r['scorer']} | {t} | {r['run']} | {r['prune_seconds']:.2f} | "
              f"{r['per_block_seconds']:.3f} | {gpu} | {r['peak_rss_gb']:.1f} |")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    idx = quality_index("h100_quality_issue3.jsonl", "h100_quality_issue4_v2.jsonl", "h100_quality_issue5.jsonl")
    if what in ("issue3", "all"):
        issue3(idx)
    if what in ("issue4", "all"):
        issue4(idx)
        print("\nH200, current code:")
        issue4(quality_index("h200_quality_issue3_wanda_v3.jsonl", "h200_quality_issue4_v3.jsonl"))
    if what in ("issue5", "all"):
        issue5(idx)
    if what.startswith("bench:"):
        bench(what.split(":", 1)[1])
