"""Zero-shot accuracy through the real lm-evaluation-harness, offline from local task files."""

import json
import re

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
    assert r["metrics"]["zero_shot_protocol"] | {"harness": None} == {
        "harness": None,
        "tasks": ["rte", "boolq"],
        "num_fewshot": 0,  # the papers' zero-shot unless --tasks-num-fewshot
        "limit": 4,
        "batch_size": 8,
    }
    assert any("--tasks-limit 4" in n for n in r["notes"])


def test_unknown_task_is_refused_before_the_model_loads(tmp_path, capsys):
    assert (
        main(["eval", "--model", str(tmp_path / "nothing-here"), "--tasks", "boolq,nosuchtask"])
        == 2
    )
    err = capsys.readouterr().err
    assert "nosuchtask" in err and len(err.strip().splitlines()) == 1


@pytest.mark.heavy
def test_harness_is_quiet_and_gets_num_fewshot(
    tiny_dir, data_dir, tmp_path, capfd, caplog, offline, monkeypatch
):
    """Without --verbose nothing of lm-evaluation-harness reaches stderr (its WARNING lines, its
    bars, the "fatal: not a git repository" of its `git describe` outside a repository): only our
    timestamped line per task. --tasks-num-fewshot reaches the harness (its own task configs say
    so) and the output's protocol."""
    import lm_eval

    seen = []
    real = lm_eval.simple_evaluate

    def spy(**kw):
        out = real(**kw)
        seen.append((kw["num_fewshot"], {t: c["num_fewshot"] for t, c in out["configs"].items()}))
        return out

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    monkeypatch.chdir(tmp_path)  # not a git repository
    out = tmp_path / "zs.json"
    args = ["eval", "--model", str(tiny_dir), "--tasks", "rte,boolq", "--tasks-limit", "3"]
    args += ["--tasks-data", str(data_dir), "--device", "cpu", "--output", str(out)]
    assert main(args + ["--tasks-num-fewshot", "2"]) == 0
    err = capfd.readouterr().err
    assert "WARNING" not in err and "fatal" not in err and "it/s" not in err, err
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    for task in ("rte", "boolq"):
        assert re.search(
            rf"^{stamp}2-shot {task} of the model: acc \d+\.\d\d % \(3 examples\) in ",
            err,
            re.M,
        ), err
    assert all(re.match(stamp, x) for x in err.splitlines()), err
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")]
    assert seen == [(2, {"rte": 2}), (2, {"boolq": 2})]
    protocol = json.loads(out.read_text())["metrics"]["zero_shot_protocol"]
    assert protocol["num_fewshot"] == 2 and protocol["limit"] == 3
    # --verbose: the harness speaks again (its log records, bars and git's complaint)
    assert main(args + ["--tasks", "rte", "--verbose", "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "fatal: not a git repository" in err and "it/s" in err, err
    assert any(r.name.startswith("lm_eval") for r in caplog.records)


@pytest.mark.parametrize("cmd", ["eval", "prune"])
def test_negative_num_fewshot_is_refused_before_the_model_loads(cmd, tmp_path, capsys):
    args = [cmd, "--model", str(tmp_path / "nothing-here"), "--tasks", "boolq"]
    args += ["--tasks-num-fewshot", "-1"] + (["--output", str(tmp_path / "o")] * (cmd == "prune"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--tasks-num-fewshot -1 must be >= 0" in err and len(err.strip().splitlines()) == 1


def test_help_texts_say_what_flags_do_and_show_each_default_once(capsys):
    """--no-trim-*safeguard say what they turn off; each batch size says what it batches; eval
    --help shows every default once."""
    for cmd in ("prune", "eval"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert text.count("(default: 4)") == 1 and "(default: None)" not in text, text
        assert "default: the checkpoint's own" in text and "(default: False)" not in text
        assert "perplexity windows (of --eval) per forward pass" in text
        assert (
            "requests (one answer choice of one example each) per forward pass in --tasks" in text
        )
        assert "--tasks-num-fewshot K" in text and "--verbose" in text
        if cmd == "prune":
            assert "--no-trim-safeguard turn off the linear safeguard" in text
            assert "--no-trim-block-safeguard turn off the block safeguard" in text
            assert "calibration sequences per forward pass while pruning" in text
        else:
            assert "--batch-size is its older name here" in text
            assert "(default: 2048)" in text and text.count("2048") == 1
