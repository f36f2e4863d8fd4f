"""report.json / report.md contents and the console summary table."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path

import torch

from trimprune.core.coverage import LABELS, summary_of

FLAG_ABOVE = 0.95  # a block sparser than this is flagged in the per-block tables and plot
FLAG = "\u26a0 > 95 %"


def versions(device=None) -> dict:
    import transformers

    from trimprune import __version__

    v = {
        "trimprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(
            device if device is not None and str(device).startswith("cuda") else 0
        )
    return v


def build_report(
    result, model_info: dict, metrics: dict, timings: dict, device=None, command=None
) -> dict:
    from trimprune.core.records import BlockChoice, Kept

    cfg = result.config
    trim_layers = [r.trim for r in result.layers.values() if r.trim is not None]
    rep = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": versions(device),
        "model": model_info,
        "config": cfg.to_dict(),
        "calibration": calibration_record(result),
        "sparsity": {
            "requested": cfg.sparsity,
            "allocation_mean": result.allocation.achieved,
            "achieved": result.global_sparsity,
            "per_block": result.block_sparsity(),
        },
        "allocation": result.allocation.to_dict() | {"details": result.allocation.details},
        "layers": {k: r.to_dict() for k, r in result.layers.items()},
        "timings": timings,
        "metrics": metrics,
        "notes": list(result.notes),
        "resumed_from_block": getattr(result, "resumed_from_block", None),
        "moe_fallback": dict(getattr(result, "moe_fallback", {}) or {}),
    }
    if getattr(result, "coverage", None) is not None:
        rep["coverage"] = result.coverage.to_dict()
    excluded = getattr(result, "excluded", ())
    if excluded:
        rep["excluded"] = [e.to_dict() for e in excluded]
    if getattr(result, "search", None):
        rep["search"] = result.search
    if getattr(result, "trim_guard", None):
        rep["trim_guard"] = result.trim_guard
    if trim_layers:
        rep["trim_summary"] = {
            "linears": len(trim_layers),
            "kept_trim": sum(t.kept == Kept.TRIM for t in trim_layers),
            "safeguard_fallbacks": sum(t.kept != Kept.TRIM for t in trim_layers),
            "mean_baseline_metric": sum(t.search.baseline_metric for t in trim_layers)
            / len(trim_layers),
            "mean_final_metric": sum(t.trim_weights_metric for t in trim_layers) / len(trim_layers),
            "block_safeguard": [b.to_dict() for b in result.block_safeguard],
            "blocks_kept_trim": sum(b.kept == BlockChoice.TRIM for b in result.block_safeguard),
        }
    return rep


def calibration_record(result) -> dict:
    """report.json's `calibration`: the source, the file given (`data`), the shape of the sequences
    pruned with, the files read (path, bytes, sha256; none for `self`, the Hub or sequences the
    caller gave) and the protocol (source, nsamples, seqlen, seed; `given` when the caller gave
    the sequences)."""
    cfg = result.config.calib
    rec = getattr(result, "calibration_data", None)
    out = {
        "source": cfg.source,
        "data": cfg.data,
        "shape": list(result.calibration_shape),
        "files": [f.to_dict() for f in rec.files] if rec is not None else [],
        "hub": rec.hub if rec is not None else None,
        "protocol": {
            "source": cfg.source if rec is not None else "given",
            "nsamples": rec.nsamples if rec is not None else None,
            "seqlen": rec.seqlen if rec is not None else None,
            "seed": rec.seed if rec is not None else None,
        },
    }
    return out


def metrics_table(metrics: dict) -> list[tuple[str, str, str]]:
    rows = []
    ppl = metrics.get("perplexity", {})
    dense = metrics.get("dense_perplexity", {})
    for name in ppl:
        d = dense.get(name)
        rows.append((name, f"{d:.3f}" if d is not None else "-", f"{ppl[name]:.3f}"))
    return rows


def _acc(score: dict | None, key: str = "acc") -> str:
    if not score or score.get(key) is None:
        return "-"
    err = score.get(f"{key}_stderr")
    return f"{100 * score[key]:.2f}" + (f" ±{100 * err:.2f}" if isinstance(err, float) else "")


def zero_shot_table(metrics: dict) -> list[str]:
    """Lines of the zero-shot table: acc and acc_norm (%, ± the harness's stderr) per task, dense
    and pruned, and the mean acc over the seven classic tasks."""
    pruned, dense = metrics.get("zero_shot", {}), metrics.get("dense_zero_shot", {})
    tasks = list(dict.fromkeys([*dense, *pruned]))
    if not tasks:
        return []
    both = bool(pruned) and bool(dense)
    head = (
        ["zero-shot (%)", "acc", "acc_norm"]
        if not both
        else ["zero-shot (%)", "dense acc", "pruned acc", "dense acc_norm", "pruned acc_norm"]
    )
    rows = [head]
    for t in tasks:
        if both:
            rows.append(
                [
                    t,
                    _acc(dense.get(t)),
                    _acc(pruned.get(t)),
                    _acc(dense.get(t), "acc_norm"),
                    _acc(pruned.get(t), "acc_norm"),
                ]
            )
        else:
            sc = pruned.get(t) or dense.get(t)
            rows.append([t, _acc(sc), _acc(sc, "acc_norm")])
    means = (
        [metrics.get("dense_zero_shot_mean"), metrics.get("zero_shot_mean")]
        if both
        else [metrics.get("zero_shot_mean", metrics.get("dense_zero_shot_mean"))]
    )
    if any(m is not None for m in means):
        cells = [f"{100 * m:.2f}" if m is not None else "-" for m in means]
        rows.append(["mean of 7 (acc)", *cells, *([""] * (len(head) - 1 - len(cells)))])
    w = [max(len(r[i]) for r in rows) + 2 for i in range(len(head))]
    return [
        "".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows
    ]


def excluded_lines(report: dict) -> list[str]:
    """One line per tower of a multimodal model left unpruned: "excluded: vision tower (N params):
    model.vision_tower"."""
    return [
        f"excluded: {e['kind']} ({e['params']} params): {e['name']}"
        for e in report.get("excluded", [])
    ]


def summary_text(report: dict) -> str:
    m = report["metrics"]
    sp = report["sparsity"]
    t = report["timings"]
    lines = []
    rows = metrics_table(m)
    if rows:
        w = max(12, max(len(r[0]) for r in rows) + 2)
        lines.append(f"{'perplexity':<{w}}{'dense':>12}{'pruned':>12}")
        for name, d, p in rows:
            ev = m.get("eval", {}).get(name, {})
            lim = "  (first {} windows)".format(ev["windows"]) if ev.get("limited") else ""
            lines.append(f"{name:<{w}}{d:>12}{p:>12}{lim}")
    lines += zero_shot_table(m)
    if m.get("self_kl"):
        s = m["self_kl"]
        lines.append(
            f"self NLL: dense {s['dense_nll']:.4f}  pruned {s['pruned_nll']:.4f}  "
            f"=> KL(dense||pruned) ~ {s['kl_estimate']:.4f} nats/token"
        )
    cov = report.get("coverage")
    lines.append(
        f"sparsity: {sp['achieved']:.4f} of pruned weights (requested {sp['requested']:g}, "
        f"allocation {report['allocation']['method']})" + (f"; {summary_of(cov)}" if cov else "")
    )
    lines += excluded_lines(report)
    lines.append(
        f"time: prune {t.get('prune_seconds', 0):.1f} s, calibration data "
        f"{t.get('calibration_data_seconds', 0):.1f} s, total {t.get('total_seconds', 0):.1f} s"
    )
    if report.get("search"):
        sr = report["search"]
        states = {}
        for t in sr["trials"]:
            states[t["state"]] = states.get(t["state"], 0) + 1
        best = sr["best"]
        lines.append(
            f"search: {len(sr['trials'])} trials "
            f"({', '.join(f'{v} {k}' for k, v in states.items())}), best #{best['number']} "
            f"{best['params']['family']}{' +trim' if best['params'].get('trim') else ''}: "
            f"held-out {sr['objective']} {best['value']:.6g} on {sr['holdout_sequences']} "
            f"sequences; final model pruned on all {sr.get('final_sequences', '-')}"
        )
        if len(sr.get("seeds", [])) > 1:
            lines.append(f"search seeds: {_spread_text(sr)}")
    if report.get("trim_guard"):
        g = report["trim_guard"]
        lines.append(
            f"TRIM model safeguard: held-out {g['objective']} with TRIM "
            f"{g['trim'][g['objective']]:.6g}, scorer "
            f"alone {g['scorer_alone'][g['objective']]:.6g}: kept {g['kept'].replace('_', ' ')}"
        )
    if "trim_summary" in report:
        ts = report["trim_summary"]
        lines.append(
            f"TRIM: {ts['kept_trim']}/{ts['linears']} linears kept the row-wise allocation; mean "
            "layer metric "
            f"{ts['mean_baseline_metric']:.5f} (uniform) -> {ts['mean_final_metric']:.5f}"
        )
        if ts["block_safeguard"]:
            lines.append(
                f"TRIM block safeguard: {ts['blocks_kept_trim']}/{len(ts['block_safeguard'])} "
                "blocks kept TRIM"
            )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    cfg = report["config"]
    trim = cfg["trim"]
    out = [
        "# trimprune report",
        "",
        f"- model: `{report['model'].get('source')}`",
        "- scorer: "
        f"**{cfg['scorer']['name']}**"
        f"{' + TRIM (' + trim['inputs'] + ')' if trim['enabled'] else ''}, "
        f"allocation **{report['allocation']['method']}**, target sparsity {cfg['sparsity']}"
        f"{', ' + cfg['mask_structure'] if cfg['mask_structure'] else ''}",
        f"- calibration: {report['calibration']['source']} {report['calibration']['shape']}",
        *(f"- {line}" for line in excluded_lines(report)),
        *(
            [f"- resumed from a resume state: blocks 0..{report['resumed_from_block']} restored"]
            if report.get("resumed_from_block") is not None
            else []
        ),
        "",
        "## Summary",
        "",
        "```",
        summary_text(report),
        "```",
        "",
        "## Sparsity per block",
        "",
        "| block | allocated | achieved | |",
        "|---:|---:|---:|---|",
    ]
    alloc = report["allocation"]["per_block"]
    for i, s in enumerate(report["sparsity"]["per_block"]):
        a = alloc[i] if i < len(alloc) else float("nan")
        bar = "#" * int(round(s * 40))
        flag = f" {FLAG}" if s > FLAG_ABOVE else ""
        out.append(f"| {i} | {a:.4f} | {s:.4f} | `{bar}`{flag} |")
    out += markdown_coverage(report)
    out += _markdown_linears(report)
    if report.get("moe_fallback"):
        out += [
            "",
            "## Experts with every token's statistics",
            "",
            "Routed fewer calibration tokens than `--moe-min-tokens`: their statistics came from "
            "every token.",
            "",
            "| linear | routed tokens |",
            "|---|---:|",
        ] + [f"| {k} | {v} |" for k, v in report["moe_fallback"].items()]
    if report.get("search"):
        out += _markdown_search(report["search"])
    if report.get("plots"):
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    out += ["", "## Timings", ""] + [
        f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}"
        for k, v in report["timings"].items()
    ]
    return "\n".join(out) + "\n"


def coverage_rows(cov: dict) -> list[list[str]]:
    """Rows of the coverage table: per kind present, the blocks' weights, how many were pruned and
    the fraction; then the total."""
    rows = [
        [LABELS.get(k, k), str(v["total"]), str(v["pruned"]), f"{100 * v['fraction']:.1f} %"]
        for k, v in cov["kinds"].items()
        if v["total"]
    ]
    rows.append(
        [
            "all block weights",
            str(cov["total"]),
            str(cov["pruned"]),
            f"{100 * cov['fraction']:.1f} %",
        ]
    )
    return rows


def markdown_coverage(report: dict) -> list[str]:
    """report.md's coverage section: the table of `coverage_rows`, the weights left dense and
    what is excluded by design; the experts whose statistics came from every token."""
    cov = report.get("coverage")
    if not cov:
        return []
    out = [
        "",
        "## Coverage",
        "",
        "| weights | parameters | pruned | fraction |",
        "|---|---:|---:|---:|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in coverage_rows(cov)]
    if cov["unprunable"]:
        out += ["", "Left dense (--allow-unpruned):", ""]
        out += [
            f"- `{u['name']}` {'x'.join(map(str, u['shape']))} ({u['kind']}), "
            f"{100 * u['share_of_block']:.2f} % of block {u['block']}"
            + ("; fused experts of an unknown layout" if u.get("unknown_layout") else "")
            for u in cov["unprunable"]
        ]
    out += ["", "Excluded by design:", ""]
    out += [
        f"- {e['what']}: {e['tensors']} tensors, {e['params']} parameters "
        f"({', '.join(f'`{n}`' for n in e['names'])})"
        for e in cov["excluded_by_design"]
    ]
    return out


def _markdown_linears(report: dict) -> list[str]:
    out = [
        "",
        "## Linears",
        "",
        "| linear | shape | target | achieved | row min | row max | TRIM lr | metric uniform -> "
        "final |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in report["layers"].items():
        t = r.get("trim")
        tm = (
            f"{t['baseline_metric']:.5f} -> {t['trim_weights_metric']:.5f} ({t['kept']})"
            if t
            else ""
        )
        lr = f"{t['lr']}" if t else ""
        out.append(
            f"| {name} | {r['shape'][0]}x{r['shape'][1]} | {r['target_sparsity']:.4f} | "
            f"{r['sparsity']:.4f} | "
            f"{r['row_sparsity_min']:.3f} | {r['row_sparsity_max']:.3f} | {lr} | {tm} |"
        )
    return out


def _spread_text(sr: dict) -> str:
    sp = sr["spread"]
    return (
        f"{sp['seeds']} studies (seeds {sr['seeds'][0]['seed']}..{sr['seeds'][-1]['seed']}), "
        f"best held-out {sr['objective']} min {sp['min']:.6g}, median {sp['median']:.6g}, "
        f"max {sp['max']:.6g}; seed {sr['seed']} won"
    )


def _markdown_seeds(sr: dict) -> list[str]:
    """The spread across `--search-seeds` studies: each seed's best trial."""
    out = [
        "",
        f"Seeds: {_spread_text(sr)}. The trials below are the winning seed's.",
        "",
        "| seed | trials | best trial | family | objective |",
        "|---:|---:|---:|---|---:|",
    ]
    for r in sr["seeds"]:
        b = r["best"]
        fam = f"{b['family']}{' +trim' if b.get('trim') else ''}"
        out.append(
            f"| {r['seed']} | {r['trials_run']} | {b['number']} | {fam} | {b['value']:.6g} |"
        )
    return out


def _markdown_search(sr: dict) -> list[str]:
    out = [
        "",
        "## Allocation search",
        "",
        f"Study `{sr['study']}`, objective held-out {sr['objective']} on "
        f"{sr['holdout_sequences']} sequences (pruning statistics on "
        f"{sr['prune_sequences']}); best trial #{sr['best']['number']}; the final model pruned "
        f"with it on all {sr.get('final_sequences', '-')} calibration sequences.",
        *(_markdown_seeds(sr) if len(sr.get("seeds", [])) > 1 else []),
        *(
            [
                "",
                f"Multi-fidelity stage ({sr['pruner']} pruner): each trial's held-out objective "
                f"was measured after block {sr['rung_block']} (the later blocks dense); "
                f"{sr['trials_stopped']} trials stopped there (their partial objective in "
                "brackets).",
            ]
            if sr.get("pruner", "none") != "none"
            else []
        ),
        "",
        "| trial | state | family | params | objective | seconds |",
        "|---:|---|---|---|---:|---:|",
    ]
    for t in sr["trials"]:
        ps = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in t["params"].items()
            if k != "family"
        )
        val = f"{t['value']:.6g}" if t["value"] is not None else "-"
        if t["state"] == "stopped":
            val = f"({t['partial']['metrics'][sr['objective']]:.6g})"
        sec = f"{t['seconds']:.1f}" if t.get("seconds") is not None else "-"
        out.append(
            f"| {t['number']} | {t['state']} | {t['params'].get('family', '-')} | {ps} | {val} "
            f"| {sec} |"
        )
    return out
