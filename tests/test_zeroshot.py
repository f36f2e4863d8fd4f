"""Zero-shot accuracy through the real lm-evaluation-harness, offline from local task files."""

import json

import pytest

from trimprune.cli import main

pytest.importorskip("lm_eval")

TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.heavy
def test_eval_tasks_offline_reads_the_harness_results(
    tiny_dir, data_dir, tmp_path, capsys, offline
):
    out = tmp_path / "zs.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--tasks",
                TASKS,
                "--tasks-limit",
                "6",
                "--batch-size",
                "4",
                "--tasks-data",
                str(data_dir),
                "--device",
                "cpu",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())["metrics"]
    zs = m["zero_shot"]
    assert list(zs) == TASKS.split(",")
    for t, s in zs.items():
        assert (
            s["samples"] == 6
            and 0 <= s["acc"] <= 1
            and s["acc"] * 6 == pytest.approx(round(s["acc"] * 6))
        ), t
        assert isinstance(s["acc_stderr"], float) and s["acc_stderr"] >= 0, t
    assert (zs["hellaswag"]["acc_norm"] is not None) and zs["boolq"][
        "acc_norm"
    ] is None  # as the harness defines
    classic = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert m["zero_shot_mean"] == pytest.approx(sum(zs[t]["acc"] for t in classic) / 7)
    printed = capsys.readouterr().out
    assert "mean of 7 (acc)" in printed and "hellaswag" in printed


@pytest.mark.heavy
def test_prune_with_tasks_reports_dense_and_pruned(
    tiny_dir, data_dir, tmp_path, offline, with_data_env
):
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--output",
                str(tmp_path / "o"),
                "--calib",
                "self",
                "--nsamples",
                "4",
                "--seqlen",
                "16",
                "--tasks",
                "rte,boolq",
                "--tasks-limit",
                "4",
                "--quiet",
                "--no-save-model",
            ]
        )
        == 0
    )
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (
        set(r["metrics"]["zero_shot"]) == set(r["metrics"]["dense_zero_shot"]) == {"rte", "boolq"}
    )
    assert r["metrics"]["zero_shot_mean"] is None  # not all seven classic tasks ran
    assert any("--tasks-limit 4" in n for n in r["notes"])


def test_unknown_task_is_refused_before_the_model_loads(tmp_path, capsys):
    assert (
        main(["eval", "--model", str(tmp_path / "nothing-here"), "--tasks", "boolq,nosuchtask"])
        == 2
    )
    err = capsys.readouterr().err
    assert "nosuchtask" in err and len(err.strip().splitlines()) == 1
