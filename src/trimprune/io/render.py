"""`trimprune report RUN_DIR [RUN_DIR ...] [-o OUT]`: one self-contained HTML page (the plots
embedded as data URIs) and the same as Markdown; with several runs, a comparison table first."""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from trimprune.core.coverage import summary_of
from trimprune.errors import TrimpruneError
from trimprune.io import plots
from trimprune.io.export import load_masks, write_text_atomic
from trimprune.io.report import FLAG, FLAG_ABOVE, coverage_rows, zero_shot_table


def load_run(folder: str | Path) -> dict:
    p = Path(folder) / "report.json"
    if not p.is_file():
        raise TrimpruneError(
            f"{str(folder)!r} has no report.json: give the --output folder of `trimprune prune`"
        )
    try:
        return _check_keys(Path(folder), json.loads(p.read_text()))
    except (json.JSONDecodeError, RecursionError) as e:
        raise TrimpruneError(
            f"{p} is not valid JSON ({getattr(e, 'msg', type(e).__name__)}): give the --output "
            "folder of a finished prune"
        ) from e


def run_plots(folder: Path, report: dict) -> dict[str, bytes]:
    """The run's PNG plots (name -> bytes): those it wrote, else made now (when matplotlib is
    installed)."""
    found = {
        Path(p).name: (folder / p).read_bytes()
        for p in report.get("plots", [])
        if (folder / p).is_file()
    }
    if found or not plots.available():
        return found
    rows = None
    if report.get("trim_summary") and (folder / "masks.safetensors").is_file():
        rows = {
            k: m.float().mean(1).numpy()
            for k, m in load_masks(folder / "masks.safetensors").items()
        }
    with tempfile.TemporaryDirectory() as tmp:
        names = plots.write_plots(Path(tmp), report, rows)
        return {n: (Path(tmp) / n).read_bytes() for n in names}


def _method(r: dict) -> tuple[str, str, str, str]:
    c = r["config"]
    trim = c["trim"]["inputs"] if c["trim"]["enabled"] else "-"
    sp = f"{c['sparsity']:g}" + (f" ({c['mask_structure']})" if c.get("mask_structure") else "")
    return c["scorer"]["name"], sp, r["allocation"]["method"], trim


def _dense(runs: list[tuple[str, dict]]) -> dict[str, tuple[dict, dict]]:
    """Per model source: the dense perplexity per set and the dense zero-shot scores per task the
    runs recorded (the first run that recorded a set / task gives it)."""
    out: dict[str, tuple[dict, dict]] = {}
    for _, r in runs:
        ppl, zs = out.setdefault(str(r["model"].get("source")), ({}, {}))
        m = r["metrics"]
        for k, v in (m.get("dense_perplexity") or {}).items():
            ppl.setdefault(k, v)
        for k, v in (m.get("dense_zero_shot") or {}).items():
            zs.setdefault(k, v)
    return out


def _ppl_cell(value: float | None, dense: float | None) -> str:
    """A perplexity and its ratio to the dense model's, e.g. "12.345 (x1.23)"."""
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" (x{value / dense:.2f})" if dense else "")


def _acc_cell(score: dict | None) -> str:
    return f"{100 * score['acc']:.2f}" if score and score.get("acc") is not None else "-"


def protocol_text(r: dict) -> str:
    """The run's evaluation and calibration protocol in one line: per perplexity set the window
    length, the windows used (of those available) and --eval-limit; the zero-shot tasks' shots,
    harness and --tasks-limit; the calibration source, sequences x tokens and seed."""
    parts = []
    for s, ev in (r["metrics"].get("eval") or {}).items():
        p = ev.get("protocol") or {}
        seqlen = p.get("seqlen")
        n = p.get("windows", ev.get("windows"))
        txt = f"{s}: " + (f"{n} windows" if n is not None else "? windows")
        txt += f" x {seqlen} tokens" if seqlen is not None else ""
        if p.get("total_windows") is not None:
            txt += f" of {p['total_windows']}"
        if p.get("limit") is not None:
            txt += f" (--eval-limit {p['limit']})"
        parts.append(txt)
    zp = r["metrics"].get("zero_shot_protocol")
    if zp:
        limit = zp.get("limit")
        parts.append(
            f"tasks: {zp.get('num_fewshot', 0)}-shot, {zp.get('harness', 'lm-eval')}"
            + (f" (--tasks-limit {limit})" if limit is not None else "")
        )
    c = r.get("calibration") or {}
    cp = c.get("protocol") or {}
    seed = cp.get("seed", r["config"].get("calib", {}).get("seed"))
    shape = c.get("shape")
    parts.append(
        f"calibration {c.get('source', '?')}"
        + (f" {shape[0]} x {shape[1]}" if shape and len(shape) == 2 else "")
        + (f", seed {seed}" if seed is not None else "")
    )
    return "; ".join(parts)


def _seed(r: dict) -> str:
    v = ((r.get("calibration") or {}).get("protocol") or {}).get("seed")
    if v is None:
        v = r["config"].get("calib", {}).get("seed")
    return "-" if v is None else str(v)


def versions_text(r: dict) -> str:
    v = r.get("versions") or {}
    keys = ("trimprune", "torch", "transformers", "python", "cuda", "gpu")
    return ", ".join(f"{k} {v[k]}" for k in keys if v.get(k)) or "-"


def command_text(r: dict) -> str:
    c = r.get("command")
    if not c:
        return "-"
    return c if isinstance(c, str) else " ".join(map(str, c))


def comparison(runs: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: a dense row per model (the dense perplexity and accuracy the runs
    recorded), then per run the method, sparsity, allocation, TRIM, perplexity per dataset with
    its ratio to dense, zero-shot accuracy per task and the mean over the seven classic tasks,
    seed, protocol and prune time."""
    sets = list(dict.fromkeys(k for _, r in runs for k in r["metrics"].get("perplexity", {})))
    tasks = list(
        dict.fromkeys(
            k
            for _, r in runs
            for key in ("dense_zero_shot", "zero_shot")
            for k in (r["metrics"].get(key) or {})
        )
    )
    head = (
        ["run", "method", "sparsity (achieved)", "allocation", "TRIM"]
        + [f"ppl {s} (x dense)" for s in sets]
        + [f"{t} acc (%)" for t in tasks]
        + ["zero-shot mean (%)", "seed", "protocol", "prune s"]
    )
    dense = _dense(runs)
    rows = []
    for model, (ppl, zs) in dense.items():
        if not ppl and not zs:
            continue
        rows.append(
            [f"dense ({model})" if len(dense) > 1 else "dense", "dense", "0", "-", "-"]
            + [f"{ppl[s]:.3f}" if s in ppl else "-" for s in sets]
            + [_acc_cell(zs.get(t)) for t in tasks]
            + [_mean_cell(next((r for _, r in runs if str(r["model"].get("source")) == model), {}))]
            + ["-", "-", "-"]
        )
    for name, r in runs:
        m = r["metrics"]
        scorer, sp, alloc, trim = _method(r)
        zs_mean = m.get("zero_shot_mean")
        d = dense.get(str(r["model"].get("source")), ({}, {}))[0]
        rows.append(
            [name, scorer, f"{sp} ({r['sparsity']['achieved']:.4f})", alloc, trim]
            + [_ppl_cell(m.get("perplexity", {}).get(s), d.get(s)) for s in sets]
            + [_acc_cell((m.get("zero_shot") or {}).get(t)) for t in tasks]
            + [
                f"{100 * zs_mean:.2f}" if zs_mean is not None else "-",
                _seed(r),
                protocol_text(r),
                f"{r['timings'].get('prune_seconds', 0):.1f}",
            ]
        )
    return head, rows


def _mean_cell(r: dict) -> str:
    v = (r.get("metrics") or {}).get("dense_zero_shot_mean") if r else None
    return f"{100 * v:.2f}" if v is not None else "-"


def block_rows(r: dict) -> list[list[str]]:
    """The per-block table: block, target, achieved, and a warning for a block sparser than 95 %
    (FLAG)."""
    alloc = r["allocation"].get("per_block") or []
    out = []
    for i, s in enumerate(r["sparsity"]["per_block"]):
        a = f"{alloc[i]:.4f}" if i < len(alloc) else "-"
        out.append([str(i), a, f"{s:.4f}", FLAG if s > FLAG_ABOVE else ""])
    return out


BLOCK_HEAD = ["block", "target", "achieved", "flag"]


def _html_table(head: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    h = (
        "<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead>"
        if head
        else ""
    )
    b = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table class='{cls}'>{h}<tbody>{b}</tbody></table>"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows
    ]


def _run_facts(r: dict) -> list[tuple[str, str]]:
    scorer, sp, alloc, trim = _method(r)
    facts = [
        ("model", str(r["model"].get("source"))),
        ("method", f"{scorer}, TRIM {trim}, allocation {alloc}"),
        ("sparsity", f"target {sp}, achieved {r['sparsity']['achieved']:.4f}"),
        ("calibration", f"{r['calibration']['source']} {r['calibration']['shape']}"),
        ("protocol", protocol_text(r)),
        ("seed", _seed(r)),
        ("command", command_text(r)),
        ("versions", versions_text(r)),
        ("prune time", f"{r['timings'].get('prune_seconds', 0):.1f} s"),
    ]
    files = list((r.get("calibration") or {}).get("files") or [])
    for s, ev in (r["metrics"].get("eval") or {}).items():
        files += [dict(f, set=s) for f in ev.get("files") or []]
    facts += [
        (
            f"data ({f.get('set', 'calibration')})",
            f"{f['path']} ({f['bytes']} bytes, sha256 {f['sha256']})",
        )
        for f in files
    ]
    high = [i for i, s in enumerate(r["sparsity"]["per_block"]) if s > FLAG_ABOVE]
    if high:
        facts.append(("warning", f"{FLAG}: blocks {', '.join(map(str, high))}"))
    if r.get("trim_summary"):
        t = r["trim_summary"]
        facts.append(
            (
                "TRIM",
                f"{t['kept_trim']}/{t['linears']} linears kept TRIM; "
                f"{t['blocks_kept_trim']}/{len(t['block_safeguard'])} blocks (block safeguard)",
            )
        )
    if r.get("coverage"):
        facts.append(("coverage", summary_of(r["coverage"])))
    m = r["metrics"]
    for s, p in m.get("perplexity", {}).items():
        d = m.get("dense_perplexity", {}).get(s)
        facts.append(
            (
                f"perplexity {s}",
                (f"dense {d:.3f} -> " if d is not None else "") + _ppl_cell(p, d),
            )
        )
    facts += [
        ("excluded", f"{e['kind']} ({e['params']} params): {e['name']}")
        for e in r.get("excluded", [])
    ]
    return facts + [(f"note {i + 1}", n) for i, n in enumerate(r.get("notes", []))]


CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}\n"
    "table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}"
    "td,th{border:1px solid #ccc;padding:0.25em 0.6em;\n"
    "text-align:right}td:first-child,th:first-child{text-align:left}"
    "table.facts td{text-align:left}th{background:#f2f2f2}"
    "img{max-width:100%;margin:0.4em 0}\n"
    "pre{background:#f7f7f7;padding:0.6em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em}"
)


def _img(name: str, data: bytes) -> str:
    return (
        f"<img alt='{html.escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(data).decode()}'>"
    )


def render_html(
    runs: list[tuple[str, dict, dict[str, bytes]]], figures: dict[str, bytes] | None = None
) -> str:
    """The page; `figures` (name -> PNG bytes): plots of the whole comparison, shown under its
    table (e.g. a sweep's perplexity against sparsity)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>trimprune report</title>",
        f"<style>{CSS}</style></head><body><h1>trimprune report</h1>",
    ]
    head, rows = comparison([(n, r) for n, r, _ in runs])
    parts.append("<h2>Comparison</h2>" + _html_table(head, rows))
    parts += [_img(n, d) for n, d in (figures or {}).items()]
    for name, r, images in runs:
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(_html_table(None, [[k, v] for k, v in _run_facts(r)], "facts"))
        zs = zero_shot_table(r["metrics"])
        if zs:
            parts.append("<pre>" + html.escape("\n".join(zs)) + "</pre>")
        parts += _html_coverage(r)
        parts += [_img(img, data) for img, data in images.items()]
        rows_b = block_rows(r)
        flagged = any(b[3] for b in rows_b)
        parts.append(
            f"<details{' open' if flagged else ''}><summary>sparsity per block"
            f"{' (' + html.escape(FLAG) + ')' if flagged else ''}</summary>"
            + _html_table(BLOCK_HEAD, rows_b)
            + "</details>"
        )
    return "\n".join(parts) + "</body></html>\n"


COVERAGE_HEAD = ["weights", "parameters", "pruned", "fraction"]


def _left_dense(cov: dict) -> list[list[str]]:
    return [
        [
            u["name"],
            "x".join(map(str, u["shape"])),
            u["kind"],
            f"{100 * u['share_of_block']:.2f} % of block {u['block']}",
        ]
        for u in cov["unprunable"]
    ]


def _excluded(cov: dict) -> list[list[str]]:
    return [
        [e["what"], str(e["tensors"]), str(e["params"]), ", ".join(e["names"])]
        for e in cov["excluded_by_design"]
    ]


def _html_coverage(r: dict) -> list[str]:
    """The coverage section of a run: the blocks' weights pruned per kind, those left dense, and
    what is excluded by design (reports without coverage show none)."""
    cov = r.get("coverage")
    if not cov:
        return []
    out = ["<h3>Coverage</h3>", _html_table(COVERAGE_HEAD, coverage_rows(cov))]
    if cov["unprunable"]:
        out.append(
            "<p>Left dense (--allow-unpruned):</p>"
            + _html_table(["weight", "shape", "kind", "share"], _left_dense(cov))
        )
    out.append(
        "<details><summary>excluded by design</summary>"
        + _html_table(["what", "tensors", "parameters", "names"], _excluded(cov))
        + "</details>"
    )
    return out


def _md_coverage(r: dict) -> list[str]:
    cov = r.get("coverage")
    if not cov:
        return []
    out = ["", "### Coverage", ""] + _md_table(COVERAGE_HEAD, coverage_rows(cov))
    if cov["unprunable"]:
        out += ["", "Left dense (--allow-unpruned):", ""]
        out += _md_table(["weight", "shape", "kind", "share"], _left_dense(cov))
    out += ["", "Excluded by design:", ""]
    out += _md_table(["what", "tensors", "parameters", "names"], _excluded(cov))
    return out


def render_markdown(
    runs: list[tuple[str, dict, Path]], out: Path, figures: Sequence[Path] = ()
) -> str:
    """The Markdown beside `out`; `figures`: PNG files of the whole comparison, linked under its
    table."""
    head, rows = comparison([(n, r) for n, r, _ in runs])
    lines = ["# trimprune report", "", "## Comparison", ""] + _md_table(head, rows)
    for f in figures:
        rel = Path(_relpath(Path(f), out.parent))
        lines += ["", f"![{rel.stem}]({rel.as_posix()})"]
    for name, r, folder in runs:
        lines += ["", f"## {name}", ""] + [f"- {k}: {v}" for k, v in _run_facts(r)]
        zs = zero_shot_table(r["metrics"])
        if zs:
            lines += ["", "```", *zs, "```"]
        lines += ["", "### Sparsity per block", ""] + _md_table(BLOCK_HEAD, block_rows(r))
        lines += _md_coverage(r)
        for p in r.get("plots", []):
            if (folder / p).is_file():
                rel = Path(_relpath(folder / p, out.parent))
                lines += ["", f"![{rel.stem}]({rel.as_posix()})"]
    return "\n".join(lines) + "\n"


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


REQUIRED = ("config", "model", "metrics", "allocation", "sparsity")


def _incomplete(folders, reports, names, html_path, e: Exception) -> TrimpruneError:
    """The error for a report.json that lacks what the page shows: the file and the key."""
    for f, r, n in zip(folders, reports, names):
        try:
            render_html([(n, r, {})])
            render_markdown([(n, r, f)], html_path)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
            e = err
            what = f"the key {err.args[0]!r}" if isinstance(err, KeyError) else f"a value ({err})"
            return TrimpruneError(
                f"{Path(f) / 'report.json'} lacks {what}: give the --output folder of a finished "
                "prune, or run the prune again"
            )
    return TrimpruneError(f"the reports cannot be rendered ({type(e).__name__}: {e})")


def _check_keys(folder: Path, report) -> dict:
    if not isinstance(report, dict):
        raise TrimpruneError(
            f"{folder / 'report.json'} holds a {type(report).__name__}, not a report: give the "
            "--output folder of a finished prune"
        )
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise TrimpruneError(
            f"{folder / 'report.json'} lacks the key {missing[0]!r}: give the --output folder of a "
            "finished prune, or run the prune again"
        )
    return report


def write_report(
    run_dirs: list[str], out: str | Path | None = None, figures: Sequence[Path] = ()
) -> tuple[Path, Path]:
    """Write OUT (.html; default RUN_DIR/report.html for one run, else trimprune-report.html) and
    the Markdown beside it (OUT with .md; report-page.md where that would be a run's own
    report.md). `figures`: PNG files of the whole comparison (embedded in the page, linked from the
    Markdown), e.g. the sweep's plot."""
    folders = [Path(d) for d in run_dirs]
    reports = [load_run(f) for f in folders]
    html_path = (
        Path(out)
        if out
        else (folders[0] / "report.html" if len(folders) == 1 else Path("trimprune-report.html"))
    )
    if html_path.suffix != ".html":
        html_path = html_path.with_suffix(".html")
    from trimprune.io.export import make_parent

    make_parent(html_path, "-o")
    names = [f.resolve().name for f in folders]
    try:
        page = render_html(
            [(n, r, run_plots(f, r)) for n, r, f in zip(names, reports, folders)],
            {Path(f).name: Path(f).read_bytes() for f in figures},
        )
        md = render_markdown(
            [(n, r, f) for n, r, f in zip(names, reports, folders)], html_path, figures
        )
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        raise _incomplete(folders, reports, names, html_path, e) from e
    md_path = html_path.with_suffix(".md")
    if any(
        md_path.resolve() == (f / "report.md").resolve() for f in folders
    ):  # the prune's own report.md
        md_path = html_path.with_name(f"{html_path.stem}-page.md")
    write_text_atomic(html_path, page)
    write_text_atomic(md_path, md)
    return html_path, md_path
