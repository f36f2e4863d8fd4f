"""`trimprune report` on report.json files built here (no prune): the dense row, per-task accuracy
columns, the protocol, command, versions and seed of every run, perplexity as a ratio to dense,
the flag of blocks above 95 % sparsity, old reports, and the search plot's drawing order."""

import html
import json
from pathlib import Path

import pytest

from trimprune.io.render import comparison, render_html, render_markdown, write_report
from trimprune.io.report import FLAG, markdown

TASKS = ("boolq", "rte")


def _report(per_block=(0.5, 0.5), ppl=30.0, dense=20.0, seed=3, tasks=TASKS) -> dict:
    return {
        "command": ["trimprune", "prune", "--model", "tiny", "--seed", str(seed)],
        "versions": {"trimprune": "9.9.9", "torch": "2.13.0", "transformers": "5.23.0"},
        "model": {"source": "tiny"},
        "config": {
            "sparsity": 0.5,
            "mask_structure": None,
            "scorer": {"name": "wanda"},
            "trim": {"enabled": False, "inputs": "all"},
            "calib": {"source": "c4", "seed": seed},
        },
        "calibration": {
            "source": "c4",
            "data": None,
            "shape": [4, 16],
            "files": [{"path": "/data/c4.jsonl", "bytes": 123, "sha256": "ab" * 32}],
            "protocol": {"source": "c4", "nsamples": 4, "seqlen": 16, "seed": seed},
        },
        "sparsity": {"requested": 0.5, "achieved": 0.5, "per_block": list(per_block)},
        "allocation": {"method": "owl", "per_block": list(per_block)},
        "layers": {},
        "timings": {"prune_seconds": 1.5},
        "notes": [],
        "metrics": {
            "perplexity": {"wikitext2": ppl},
            "dense_perplexity": {"wikitext2": dense},
            "eval": {
                "wikitext2": {
                    "windows": 2,
                    "protocol": {"seqlen": 64, "windows": 2, "total_windows": 40, "limit": 2},
                    "files": [{"path": "/data/test.jsonl", "bytes": 9, "sha256": "cd" * 32}],
                }
            },
            "zero_shot": {t: {"acc": 0.5 + 0.1 * i} for i, t in enumerate(tasks)},
            "dense_zero_shot": {t: {"acc": 0.6 + 0.1 * i} for i, t in enumerate(tasks)},
            "zero_shot_mean": None,
        },
    }


def _pages(runs: list[tuple[str, dict]], tmp_path: Path) -> tuple[str, str]:
    page = render_html([(n, r, {}) for n, r in runs])
    md = render_markdown([(n, r, tmp_path) for n, r in runs], tmp_path / "out.html")
    return page, md


def test_comparison_has_a_dense_row_task_columns_and_the_ratio_to_dense(tmp_path):
    runs = [("a", _report(ppl=30.0)), ("b", _report(ppl=25.0, seed=5))]
    head, rows = comparison(runs)
    assert [f"{t} acc (%)" for t in TASKS] == [h for h in head if h.endswith("acc (%)")]
    dense = rows[0]
    assert dense[0] == "dense" and dense[head.index("ppl wikitext2 (x dense)")] == "20.000"
    assert dense[head.index("boolq acc (%)")] == "60.00"
    assert dense[head.index("rte acc (%)")] == "70.00"
    a, b = rows[1], rows[2]
    assert a[head.index("ppl wikitext2 (x dense)")] == "30.000 (x1.50)"
    assert b[head.index("ppl wikitext2 (x dense)")] == "25.000 (x1.25)"
    assert a[head.index("rte acc (%)")] == "60.00" and b[head.index("seed")] == "5"
    proto = a[head.index("protocol")]
    assert "wikitext2: 2 windows x 64 tokens of 40 (--eval-limit 2)" in proto
    assert "calibration c4 4 x 16, seed 3" in proto
    page, md = _pages(runs, tmp_path)
    for text in (page, md):
        assert "trimprune prune --model tiny --seed 5" in text
        assert "trimprune 9.9.9, torch 2.13.0, transformers 5.23.0" in text
        assert "/data/c4.jsonl (123 bytes, sha256 " + "ab" * 32 in text
        assert "/data/test.jsonl (9 bytes" in text
        assert "rte acc (%)" in text


def test_a_block_above_95_percent_is_flagged(tmp_path):
    hi, lo = _report(per_block=(0.99, 0.5)), _report(per_block=(0.9, 0.5))
    for r, flagged in ((hi, True), (lo, False)):
        page, md = _pages([("run", r)], tmp_path)
        assert (html.escape(FLAG) in page) is flagged
        for text in (md, markdown(r | {"coverage": None})):
            assert (FLAG in text) is flagged
    page, md = _pages([("run", hi)], tmp_path)
    assert f"| 0 | 0.9900 | 0.9900 | {FLAG} |" in md and "| 1 | 0.5000 | 0.5000 |  |" in md
    assert "blocks 0" in md


def test_an_old_report_without_the_new_keys_renders(tmp_path):
    r = _report()
    for k in ("command", "versions"):
        del r[k]
    r["calibration"] = {"source": "c4", "data": None, "shape": [4, 16]}
    r["metrics"] = {
        "perplexity": {"wikitext2": 30.0},
        "dense_perplexity": {},
        "eval": {"wikitext2": {"windows": 2, "source": "default location"}},
    }
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(r))
    html_path, md_path = write_report([str(tmp_path / "old")], str(tmp_path / "page.html"))
    md = md_path.read_text()
    assert "| old | wanda |" in md and "30.000 |" in md and "- command: -" in md
    assert "seed 3" in md  # from the config
    assert html_path.read_text().count("<h2>") == 2


def test_search_plot_draws_the_winner_last_and_on_top():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from trimprune.io.plots import draw_search_profile

    win = [0.4, 0.6, 0.5]
    prof = {"search": win, "uniform": [0.5] * 3, "owl": [0.45, 0.55, 0.5], "atp": [0.4, 0.5, 0.6]}
    fig, ax = plt.subplots()
    draw_search_profile(ax, {"search": {"profiles": prof}})
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines][-1] == "search (best)"
    assert list(lines[-1].get_ydata()) == win
    assert lines[-1].get_zorder() > max(ln.get_zorder() for ln in lines[:-1])
    assert lines[-1].get_visible() and lines[-1].get_alpha() in (None, 1.0)
    plt.close(fig)


def test_metrics_plot_shows_perplexity_as_the_ratio_to_dense_on_a_linear_axis(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from trimprune.io import plots

    seen = {}
    real = plt.Figure.savefig

    def keep(fig, *a, **k):
        seen["axes"] = fig.axes
        return real(fig, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        plots.metrics(_report(ppl=30.0, dense=20.0), tmp_path / "m.png")
    ax = seen["axes"][0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert [p.get_height() for p in ax.patches] == [pytest.approx(1.5)]
