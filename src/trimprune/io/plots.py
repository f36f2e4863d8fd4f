"""PNG plots of a prune (matplotlib, headless; `pip install 'trimprune[report]'`), written to
`plots/` next to report.json:

- sparsity_per_block.png: the allocation's target and the achieved sparsity of every block, the
  blocks sparser than 95 % marked (a warning);
- row_sparsity.png (TRIM): the distribution of the row sparsities per linear type, over all blocks;
- trim_metric.png (TRIM): each searched linear's layer metric with the scorer alone (uniform rows)
  and with TRIM's allocation, and which one was kept;
- metrics.png (with evaluation): perplexity per dataset as the ratio to dense (linear axis from 0;
  the pruned perplexity itself when no dense one was recorded) and zero-shot accuracy per task;
- search_trials.png (`--allocation search`): the held-out objective of every trial and the best so
  far (with `--search-seeds`: the winning seed's trials, the other seeds' best so far dashed);
- search_profile.png (`--allocation search`): the winning per-block profile against uniform, OWL,
  AlphaPruning and ATP (with the config's parameters), from the same captured data;
- sweep.png (`trimprune sweep`, in the sweep's folder): perplexity as the ratio to dense against
  the target sparsity, one line per method and one panel per dataset (and the zero-shot mean
  accuracy against sparsity with --tasks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trimprune.algo.masks import unpack_mask
from trimprune.io.report import FLAG_ABOVE


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def row_sparsities(
    masks: dict[str, torch.Tensor], shapes: dict[str, list[int]]
) -> dict[str, np.ndarray]:
    """Per linear, the sparsity of every row, from bit-packed masks (one matrix unpacked at a
    time)."""
    return {k: unpack_mask(v, shapes[k]).float().mean(1).numpy() for k, v in masks.items()}


def _figure(width: float = 7.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def sparsity_per_block(report: dict, path: Path) -> str:
    plt, fig, ax = _figure()
    achieved = report["sparsity"]["per_block"]
    blocks = range(len(achieved))
    ax.plot(
        blocks,
        report["allocation"]["per_block"],
        "o-",
        ms=3,
        label=f"target ({report['allocation']['method']})",
    )
    ax.plot(blocks, achieved, "s--", ms=3, label="achieved")
    high = [i for i, s in enumerate(achieved) if s > FLAG_ABOVE]
    if high:
        ax.axhline(FLAG_ABOVE, color="r", lw=0.6, ls=":")
        ax.plot(
            high,
            [achieved[i] for i in high],
            "v",
            ms=7,
            color="r",
            zorder=5,
            label=f"above {100 * FLAG_ABOVE:g} % (warning)",
        )
    ax.set(xlabel="block", ylabel="sparsity", title="Sparsity per block", ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _save(plt, fig, path)


def row_sparsity(report: dict, rows: dict[str, np.ndarray], path: Path) -> str:
    by_type: dict[str, list[np.ndarray]] = {}
    for name, r in report["layers"].items():
        if name in rows:
            by_type.setdefault(r["name"].split(".")[-1], []).append(rows[name])
    plt, fig, ax = _figure()
    labels = list(by_type)
    ax.boxplot(
        [np.concatenate(v) for v in by_type.values()],
        whis=(5, 95),
        showfliers=False,
        showmeans=True,
    )
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set(
        ylabel="row sparsity", title="Row sparsities per linear type (all blocks; whiskers 5-95 %)"
    )
    return _save(plt, fig, path)


def trim_metric(report: dict, path: Path) -> str:
    recs = [r["trim"] for r in report["layers"].values() if r.get("trim")]
    plt, fig, ax = _figure()
    x = np.arange(len(recs))
    ax.plot(
        x,
        [t["baseline_metric"] for t in recs],
        "o",
        ms=3,
        color="0.6",
        label="scorer alone (uniform rows)",
    )
    kept = np.array([t["kept"] == "trim" for t in recs])
    trim = np.array([t["trim_weights_metric"] for t in recs])
    ax.plot(x[kept], trim[kept], "^", ms=4, label="TRIM, kept")
    ax.plot(x[~kept], trim[~kept], "x", ms=4, label="TRIM, not kept (safeguards)")
    ax.set(
        xlabel="linear (model order)",
        ylabel=recs[0]["metric"] if recs else "",
        title="TRIM's layer metric",
    )
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def metrics(report: dict, path: Path) -> str | None:
    m = report["metrics"]
    ppl, zs = m.get("perplexity", {}), m.get("zero_shot", {})
    if not ppl and not zs:
        return None
    panels = [p for p in ("ppl", "zs") if (ppl if p == "ppl" else zs)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(panels), figsize=(7.0 if len(panels) == 1 else 10.0, 3.2), dpi=110, squeeze=False
    )
    for ax, panel in zip(axes[0], panels):
        names = list(ppl if panel == "ppl" else zs)
        x, w = np.arange(len(names)), 0.38
        if panel == "ppl":
            d = m.get("dense_perplexity") or {}
            if all(d.get(n) for n in names):  # the ratio to dense, on a linear axis from 0
                ax.bar(x, [ppl[n] / d[n] for n in names], 2 * w, color="C1", label="pruned")
                ax.axhline(1.0, color="C0", lw=1.5, label="dense (1)")
                ax.set(
                    ylabel="perplexity / dense", title="Perplexity, ratio to dense", ylim=(0, None)
                )
                ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
                ax.legend(fontsize=8)
                continue
            dense = [d.get(n, np.nan) for n in names]
            pruned = [ppl[n] for n in names]
            ax.set(ylabel="perplexity", title="Perplexity", ylim=(0, None))
        else:
            dense = [
                100 * m.get("dense_zero_shot", {}).get(n, {}).get("acc", np.nan) for n in names
            ]
            pruned = [100 * zs[n]["acc"] for n in names]
            ax.set(ylabel="accuracy (%)", title="Zero-shot accuracy (acc)")
        ax.bar(x - w / 2, dense, w, label="dense")
        ax.bar(x + w / 2, pruned, w, label="pruned")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def search_trials(report: dict, path: Path) -> str:
    sr = report["search"]
    plt, fig, ax = _figure()
    done = [t for t in sr["trials"] if t["state"] == "complete" and t["value"] is not None]
    x = np.array([t["number"] for t in done])
    y = np.array([t["value"] for t in done])
    fams = sorted({t["params"].get("family", "?") for t in done})
    for fam in fams:
        sel = np.array([t["params"].get("family") == fam for t in done], dtype=bool)
        ax.plot(x[sel], y[sel], "o", ms=4, label=fam)
    if len(y):
        ax.step(x, np.minimum.accumulate(y), where="post", color="0.3", lw=1, label="best so far")
    for r in sr.get("seeds", []) if len(sr.get("seeds", [])) > 1 else []:
        if r["seed"] == sr["seed"]:
            continue  # the winning seed: its trials above
        vals = [(i, v) for i, v in enumerate(r["values"]) if v is not None]
        if vals:
            sx, sy = np.array([i for i, _ in vals]), np.array([v for _, v in vals])
            ax.step(
                sx,
                np.minimum.accumulate(sy),
                where="post",
                lw=0.8,
                ls="--",
                alpha=0.6,
                label=f"best so far, seed {r['seed']}",
            )
    bad = [t["number"] for t in sr["trials"] if t["state"] not in ("complete", "stopped")]
    for b in bad:
        ax.axvline(b, color="r", lw=0.6, alpha=0.5)
    stopped = [t["number"] for t in sr["trials"] if t["state"] == "stopped"]
    for b in stopped:
        ax.axvline(b, color="0.6", lw=0.6, alpha=0.5)
    if len(y) and float(y.min()) > 0 and float(y.max()) / float(y.min()) > 20:
        ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(
        xlabel="trial",
        ylabel=f"held-out {sr['objective']}",
        title="Allocation search"
        + (f" ({len(bad)} failed, red)" if bad else "")
        + (f" ({len(stopped)} stopped by the pruner, grey)" if stopped else ""),
    )
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def search_profile(report: dict, path: Path) -> str:
    plt, fig, ax = _figure()
    draw_search_profile(ax, report)
    return _save(plt, fig, path)


def draw_search_profile(ax, report: dict) -> None:
    """The search's winning per-block profile against the rules' on `ax`: the winner drawn last
    and above them (zorder), so that no rule hides it."""
    prof = report["search"]["profiles"]
    for name, style in [("uniform", ":"), ("owl", "--"), ("alphapruning", "--"), ("atp", "--")]:
        if name in prof:
            ax.plot(range(len(prof[name])), prof[name], style, lw=1, label=name)
    ax.plot(
        range(len(prof["search"])),
        prof["search"],
        "o-",
        ms=3,
        lw=2,
        color="k",
        zorder=10,
        label="search (best)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(
        xlabel="block",
        ylabel="sparsity",
        title="Per-block sparsity: the search's winner and the rules",
    )
    ax.legend(fontsize=8)


def write_plots(folder: Path, report: dict, rows: dict[str, np.ndarray] | None = None) -> list[str]:
    """Write the plots of a report into `folder` (created); returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    out = [sparsity_per_block(report, folder / "sparsity_per_block.png")]
    if report.get("trim_summary"):
        if rows:
            out.append(row_sparsity(report, rows, folder / "row_sparsity.png"))
        out.append(trim_metric(report, folder / "trim_metric.png"))
    if report.get("search"):
        out += [
            search_trials(report, folder / "search_trials.png"),
            search_profile(report, folder / "search_profile.png"),
        ]
    name = metrics(report, folder / "metrics.png")
    return out + ([name] if name else [])


def sweep_ratio(rows: list[dict], dense: dict, path: Path) -> str | None:
    """The sweep's plot (`trimprune sweep`): per evaluation set, the perplexity's ratio to dense
    (the perplexity itself where no dense one was measured) against the target sparsity, one line
    per method; with zero-shot tasks, the mean accuracy against sparsity. `rows`: sweep.json's
    runs; `dense`: the dense evaluation ({"eval": ..., "zero_shot_mean": ...}). None when there is
    nothing to draw."""
    sets = list(dict.fromkeys(k for r in rows for k in r["perplexity"]))
    zs = any(r.get("zero_shot_mean") is not None for r in rows)
    if not sets and not zs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sets + (["zero-shot"] if zs else [])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.0 * len(panels), 3.4), dpi=110, squeeze=False
    )
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, panel in zip(axes[0], panels):
        for j, method in enumerate(methods):
            pts = sorted(
                (r["sparsity"], _sweep_value(r, panel)) for r in rows if r["method"] == method
            )
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=f"C{j}", label=method)
        ratio = panel != "zero-shot" and all(panel in r["ratio_to_dense"] for r in rows)
        if panel == "zero-shot":
            d = dense.get("zero_shot_mean")
            if d is not None:
                ax.axhline(100 * d, color="k", lw=1, ls="--", label="dense")
            ax.set(xlabel="target sparsity", ylabel="mean accuracy (%)", title="Zero-shot mean")
        elif ratio:
            ax.axhline(1.0, color="k", lw=1, ls="--", label="dense (1)")
            ax.set(
                xlabel="target sparsity",
                ylabel="perplexity / dense",
                title=f"{panel}: perplexity, ratio to dense",
                ylim=(0, None),
            )
        else:
            ax.set(xlabel="target sparsity", ylabel="perplexity", title=f"{panel}: perplexity")
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _sweep_value(row: dict, panel: str) -> float | None:
    if panel == "zero-shot":
        v = row.get("zero_shot_mean")
        return None if v is None else 100 * v
    return row["ratio_to_dense"].get(panel, row["perplexity"].get(panel))
