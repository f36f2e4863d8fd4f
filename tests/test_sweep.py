"""`trimprune sweep`: one load, one calibration capture and one dense evaluation for several
(method, sparsity) runs, each pruned from the restored dense weights: the same masks and the same
perplexity, bit for bit, as a separate `trimprune prune` with its settings."""

import json

import pytest
import torch

from trimprune.cli import main
from trimprune.io.export import load_masks

COMMON = ["--calib", "self", "--nsamples", "4", "--seqlen", "16", "--quiet"]
COMMON += ["--eval", "wikitext2", "--eval-limit", "2", "--eval-seqlen", "32"]
RUNS = ("wanda-0.5", "wanda-0.7", "wanda+trim-0.5", "wanda+trim-0.7", "sparsegpt-0.5")


@pytest.fixture(scope="module")
def swept(tiny_dir, tmp_path_factory, data_dir):
    """A sweep over wanda, wanda+trim at 0.5 and 0.7 (counting the loads and calibration captures),
    and one over magnitude, sparsegpt at 0.5."""
    import trimprune.io.models as models
    import trimprune.session as session

    d = tmp_path_factory.mktemp("sweep")
    counts = {"load": 0, "calibration": 0, "capture": 0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIMPRUNE_DATA", str(data_dir))

        def counted(name, module, attr):
            real = getattr(module, attr)

            def wrapper(*a, **k):
                counts[name] += 1
                return real(*a, **k)

            mp.setattr(module, attr, wrapper)

        counted("load", models, "load_model")
        counted("calibration", session, "load_calibration")
        counted("capture", session, "capture")
        argv = ["sweep", "--model", str(tiny_dir), *COMMON, "--output", str(d / "sw")]
        assert main([*argv, "--sparsities", "0.5,0.7", "--methods", "wanda,wanda+trim"]) == 0
        first = dict(counts)
        argv[-1] = str(d / "sg")
        assert main([*argv, "--sparsities", "0.5", "--methods", "magnitude,sparsegpt"]) == 0
    return d, first


def _prune(tiny_dir, out, method: str, sparsity: str) -> None:
    scorer, *trim = method.split("+")
    argv = ["prune", "--model", str(tiny_dir), *COMMON, "--output", str(out), "--no-save-model"]
    argv += ["--scorer", scorer, "--sparsity", sparsity] + (["--trim"] if trim else [])
    assert main(argv) == 0


def _run_dir(swept, name):
    d, _ = swept
    return d / ("sw" if name.startswith("wanda") else "sg") / name


def test_one_load_and_one_capture_for_four_runs(swept):
    _, counts = swept
    assert counts == {"load": 1, "calibration": 1, "capture": 1}


@pytest.mark.parametrize("name", ["wanda-0.7", "wanda+trim-0.7", "sparsegpt-0.5"])
def test_each_run_equals_a_separate_prune(swept, tiny_dir, tmp_path, with_data_env, name):
    """Runs after the first start from the restored dense weights: the masks and the perplexity
    equal those of a separate prune exactly (the last runs of the sweep are the strictest)."""
    method, sparsity = name.rsplit("-", 1)
    _prune(tiny_dir, tmp_path / "p", method, sparsity)
    got, want = _run_dir(swept, name), tmp_path / "p"
    a, b = load_masks(got / "masks.safetensors"), load_masks(want / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((f / "report.json").read_text()) for f in (got, want))
    for key in ("perplexity", "dense_perplexity"):
        assert ra["metrics"][key] == rb["metrics"][key], key  # bit-identical floats
    assert ra["sparsity"]["achieved"] == rb["sparsity"]["achieved"]
    assert ra["config"] == rb["config"]


def test_outputs_report_and_summary(swept):
    d, _ = swept
    sw = d / "sw"
    summary = json.loads((sw / "sweep.json").read_text())
    names = [r["name"] for r in summary["runs"]]
    assert names == list(RUNS[:4])
    assert summary["methods"] == ["wanda", "wanda+trim"] and summary["sparsities"] == [0.5, 0.7]
    dense = summary["dense"]["perplexity"]["wikitext2"]
    for r in summary["runs"]:
        rep = json.loads((sw / r["report"]).read_text())
        assert rep["metrics"]["perplexity"] == r["perplexity"]
        assert r["ratio_to_dense"]["wikitext2"] == r["perplexity"]["wikitext2"] / dense
        assert abs(r["achieved"] - r["sparsity"]) < 0.02
        assert not (sw / r["name"] / "model.safetensors").exists()  # no weights by default
    md = (sw / "report.md").read_text()
    table = md.split("## Comparison", 1)[1].split("\n\n", 2)[1].splitlines()
    rows = [line.split("|")[1].strip() for line in table[2:]]
    assert rows == ["dense", *RUNS[:4]]  # one row per run, plus dense
    assert (sw / "report.html").read_text().count("<tr>") >= 6


def test_sweep_plot(swept):
    pytest.importorskip("matplotlib")
    sw = swept[0] / "sw"
    assert json.loads((sw / "sweep.json").read_text())["plots"] == ["sweep.png"]
    assert (sw / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![sweep](sweep.png)" in (sw / "report.md").read_text()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--methods", "wanda,wandaa"], "'wandaa' is not a method"),
        (["--methods", "wanda+owl"], "'wanda+owl' is not a method"),
        (["--sparsities", "0.5,1.2"], "'1.2' is not a sparsity"),
        (["--sparsities", "0.5,0.5"], "'0.5' is given twice"),
        (["--methods", "wanda+trim", "--mask-structure", "2:4", "--sparsities", "0.5"], "--trim"),
        (["--allocation", "search"], "allocation search"),
    ],
)
def test_bad_specs_exit_2_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, flags, named):
    import trimprune.io.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    out = tmp_path / "out"
    argv = ["sweep", "--model", str(tiny_dir), "--calib", "self", "--output", str(out), *flags]
    try:  # a usage error exits from argparse, a config error returns
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
