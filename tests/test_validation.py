"""Every bad input ends in one line and exit code 2 before the expensive work (most before the model
loads), float16 overflow is caught before pruning, nothing is lost or left behind, outputs are
byte-reproducible. One test (or a parametrised case) per input a new user tried."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import trimprune.core.hub as hub
import trimprune.io.models as models
from aliases import need_alias
from trimprune.cli import main
from trimprune.errors import TrimpruneError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model is an error: the check under test must come first."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(models, "load_model", boom)


def _one_line(capsys) -> str:
    cap = capsys.readouterr()
    err = [e for e in cap.err.strip().splitlines() if e]
    assert len(err) == 1 and err[0].startswith("trimprune: error:"), err
    return err[0]


def _prune(model, out, *extra) -> int:
    return main(
        [
            "prune",
            "--model",
            str(model),
            "--output",
            str(out),
            "--quiet",
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Small calibration (C4-like JSON lines, 8 documents of about 150 tokens) and evaluation files: a tiny
    prune then costs well under a second of data handling."""
    d = tmp_path_factory.mktemp("small-data")
    words = "the of and to in a is was for on that with as by at from his her it an were are which".split()
    docs = [
        " ".join(
            words[(i * 7 + j * 3) % len(words)] + ("." if j % 11 == 10 else "") for j in range(150)
        )
        for i in range(8)
    ]
    (d / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (d / "eval.txt").write_text("\n".join(docs[:4]) + "\n")
    return d


def _fast(small) -> list[str]:
    """The flags of a cheap calibration from the small file."""
    return ["--calib", "c4", "--calib-data", str(small / "calib.jsonl")]


# ----------------------------------------------------------------------------- outputs
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_unwritable_output_fails_before_the_model_loads(tiny_dir, capsys, no_load, with_data_env):
    """/proc passes os.access(W_OK) for root; the probe file is refused."""
    assert _prune(tiny_dir, "/proc/trimprune-x") == 2
    err = _one_line(capsys)
    assert "--output '/proc/trimprune-x': cannot write into '/proc'" in err, err


def test_log_json_and_checkpoint_dir_are_probed_too(
    tiny_dir, tmp_path, capsys, no_load, with_data_env
):
    (tmp_path / "f").write_text("x")
    assert _prune(tiny_dir, tmp_path / "o", "--log-json", str(tmp_path)) == 2
    assert "--log-json" in _one_line(capsys)
    assert _prune(tiny_dir, tmp_path / "o", "--checkpoint-dir", str(tmp_path / "f" / "ck")) == 2
    assert "--checkpoint-dir" in _one_line(capsys)
    assert (
        main(["eval", "--model", str(tiny_dir), "--eval", "wikitext2", "--output", "/proc/x.json"])
        == 2
    )
    assert "cannot write into '/proc'" in _one_line(capsys)
    assert main(["report", str(tmp_path), "-o", "/proc/x.html"]) == 2
    assert "cannot write into '/proc'" in _one_line(capsys)


def test_overwrite_replaces_only_what_trimprune_wrote(
    tiny_dir, tmp_path, small, capsys, with_data_env
):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("x")
    assert _prune(tiny_dir, keep, *_fast(small), "--overwrite") == 2
    assert (
        "holds no trimprune report" in _one_line(capsys)
        and (keep / "thesis.tex").read_text() == "x"
    )
    f = tmp_path / "file.txt"
    f.write_text("y")
    assert _prune(tiny_dir, f, *_fast(small), "--overwrite") == 2
    assert "is a file" in _one_line(capsys) and f.read_text() == "y"
    out = tmp_path / "run"
    assert _prune(tiny_dir, out, *_fast(small)) == 0
    capsys.readouterr()
    assert _prune(tiny_dir, out, *_fast(small), "--sparsity", "0.6", "--overwrite") == 0
    assert json.loads((out / "report.json").read_text())["sparsity"]["requested"] == 0.6
    # `trimprune export` marks its folder, so exporting again with --overwrite replaces it
    exp = tmp_path / "hf"
    assert main(["export", "--dense", str(out), str(exp)]) == 0
    assert main(["export", "--dense", str(out), str(exp), "--overwrite"]) == 0
    assert main(["export", "--dense", str(out), str(keep), "--overwrite"]) == 2
    assert "OUT_DIR" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


KILLED_WRITER = """
import sys, time
sys.path.insert(0, {src!r})
from trimprune.io.export import atomic_dir
with atomic_dir({out!r}) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 200_000)
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_run_killed_while_writing_is_reported_and_removed_with_overwrite(
    tiny_dir, tmp_path, capsys, monkeypatch, with_data_env
):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER.format(src=str(SRC), out=str(out))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and not out.exists()

    def stop(*a, **k):  # the report comes with the checks, before the model loads
        raise TrimpruneError("stopped after the checks")

    monkeypatch.setattr(models, "load_model", stop)
    assert _prune(tiny_dir, out, "--calib", "self") == 2
    err = capsys.readouterr().err
    assert (
        f"trimprune: warning: a run writing --output '{out}' was interrupted and left {left[0].name} (200.0 KB)"
        in err
        and "--overwrite" in err
    ), err
    assert left[0].is_dir()
    assert _prune(tiny_dir, out, "--calib", "self", "--overwrite") == 2
    err = capsys.readouterr().err
    assert (
        f"removed the partial output of an interrupted run beside --output '{out}': {left[0].name}"
        in err
    ), err
    assert not left[0].exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how,rc", [("sigterm", 143), ("interrupt", 130), ("error", 1)])
def test_temporary_output_folder_is_removed_on_any_python_level_exit(
    how, rc, tiny_dir, tmp_path, small, monkeypatch, capsys, with_data_env
):
    import trimprune.io.export as ex

    def stop(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        if how == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ex, "save_masks", stop)
    before = signal.getsignal(signal.SIGTERM)
    if how == "error":
        with pytest.raises(RuntimeError):
            _prune(tiny_dir, tmp_path / "o", *_fast(small))
    else:
        assert _prune(tiny_dir, tmp_path / "o", *_fast(small)) == rc
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_two_identical_runs_write_the_same_bytes(tiny_dir, tmp_path, small, with_data_env):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert _prune(tiny_dir, out, *_fast(small), "--save-format", "compact") == 0
        runs.append(out)
    files = sorted(str(p.relative_to(runs[0])) for p in runs[0].rglob("*") if p.is_file())
    assert (
        "masks.safetensors" in files
        and "model.compact.safetensors" in files
        and "config.json" in files
    )
    for f in files:
        if f in ("report.json", "report.md"):  # timings and the time of day
            continue
        assert (runs[0] / f).read_bytes() == (runs[1] / f).read_bytes(), f
    a, b = (json.loads((r / "report.json").read_text()) for r in runs)
    for k in ("created", "timings", "command"):
        a.pop(k), b.pop(k)
    assert a == b


def test_safetensors_metadata_is_written_sorted(tmp_path):
    """safetensors orders its metadata by a per-map random hash: without sorting, 8 writes of one file
    gave different bytes."""
    from trimprune.io.export import save_masks

    masks = {
        "b.weight": torch.arange(6, dtype=torch.uint8),
        "a.weight": torch.ones(3, dtype=torch.uint8),
    }
    shapes = {"a.weight": [3, 8], "b.weight": [6, 8]}
    blobs = set()
    for i in range(8):
        save_masks(tmp_path / f"m{i}.safetensors", masks, shapes)
        blobs.add((tmp_path / f"m{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    assert list(meta) == sorted(meta)


# ----------------------------------------------------------------------------- data files
BAD_FILES = [
    ("empty.txt", b"", "wikitext2", "is empty (no text)"),
    ("blank.txt", b"\n  \n\n", "wikitext2", "is empty (no text)"),
    ("empty.jsonl", b"", "c4", "is empty (no text)"),
    ("binary.txt", bytes(range(256)) * 8, "wikitext2", "is a binary file (a NUL byte at offset 0)"),
    ("latin1.txt", "café au lait\n".encode("latin-1"), "wikitext2", "is not UTF-8 text"),
    ("binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00" * 50, "c4", "is not UTF-8 text"),
    ("fake.parquet", b"not parquet at all\n", "c4", "is not a parquet file"),
    ("fake.jsonl.gz", b"not gzip", "c4", "cannot be read as gzip-compressed JSON lines"),
    ("broken.jsonl", b'{"text": "a"}\n{oops\n', "c4", "line 2 is not JSON"),
    ("nofield.jsonl", b'{"content": "a"}\n', "c4", "line 1 has no 'text' field"),
    ("number.jsonl", b'{"text": 5}\n', "c4", "its 'text' is int, not a string"),
    ("folder", None, "c4", "is a directory"),
    ("missing.jsonl", "missing", "c4", "does not exist"),
]


@pytest.mark.parametrize("name,content,calib,needle", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_calibration_file_fails_before_the_model_loads(
    name, content, calib, needle, tiny_dir, tmp_path, capsys, no_load, with_data_env
):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    t0 = time.perf_counter()
    assert _prune(tiny_dir, tmp_path / "o", "--calib", calib, "--calib-data", str(path)) == 2
    seconds = time.perf_counter() - t0
    err = _one_line(capsys)
    assert f"--calib-data {str(path)!r}" in err and needle in err, err
    assert seconds < 2, seconds
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "name,content,calib,needle",
    [b for b in BAD_FILES if b[0] in ("empty.txt", "binary.txt", "missing.jsonl")],
)
def test_bad_evaluation_file_fails_before_the_model_loads(
    name, content, calib, needle, tiny_dir, tmp_path, capsys, no_load, with_data_env
):
    path = tmp_path / name
    if content != "missing":
        path.write_bytes(content)
    for cmd in (["prune", "--output", str(tmp_path / "o"), "--calib", "self"], ["eval"]):
        for spec in (f"wikitext2={path}", f"mine={path}"):
            rc = main(
                [
                    *cmd,
                    "--model",
                    str(tiny_dir),
                    "--eval",
                    spec.split("=")[0],
                    "--eval-data",
                    spec,
                    "--quiet",
                ]
            )
            err = _one_line(capsys)
            assert rc == 2 and str(path) in err and needle in err and "--eval-data" in err, err


def test_hub_data_sets_offline_fail_before_the_model_loads(
    tiny_dir, tmp_path, capsys, no_load, monkeypatch
):
    monkeypatch.delenv("TRIMPRUNE_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_unreachable.cache_clear()
    try:
        assert _prune(tiny_dir, tmp_path / "o", "--calib", "c4") == 2
        err = _one_line(capsys)
        assert "c4 (train) is not available locally" in err and "--calib-data" in err, err
    finally:
        hub.hub_unreachable.cache_clear()


def _no_datasets(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a)
    )


def test_default_calib_without_datasets_names_the_three_fixes(
    tiny_dir, tmp_path, capsys, no_load, monkeypatch
):
    """The default --calib c4 with no TRIMPRUNE_DATA, no --calib-data and no `datasets`: one line
    that names pip install datasets, TRIMPRUNE_DATA and --calib-data FILE; eval likewise."""
    monkeypatch.delenv("TRIMPRUNE_DATA", raising=False)
    _no_datasets(monkeypatch)
    assert _prune(tiny_dir, tmp_path / "o") == 2
    err = _one_line(capsys)
    for fix in ("c4 (train)", "TRIMPRUNE_DATA is not set", "pip install datasets"):
        assert fix in err, err
    assert "TRIMPRUNE_DATA to a folder laid out like shared/data" in err, err
    assert "--calib-data FILE" in err, err
    assert main(["eval", "--model", str(tiny_dir), "--eval", "wikitext2"]) == 2
    err = _one_line(capsys)
    assert "pip install datasets" in err and "--eval-data wikitext2=PATH" in err, err
    assert not (tmp_path / "o").exists()


def test_mistyped_trimprune_data_is_named_with_its_value(
    tiny_dir, tmp_path, capsys, no_load, monkeypatch
):
    """TRIMPRUNE_DATA naming no folder is refused with its value even when a hub route exists; a
    folder without the set's file is named (with the file pattern) when no other route is left."""
    missing = str(tmp_path / "shared" / "dat")
    monkeypatch.setenv("TRIMPRUNE_DATA", missing)
    assert _prune(tiny_dir, tmp_path / "o") == 2
    err = _one_line(capsys)
    assert f"TRIMPRUNE_DATA={missing!r} is not a folder" in err, err
    assert main(["eval", "--model", str(tiny_dir), "--eval", "ptb"]) == 2
    assert f"TRIMPRUNE_DATA={missing!r}" in _one_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TRIMPRUNE_DATA", str(empty))
    _no_datasets(monkeypatch)
    assert _prune(tiny_dir, tmp_path / "o") == 2
    err = _one_line(capsys)
    assert f"TRIMPRUNE_DATA={str(empty)!r} has no c4/c4-train.*.json*" in err, err
    assert "pip install datasets" in err, err


# ----------------------------------------------------------------------------- the model
def test_model_folder_without_config_json(tiny_dir, tmp_path, capsys, no_load, with_data_env):
    bare = tmp_path / "bare"
    bare.mkdir()
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(bare)
    assert _prune(bare, tmp_path / "o", "--calib", "self") == 2
    assert "is a folder without config.json" in _one_line(capsys)
    (bare / "weights.gguf").write_bytes(b"GGUF" + bytes(60))
    assert main(["eval", "--model", str(bare), "--eval", "wikitext2"]) == 2
    assert "add --gguf-file weights.gguf" in _one_line(capsys)
    (bare / "config.json").write_text("{not json")
    assert main(["eval", "--model", str(bare), "--eval", "wikitext2"]) == 2
    assert "config.json cannot be read as JSON" in _one_line(capsys)
    (bare / "config.json").write_text('{"hidden_size": 8}')
    assert main(["eval", "--model", str(bare), "--eval", "wikitext2"]) == 2
    assert "config.json has no model_type" in _one_line(capsys)


@pytest.mark.parametrize("offline", ["env", "probe"])
def test_hub_like_id_that_is_no_local_path_fails_at_once_offline(
    offline, tmp_path, capsys, monkeypatch, with_data_env
):
    """Before: 49 s of retries. HF_HUB_OFFLINE, or one failed connection, ends it at once."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:

        def refuse(*a, **k):
            raise OSError(101, "Network is unreachable")

        monkeypatch.setattr(hub.socket, "create_connection", refuse)
    hub.hub_unreachable.cache_clear()
    try:
        t0 = time.perf_counter()
        rc = main(
            [
                "prune",
                "--model",
                "some-org/some-model",
                "--output",
                str(tmp_path / "o"),
                "--calib",
                "self",
            ]
        )
        seconds = time.perf_counter() - t0
        err = _one_line(capsys)
        assert rc == 2 and seconds < 2, (rc, seconds)
        why = (
            "HF_HUB_OFFLINE is set"
            if offline == "env"
            else "no connection to huggingface.co: Network is unreachable"
        )
        assert (
            "--model 'some-org/some-model' is not a local path" in err
            and why in err
            and "local model" in err
        ), err
    finally:
        hub.hub_unreachable.cache_clear()
    assert main(["eval", "--model", "a/b/c", "--eval", "wikitext2"]) == 2
    assert "'a/b/c' does not exist" in _one_line(capsys)


def test_transformers_older_than_the_floor_is_refused(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(
        TrimpruneError,
        match=rf"transformers 5\.17\.0 is older than {models.MIN_TRANSFORMERS}.*"
        r"Gemma-3 GGUF.*pip install",
    ):
        models.load_model("smollm2-135m", device="cpu")


# ----------------------------------------------------------------------------- recipes and allocation files
RECIPES = [
    ("allocation: 5", "--allocation 5 must be a string"),
    ('percdamp: "x"', "--percdamp 'x' must be a number"),
    (
        'owl_m: "5"',
        "--owl-m '5' must be a number (YAML reads 5 as text: write a plain number such as 5.0",
    ),
    ("trim_lrs: abc", "--trim-lrs 'abc' must be a list of numbers"),
    ('trim: "false"', "--trim 'false' must be true or false"),
    ('offload: "no"', "--offload 'no' is unknown: choose one of cpu, disk or false"),
    ('offload: "false"', "--offload 'false' is unknown: choose one of cpu, disk or false"),
    ('seed: "abc"', "--seed 'abc' must be an integer"),
    ("blocksize: true", "--blocksize True must be an integer"),
    ("mask_structure: 2:4", "--mask-structure 124 must be a string (in YAML, quote it: '2:4')"),
    ("sparsity: 5e-1", "--sparsity '5e-1' must be a number (YAML reads 5e-1 as text"),
    ("percdamp: .inf", "--percdamp inf must be a finite number"),
    ("scorer: {name: wanda, speed: 2}", "recipe key scorer.speed is unknown"),
    ('search_trials: "10"', "--search-trials '10' must be an integer (YAML reads 10 as text"),
    ("search_timeout: .nan", "--search-timeout nan must be a finite number"),
    (
        "search: {objective: kl, space: [rules, free]}",
        "--search-space ['rules', 'free'] must be a string",
    ),
    ("atp_beta: true", "--atp-beta True must be a number"),
    ("created: 2024-13-45", "is not valid YAML"),
    ("[1, 2", "is not valid YAML"),
]


@pytest.mark.parametrize("text,needle", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_values_of_the_wrong_type_fail_before_the_model_loads(
    text, needle, tiny_dir, tmp_path, capsys, no_load, with_data_env
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "\n")
    assert _prune(tiny_dir, tmp_path / "o", "--recipe", str(recipe)) == 2
    err = _one_line(capsys)
    assert needle in err, err


def test_search_inputs_fail_before_the_model_loads(
    tiny_dir, tmp_path, small, capsys, monkeypatch, no_load, with_data_env
):
    import importlib.util

    base = ["--allocation", "search", "--search-trials", "2", *_fast(small)]
    assert (
        _prune(
            tiny_dir,
            tmp_path / "o",
            *base,
            "--search-storage",
            "sqlite:////proc/trimprune/study.db",
        )
        == 2
    )
    assert "--search-storage '/proc/trimprune/study.db'" in _one_line(capsys)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a)
    )
    assert _prune(tiny_dir, tmp_path / "o", *base) == 2
    assert "--allocation search needs Optuna" in _one_line(capsys)


ALLOCATIONS = [
    ('["abc", 0.5]', "gives block 0 the sparsity 'abc': every value must be a number in [0, 1)"),
    ("[null, 0.5]", "gives block 0 the sparsity None"),
    ("[[0.5, 0.5], 0.5]", "gives block 0 the sparsity [0.5, 0.5]"),
    ('{"per_block": [0.5, true]}', "gives block 1 the sparsity True"),
    ('{"0": 0.5, "1": 1.5}', "gives '1' the sparsity 1.5"),
    ("[]", "holds nothing"),
    ("0.5", "holds a float"),
    ("[0.5, 0.5", "is not valid JSON/YAML"),
    (b"\xff\xfe\x00\x01", "is not UTF-8 text"),
]


@pytest.mark.parametrize("text,needle", ALLOCATIONS, ids=[str(a[0]) for a in ALLOCATIONS])
def test_allocation_file_values_fail_before_the_model_loads(
    text, needle, tiny_dir, tmp_path, capsys, no_load, with_data_env
):
    f = tmp_path / "alloc.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert _prune(tiny_dir, tmp_path / "o", "--allocation", f"file:{f}", "--calib", "self") == 2
    err = _one_line(capsys)
    assert needle in err, err


def test_allocation_file_mean_must_match_sparsity_unless_it_is_left_out(
    tiny_dir, tmp_path, small, capsys, monkeypatch, with_data_env
):
    """Checked as soon as the model is loaded (before evaluation and calibration)."""
    import trimprune.calib.data as data

    f = tmp_path / "alloc.json"
    f.write_text("[0.7, 0.5]")  # both blocks hold the same weight count: mean 0.6
    real = data.get_calibration
    monkeypatch.setattr(
        data, "get_calibration", lambda *a, **k: pytest.fail("calibration before the check")
    )
    assert (
        _prune(
            tiny_dir,
            tmp_path / "o",
            "--allocation",
            f"file:{f}",
            "--sparsity",
            "0.5",
            *_fast(small),
        )
        == 2
    )
    err = _one_line(capsys)
    assert (
        "has a parameter-weighted mean sparsity of 0.6, not --sparsity 0.5" in err
        and "--sparsity 0.6" in err
    )
    recipe = tmp_path / "r.yaml"  # a recipe's sparsity counts as given
    recipe.write_text(f"sparsity: 0.5\nallocation: 'file:{f}'\n")
    assert _prune(tiny_dir, tmp_path / "c", "--recipe", str(recipe), *_fast(small)) == 2
    assert "not --sparsity 0.5" in _one_line(capsys)
    monkeypatch.setattr(data, "get_calibration", real)
    assert (
        _prune(
            tiny_dir, tmp_path / "b", "--allocation", f"file:{f}", *_fast(small), "--no-save-model"
        )
        == 0
    )
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert (
        rep["sparsity"]["requested"] == pytest.approx(0.6)
        and abs(rep["sparsity"]["achieved"] - 0.6) < 0.01
    )
    assert any(
        "no --sparsity given: the target is the parameter-weighted mean of file:" in n
        for n in rep["notes"]
    )


def test_allocation_file_through_the_api(tmp_path):
    from tiny_models import calib, make
    from trimprune import PruneConfig, prune

    f = tmp_path / "a.yaml"
    f.write_text("- 0.7\n- 0.5\n")
    res = prune(
        make("llama"),
        None,
        PruneConfig(sparsity=None, allocation=f"file:{f}", calib={"nsamples": 4}),
        calibration=calib(4, 16),
        progress=False,
    )
    assert res.config.sparsity == pytest.approx(0.6) and "parameter-weighted mean" in res.notes[0]
    with pytest.raises(TrimpruneError, match="not sparsity 0.5"):
        prune(
            make("llama"),
            None,
            PruneConfig(sparsity=0.5, allocation=f"file:{f}"),
            calibration=calib(4, 16),
            progress=False,
        )
    from trimprune.algo.allocation import linear_sizes
    from trimprune.algo.allocation.base import from_file
    from trimprune.core.model import ModelAdapter

    sizes = linear_sizes(ModelAdapter.from_model(make("llama")))
    assert from_file(str(f), 0.60009, *sizes).requested == 0.60009  # within 1e-4
    with pytest.raises(TrimpruneError, match="differ by more than 0.0001"):
        from_file(str(f), 0.60011, *sizes)


# ----------------------------------------------------------------------------- dtype and float16 overflow
def test_default_dtype_is_the_checkpoints_own_else_bfloat16_on_gpu_float32_on_cpu(
    monkeypatch, tmp_path
):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert models.resolve_dtype(None, cpu) == torch.float32
    assert models.resolve_dtype(None, cpu, torch.bfloat16) == torch.bfloat16
    assert models.resolve_dtype(None, gpu, torch.float16) == torch.float16
    assert models.resolve_dtype(None, gpu, torch.float32) is not torch.float32
    # on the command line's default device (cuda if available, else cpu), this machine's answer
    here = models.resolve_device(None)
    if here.type == "cpu":
        assert models.resolve_dtype(None, here) == torch.float32
    else:
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert models.resolve_dtype(None, here) == half
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.resolve_dtype(None, gpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.resolve_dtype(None, gpu) == torch.float16
    assert models.resolve_dtype("float16", cpu, torch.bfloat16) == torch.float16
    assert models.config_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert models.config_dtype({"text_config": {"dtype": "float16"}}) == torch.float16
    assert models.config_dtype({"dtype": "int8"}) is None
    import gguf
    import numpy as np

    for file_type, want in (
        (1, torch.float16),
        (32, torch.bfloat16),
        (0, torch.float32),
        (15, None),
    ):
        path = tmp_path / f"m{file_type}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_array(
            "tokenizer.ggml.tokens", ["a", "bb", "ccc"]
        )  # arrays before the file type are skipped
        w.add_file_type(file_type)
        w.add_tensor("t", np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert (
            models.gguf_dtype(path) == want
            and models.native_dtype(str(tmp_path), path.name) == want
        )


def test_the_smollm2_alias_has_no_float_dtype_of_its_own():
    need_alias("smollm2-135m")
    src = models.resolve_model_path("smollm2-135m", None)
    assert models.native_dtype(*src) is None  # Q4_1: quantised, no float dtype of its own


@pytest.fixture(scope="module")
def overflow_dirs(tiny_dir, tmp_path_factory):
    """The tiny Llama with block 0's MLP weights scaled by 1000 (largest |w| about 100): its outputs reach
    about 1e6, beyond float16's 65504, and are finite in float32 and bfloat16. Saved as float32 and as
    bfloat16 (the checkpoint's own dtype, as Gemma-3's)."""
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        d = tmp_path_factory.mktemp(f"overflow-{str(dt)[6:]}")
        m = LlamaForCausalLM.from_pretrained(tiny_dir)
        with torch.no_grad():
            for p in m.model.layers[0].mlp.parameters():
                p.mul_(1000)
        m.to(dt).save_pretrained(d)
        AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(d)
        out[dt] = d
    return out


def test_float16_overflow_is_an_error_naming_bfloat16_and_the_default_dtype_prunes_soundly(
    overflow_dirs, tmp_path, small, capsys, with_data_env
):
    d = overflow_dirs[torch.float32]
    ev = ["--eval", "mine", "--eval-data", f"mine={small / 'eval.txt'}", "--eval-limit", "2"]
    # forced float16: block 0's first, dense pass stops before its weights change
    assert _prune(d, tmp_path / "a", "--dtype", "float16", *_fast(small)) == 2
    err = _one_line(capsys)
    assert "before pruning, the dense outputs of block 0 (model.layers.0) hold Inf" in err, err
    assert "overflow in float16: try --dtype bfloat16" in err
    # with --eval the dense evaluation finds it even earlier
    assert _prune(d, tmp_path / "a", "--dtype", "float16", *_fast(small), *ev) == 2
    assert "the activations overflow in float16: try --dtype bfloat16" in _one_line(capsys)
    assert not (tmp_path / "a").exists()
    # the default dtype: the checkpoint's own for the bfloat16 one; for the float32 one (no half
    # dtype of its own) float32 on the CPU, bfloat16 on a GPU (the command line's device: cuda when
    # available), a sound prune either way
    here = models.resolve_device(None).type
    if here == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16: the default dtype, float16, overflows on this model")
    default = torch.float32 if here == "cpu" else torch.bfloat16
    for src, dt, origin, out in (
        (torch.float32, default, f"default on {here}", tmp_path / "b"),
        (torch.bfloat16, torch.bfloat16, "checkpoint", tmp_path / "c"),
    ):
        assert _prune(overflow_dirs[src], out, *_fast(small), *ev, "--no-save-model") == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["model"]["dtype"] == str(dt), (src, rep["model"])
        assert rep["model"]["dtype_from"] == origin, (src, rep["model"])
        ppl = rep["metrics"]["perplexity"]["mine"]
        assert math.isfinite(ppl) and math.isfinite(rep["metrics"]["dense_perplexity"]["mine"])
        assert rep["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-3)
