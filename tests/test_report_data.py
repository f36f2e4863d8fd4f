"""report.json names every data file a prune read (path, bytes, SHA-256) and the protocol of the
calibration and of every evaluation set."""

import hashlib
import json
import shutil
from pathlib import Path

from trimprune.cli import main


def _file(path: Path) -> dict:
    return {
        "path": str(path.resolve()),
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


BASE = ["--nsamples", "3", "--seqlen", "16", "--quiet", "--no-save-model", "--eval-limit", "2"]


def test_report_lists_the_files_given_on_the_command_line(tiny_dir, data_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    shutil.copy(data_dir / "wikitext2-raw" / "wiki.test.raw", tmp_path / "wiki.raw")
    calib.write_text((data_dir / "wikitext2-raw" / "wiki.test.raw").read_text()[:20000])
    mine = tmp_path / "mine.txt"
    mine.write_text((data_dir / "wikitext2-raw" / "wiki.test.raw").read_text()[20000:40000])
    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_dir), "--calib", "wikitext2", "--calib-data", str(calib)]
    argv += ["--seed", "7", "--eval", "mine,wikitext2", "--eval-data", f"mine={mine}"]
    argv += ["--eval-data", f"wikitext2={tmp_path / 'wiki.raw'}", "--eval-seqlen", "32"]
    assert main([*argv, *BASE, "--output", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    c = r["calibration"]
    assert c["files"] == [_file(calib)] and c["hub"] is None
    assert c["protocol"] == {"source": "wikitext2", "nsamples": 3, "seqlen": 16, "seed": 7}
    for key in ("eval", "dense_eval"):
        ev = r["metrics"][key]
        assert ev["mine"]["files"] == [_file(mine)]
        assert ev["wikitext2"]["files"] == [_file(tmp_path / "wiki.raw")]
        p = ev["mine"]["protocol"]
        assert p["dataset"] == "mine" and p["seqlen"] == 32 and p["windows"] == 2
        assert p["limit"] == 2 and p["total_windows"] > 2 and p["max_windows"] is None
        assert ev["wikitext2"]["protocol"]["split"] == "test"
        assert ev["wikitext2"]["protocol"]["joined_with"] == "\n\n"


def test_report_lists_the_files_found_under_trimprune_data(tiny_dir, with_data_env, tmp_path):
    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_dir), "--calib", "c4", "--eval", "wikitext2"]
    assert main([*argv, *BASE, "--output", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    c4 = sorted((with_data_env / "c4").glob("c4-train.*.json*"))[0]
    assert r["calibration"]["files"] == [_file(c4)]
    assert r["calibration"]["data"] is None
    assert r["calibration"]["protocol"]["nsamples"] == 3
    ev = r["metrics"]["eval"]["wikitext2"]
    assert ev["files"] == [_file(with_data_env / "wikitext2-raw" / "test.jsonl")]
    assert ev["source"] == str(with_data_env / "wikitext2-raw" / "test.jsonl")
    assert ev["protocol"]["windows"] == 2 and ev["protocol"]["limit"] == 2
