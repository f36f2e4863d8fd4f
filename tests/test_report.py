"""Plots next to report.json, and `trimprune report`: one self-contained HTML page plus Markdown."""

import base64
import json

import pytest

from trimprune.cli import main

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("runs")
    base = [
        "prune",
        "--model",
        str(tiny_dir),
        "--calib",
        "self",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--quiet",
        "--eval",
        "wikitext2",
        "--eval-limit",
        "2",
        "--eval-seqlen",
        "64",
        "--no-save-model",
    ]
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-scoped monkeypatch can't
        mp.setenv("TRIMPRUNE_DATA", str(data_dir))
        assert main(base + ["--output", str(d / "trim"), "--trim"]) == 0
        assert main(base + ["--output", str(d / "alone"), "--sparsity", "0.7"]) == 0
    return d


def test_every_prune_writes_its_plots(runs):
    r = json.loads((runs / "trim" / "report.json").read_text())
    assert r["plots"] == [
        "plots/sparsity_per_block.png",
        "plots/row_sparsity.png",
        "plots/trim_metric.png",
        "plots/metrics.png",
    ]
    for p in r["plots"]:
        assert (runs / "trim" / p).read_bytes()[:8] == PNG
    alone = json.loads((runs / "alone" / "report.json").read_text())
    assert alone["plots"] == ["plots/sparsity_per_block.png", "plots/metrics.png"]  # no TRIM plots
    assert "![trim_metric](plots/trim_metric.png)" in (runs / "trim" / "report.md").read_text()


def test_report_page_compares_runs_and_embeds_the_plots(runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert main(["report", str(runs / "trim"), str(runs / "alone"), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count("<h2>") == 3 and "<h2>trim</h2>" in page and "<h2>alone</h2>" in page
    assert "ppl wikitext2" in page and "zero-shot mean (%)" in page and "prune s" in page
    imgs = page.split("data:image/png;base64,")[1:]
    assert len(imgs) == 6 and all(base64.b64decode(i.split("'")[0])[:8] == PNG for i in imgs)
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    md = out.with_suffix(".md").read_text()
    assert (
        "| run | method | sparsity (achieved) |" in md and "| trim | wanda | 0.5 (0.5000) |" in md
    )
    assert "| alone | wanda | 0.7 (0.6" in md
    assert (runs / "trim" / "plots" / "row_sparsity.png").is_file()


def test_report_of_one_run_keeps_its_own_markdown(runs):
    before = (runs / "alone" / "report.md").read_text()
    assert main(["report", str(runs / "alone")]) == 0
    assert (runs / "alone" / "report.html").is_file() and (
        runs / "alone" / "report-page.md"
    ).is_file()
    assert (runs / "alone" / "report.md").read_text() == before


def test_report_of_a_folder_without_a_report_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no report.json" in err[0]
