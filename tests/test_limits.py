"""The limits on inputs (docs/validation.md, "Limits"): each case ends in exit code 2 with one line,
fast, and before the model loads where the check does not need it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trimprune.io.models as models
from trimprune.algo.allocation.base import read_allocation_file
from trimprune.calib.data import calib_c4
from trimprune.cli import main
from trimprune.config import PruneConfig
from trimprune.errors import InputFileError, NonFiniteError, TrimpruneError
from trimprune.limits import MAX_DEPTH, load_yaml

ALIAS_BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


@pytest.fixture
def no_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(models, "load_model", boom)


def _one_line(capsys) -> str:
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e]
    assert len(err) == 1 and err[0].startswith("trimprune: error"), err
    return err[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits-data")
    words = "the of and to in a is was for on that with as by at from it an were are".split()
    docs = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(150)) for i in range(8)]
    (d / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (d / "short.jsonl").write_text("".join(json.dumps({"text": "a b c"}) + "\n" for _ in range(5)))
    return d


def _main(argv) -> int:
    """cli.main, with argparse's usage errors (SystemExit) as their exit code."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _prune(model, out, *extra) -> int:
    base = ["prune", "--model", str(model), "--output", str(out), "--quiet"]
    return _main(base + ["--nsamples", "2", "--seqlen", "32", *extra])


def _fast(small) -> list[str]:
    return ["--calib", "c4", "--calib-data", str(small / "calib.jsonl")]


# ----------------------------------------------------------------------------- 1. files
def test_recipe_alias_bomb_is_refused_at_once(tmp_path):
    assert len(ALIAS_BOMB.encode()) < 400
    t0 = time.perf_counter()
    with pytest.raises(InputFileError, match="anchor or alias"):
        PruneConfig.recipe_flat(ALIAS_BOMB)
    f = tmp_path / "a.json"
    f.write_text(ALIAS_BOMB)
    with pytest.raises(InputFileError, match="anchor or alias"):
        read_allocation_file(f)
    assert time.perf_counter() - t0 < 0.5


def test_large_and_deep_files_are_refused_before_parsing(tmp_path, tiny_dir, capsys, no_load):
    big = tmp_path / "big.yaml"
    big.write_text("sparsity: 0.5\n" + "#" * (1 << 20))
    assert _prune(tiny_dir, tmp_path / "o", "--recipe", str(big)) == 2
    assert "above the limit of 1,048,576" in _one_line(capsys)
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(InputFileError, match="deeper than 32"):
        load_yaml(deep, "x")
    f = tmp_path / "alloc.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputFileError, match="deeper than 32"):
        read_allocation_file(f)
    f.write_text("x" * ((1 << 20) + 1))
    with pytest.raises(InputFileError, match="limit"):
        read_allocation_file(f)
    block = "".join("  " * i + f"k{i}:\n" for i in range(40))
    with pytest.raises(InputFileError, match="deeper"):
        load_yaml(block, "x")
    assert load_yaml("a:\n  b:\n    - [1, {c: 2}]\n", "x") == {"a": {"b": [[1, {"c": 2}]]}}


def test_allocation_keys_and_json_numbers(tmp_path, tiny_dir, capsys, no_load):
    f = tmp_path / "a.json"
    f.write_text('{"\u00b2": 0.5, "1": 0.5}')
    assert _prune(tiny_dir, tmp_path / "o", "--allocation", f"file:{f}") == 2
    assert "ASCII digits" in _one_line(capsys)
    f.write_text("[5e-1, 0.5]")
    assert read_allocation_file(f) == [0.5, 0.5]
    f.write_text('{"per_block": [5e-1, 5E-1]}')
    assert read_allocation_file(f) == [0.5, 0.5]


# ----------------------------------------------------------------------------- 2. data
class _Tok:
    def __call__(self, text, return_tensors=None, verbose=True):
        class R:
            input_ids = torch.arange(len(text.split())).unsqueeze(0)

        return R()


def test_c4_sampler_is_bounded_and_names_the_count():
    rows = ["a b c"] * 50
    with pytest.raises(TrimpruneError, match="0 of the 50 calibration documents"):
        calib_c4(_Tok(), rows, 4, 8, 0)
    out = calib_c4(_Tok(), rows + [" ".join(["w"] * 20)], 3, 8, 0)
    assert out.shape == (3, 8)


def test_short_calibration_file_is_refused_before_the_load(tmp_path, tiny_dir, small, capsys):
    data = ["--calib", "c4", "--calib-data", str(small / "short.jsonl")]
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
        assert _prune(tiny_dir, tmp_path / "o", *data) == 2
    assert "none of its 5 documents can be longer than --seqlen 32" in _one_line(capsys)
    assert time.perf_counter() - t0 < 5


# ----------------------------------------------------------------------------- 3. counts
@pytest.mark.parametrize(
    "flags, name",
    [
        (["--batch-size", "1e30"], "--batch-size"),
        (["--batch-size", str(10**30)], "--batch-size"),
        (["--eval-batch-size", "0"], "--eval-batch-size"),
        (["--eval-batch-size", "-1"], "--eval-batch-size"),
        (["--self-eval-samples", "0"], "--self-eval-samples"),
        (["--seed", str(10**23)], "--seed"),
        (["--tasks-batch-size", "0"], "--tasks-batch-size"),
        (["--eval-limit", str(10**12)], "--eval-limit"),
        (["--tasks-limit", str(10**12)], "--tasks-limit"),
        (["--nsamples", "1000001"], "--nsamples"),
        (["--seqlen", str(1 << 21)], "--seqlen"),
        (["--eval-seqlen", str(1 << 21)], "--eval-seqlen"),
    ],
)
def test_prune_counts_are_range_checked(tmp_path, tiny_dir, small, capsys, no_load, flags, name):
    t0 = time.perf_counter()
    assert _prune(tiny_dir, tmp_path / "o", *_fast(small), *flags) == 2
    line = _one_line(capsys)
    assert name in line, line
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--eval-batch-size", "0"], "--eval-batch-size"),
        (["--self-eval-samples", "0"], "--self-eval-samples"),
        (["--seed", str(10**23)], "--seed"),
        (["--seqlen", str(1 << 21)], "--seqlen"),
    ],
)
def test_eval_counts_are_range_checked(tiny_dir, capsys, no_load, with_data_env, flags, name):
    assert _main(["eval", "--model", str(tiny_dir), "--eval", "self", *flags]) == 2
    assert name in _one_line(capsys)


# ----------------------------------------------------------------------------- 4. outputs
def test_only_rank_0_of_torchrun_holds_the_output_lock(tmp_path, monkeypatch):
    """Every rank of a torchrun prune checks its inputs; rank 0 alone writes, so it alone locks."""
    from trimprune.errors import OutputError
    from trimprune.io.export import acquire_output_lock, release_output_locks

    out = tmp_path / "o"
    (tmp_path / "o.lock").write_text(f"{os.getppid()}\n")  # rank 0 (a live process) holds it
    monkeypatch.setenv("RANK", "1")
    assert acquire_output_lock(out) == (tmp_path / "o.lock").resolve()
    assert (tmp_path / "o.lock").read_text() == f"{os.getppid()}\n"  # untouched
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(OutputError, match="being written by another run"):
        acquire_output_lock(out)
    release_output_locks()


def test_second_run_on_the_same_output_is_refused(tmp_path, tiny_dir, small, capsys, no_load):
    out = tmp_path / "o"
    lock = tmp_path / "o.lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process holds it
    assert _prune(tiny_dir, out, *_fast(small)) == 2
    assert "being written by another run" in _one_line(capsys)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid}\n")  # stale: taken over, and removed at exit
    with pytest.raises(AssertionError, match="loaded"):
        _prune(tiny_dir, out, *_fast(small))
    assert not lock.exists()


def test_output_locations_refused_before_the_load(tmp_path, tiny_dir, small, capsys, no_load):
    assert _prune(tiny_dir, tiny_dir, *_fast(small)) == 2
    assert "model's folder or holds it" in _one_line(capsys)
    assert _prune(tiny_dir, tiny_dir.parent, *_fast(small), "--overwrite") == 2
    assert "model's folder or holds it" in _one_line(capsys)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert _prune(tiny_dir, ".", *_fast(small)) == 2
        assert "working folder" in _one_line(capsys)
    finally:
        os.chdir(cwd)
    assert _prune(tiny_dir, tmp_path / ("x" * 256), *_fast(small)) == 2
    assert "above the file system's 255" in _one_line(capsys)
    assert _prune(tiny_dir, tmp_path / ("x" * 240), *_fast(small)) == 2
    assert "at most 223 bytes" in _one_line(capsys)


def test_too_little_free_space_is_refused(tmp_path, tiny_dir, small, capsys, no_load, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert _prune(tiny_dir, tmp_path / "o", *_fast(small)) == 2
    assert "only 1.0 KB is free" in _one_line(capsys)


def test_overwrite_refuses_files_trimprune_did_not_write(tmp_path, tiny_dir, small, capsys):
    out = tmp_path / "run"
    assert _prune(tiny_dir, out, *_fast(small), "--no-save-model") == 0
    assert (out / "trimprune-files.json").is_file()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _prune(tiny_dir, out, *_fast(small), "--no-save-model", "--overwrite") == 2
    assert "did not write (notes.txt)" in _one_line(capsys)
    (out / "notes.txt").unlink()
    assert _prune(tiny_dir, out, *_fast(small), "--no-save-model", "--overwrite") == 0
    assert not (tmp_path / "run.lock").exists()


# ----------------------------------------------------------------------------- 5. non-finite
def test_nan_weights_are_never_written(tmp_path, tiny_dir, small, capsys):
    from trimprune.io.compact import load_pruned, save_compact
    from trimprune.io.export import save_model_dir

    out = tmp_path / "run"
    assert _prune(tiny_dir, out, *_fast(small), "--save-format", "compact") == 0
    model = load_pruned(out)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="model.norm.weight holds NaN"):
        save_model_dir(tmp_path / "x", model, None)
    save_compact(out, model, None, set())  # a compact output holding NaN (written past the check)
    capsys.readouterr()
    assert main(["export", "--dense", str(out), str(tmp_path / "hf")]) == 2
    assert "non-finite" in _one_line(capsys) and not (tmp_path / "hf").exists()


def test_a_sparsity_that_empties_rows_is_refused(tmp_path, tiny_dir, small, capsys, no_load):
    assert _prune(tiny_dir, tmp_path / "o", *_fast(small), "--sparsity", "0.999999") == 2
    assert "prunes every weight of each row" in _one_line(capsys)
    with pytest.raises(AssertionError, match="loaded"):  # N:M: not refused
        _prune(tiny_dir, tmp_path / "o", *_fast(small), "--mask-structure", "2:4")


# ----------------------------------------------------------------------------- 6. misc
def test_report_missing_key_names_file_and_key(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"config": {}, "model": {}}))
    assert main(["report", str(run)]) == 2
    line = _one_line(capsys)
    assert "report.json lacks the key 'metrics'" in line, line
    full = {"config": {}, "model": {}, "metrics": {}, "allocation": {}, "sparsity": {}}
    (run / "report.json").write_text(json.dumps(full))
    assert main(["report", str(run)]) == 2
    assert "report.json lacks" in _one_line(capsys)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_log_json_to_dev_full(tmp_path, tiny_dir, small, capsys, no_load):
    assert _prune(tiny_dir, tmp_path / "o", *_fast(small), "--log-json", "/dev/full") == 2
    assert "--log-json" in _one_line(capsys)


def test_empty_tasks_data_is_refused_before_the_load(tmp_path, tiny_dir, capsys, no_load):
    pytest.importorskip("lm_eval")
    empty = tmp_path / "tasks"
    empty.mkdir()
    args = ["--tasks", "boolq", "--tasks-data", str(empty)]
    assert main(["eval", "--model", str(tiny_dir), *args]) == 2
    line = _one_line(capsys)
    assert "--tasks-data" in line and "is empty" in line, line


def test_usage_errors_are_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", "x", "--output", "y", "--nsamples", "lots"])
    assert e.value.code == 2
    line = _one_line(capsys)
    assert "--nsamples" in line and "trimprune prune --help" in line, line
    r = subprocess.run(
        [sys.executable, "-m", "trimprune", "eval", "--bogus"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src")),
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
