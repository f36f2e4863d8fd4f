"""Runs that survive interruption: --checkpoint-dir commits every finished block, --resume continues after
the last committed one and ends with the masks, weights and records of an uninterrupted run, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import calib, make, make_llama
from trimprune import PruneConfig, TrimpruneError, prune
from trimprune.cli import main
from trimprune.core.records import BlockSafeguardRecord, LinearRecord
from trimprune.io import resume as resume_mod

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

# a 4-block Llama, 16 sequences (two batches of 8, a block-safeguard subset of 4)
CASES = {
    "wanda-trim": dict(
        scorer="wanda", sparsity=0.6, trim=True, trim_iterations=3, nsamples=16, seqlen=24
    ),
    "sparsegpt-owl": dict(
        scorer="sparsegpt", sparsity=0.6, allocation="owl", nsamples=16, seqlen=24
    ),
}

SCRIPT = textwrap.dedent('''
    """MODE CASES OUT [CKPT]: prune the seeded 4-block tiny Llama for each case; save weights, masks, records."""
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(2)
    from safetensors.torch import save_file
    from tiny_models import calib, make_llama
    from trimprune import PruneConfig, prune

    CASES = json.loads({cases!r})
    mode, names, out = sys.argv[1], sys.argv[2].split(","), Path(sys.argv[3])
    for name in names:
        flat = dict(CASES[name])
        if mode != "plain":
            flat.update(checkpoint_dir=str(Path(sys.argv[4]) / name), resume=mode == "resume")
        model = make_llama(4)
        res = prune(model, None, PruneConfig.from_flat(flat), calibration=calib(16, 24), progress=False)
        d = out / name
        d.mkdir(parents=True)
        save_file({{k: v.clone().contiguous() for k, v in model.state_dict().items()}}, str(d / "weights.safetensors"))
        save_file(dict(res.masks), str(d / "masks.safetensors"))
        (d / "records.json").write_text(json.dumps({{
            "layers": {{k: r.to_dict() for k, r in res.layers.items()}},
            "guard": [g.to_dict() for g in res.block_safeguard],
            "allocation": res.allocation.per_linear, "resumed_from_block": res.resumed_from_block,
            "notes": res.notes}}))
''')


def _run(script, *args, kill_after=None):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop(resume_mod.KILL_ENV, None)
    if kill_after is not None:
        env[resume_mod.KILL_ENV] = str(kill_after)
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _same_outputs(a: Path, b: Path) -> dict:
    """Bit-identical weights (every parameter, dtype included), masks and records; a's records."""
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k
    ma, mb = load_file(str(a / "masks.safetensors")), load_file(str(b / "masks.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = (
        json.loads((a / "records.json").read_text()),
        json.loads((b / "records.json").read_text()),
    )
    for key in ("layers", "guard", "allocation"):
        assert ra[key] == rb[key], key  # exact floats (JSON keeps every bit of a float)
    return ra


@pytest.mark.heavy
def test_sigkill_after_a_block_then_resume_is_bit_identical(tmp_path):
    """Real processes: killed with SIGKILL right after block 1's checkpoint is committed, resumed by a
    second process, compared with a third that ran uninterrupted (and without checkpoints)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), cases=json.dumps(CASES)))
    ck = tmp_path / "ckpt"
    for name in CASES:
        p = _run(script, "kill", name, tmp_path / "killed", ck, kill_after=1)
        assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
        state = json.loads((ck / name / "state.json").read_text())
        assert state["last_block"] == 1 and state["num_blocks"] == 4
        assert not (tmp_path / "killed" / name).exists()
        streams = load_file(str(ck / name / state["streams"]["0"]))
        assert [tuple(v.shape) for k, v in sorted(streams.items()) if k.startswith("main.")] == [
            (8, 24, 32)
        ] * 2
        subset = sorted(
            k for k in streams if k.startswith("subset_")
        )  # the block safeguard's streams
        assert subset == (
            ["subset_dense.00000", "subset_pruned.00000"] if name == "wanda-trim" else []
        )
    # the wanda case also leaves what a process dying in the middle of block 2's commit would
    half = ck / "wanda-trim"
    for junk in (
        "block0002.safetensors",
        "block0002.json",
        "streams.block0002.rank0.safetensors",
        ".state.json.tmp-x1",
        ".block0002.safetensors.tmp-x2",
    ):
        (half / junk).write_bytes(b"half-written")
    p = _run(script, "resume", ",".join(CASES), tmp_path / "resumed", ck)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run(script, "plain", ",".join(CASES), tmp_path / "plain")
    assert p.returncode == 0, p.stderr[-3000:]
    for name in CASES:
        rec = _same_outputs(tmp_path / "resumed" / name, tmp_path / "plain" / name)
        assert rec["resumed_from_block"] == 1 and any(
            "blocks 0..1 of 4 restored" in n for n in rec["notes"]
        )
        assert (
            json.loads((tmp_path / "plain" / name / "records.json").read_text())[
                "resumed_from_block"
            ]
            is None
        )
        state = json.loads((ck / name / "state.json").read_text())
        assert state["last_block"] == 3
        # the API keeps the checkpoint; the junk is gone, one stream file is left (the last block's)
        files = sorted(f.name for f in (ck / name).iterdir())
        assert not [f for f in files if f.startswith(".")], files
        assert [f for f in files if f.startswith("streams.")] == [
            "streams.block0003.rank0.safetensors"
        ]
    rec = json.loads((tmp_path / "plain" / "wanda-trim" / "records.json").read_text())
    assert (
        any(r.get("trim") for r in rec["layers"].values()) and rec["guard"]
    )  # TRIM and its block safeguard ran


# ------------------------------------------------------------------------------------------ in one process
class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, k, exc=Interrupted):
    def hook(block):
        if block == k:
            raise exc()

    monkeypatch.setattr(resume_mod, "_after_commit", hook)


def _flat(**kw):
    return dict(CASES["wanda-trim"], **kw)


def _prune(flat, model=None, ids=None):
    model = model if model is not None else make_llama(4)
    return model, prune(
        model,
        None,
        PruneConfig.from_flat(flat),
        calibration=calib(16, 24) if ids is None else ids,
        progress=False,
    )


def _snapshot(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_half_written_block_is_ignored_and_resume_uses_the_last_committed(tmp_path, monkeypatch):
    """The process dies while committing block 2: its files are written, state.json is not (and a
    temporary state.json lies around). Resume restores blocks 0..1 and ends like an uninterrupted run."""
    ck = tmp_path / "ck"
    real = resume_mod.ResumeState._commit

    def dying_commit(self):
        if self.state["last_block"] == 2:  # block 2's files are in place, its state is not
            (self.path / ".state.json.tmp-dead").write_text('{"last_block": 2}')
            raise Interrupted
        real(self)

    monkeypatch.setattr(resume_mod.ResumeState, "_commit", dying_commit)
    with pytest.raises(Interrupted):
        _prune(_flat(checkpoint_dir=str(ck)))
    monkeypatch.setattr(resume_mod.ResumeState, "_commit", real)
    assert json.loads((ck / "state.json").read_text())["last_block"] == 1
    assert (ck / "block0002.safetensors").is_file() and (
        ck / "streams.block0002.rank0.safetensors"
    ).is_file()
    m_res, res = _prune(_flat(checkpoint_dir=str(ck), resume=True))
    m_ref, ref = _prune(_flat())
    assert res.resumed_from_block == 1 and ref.resumed_from_block is None
    assert all(
        torch.equal(a, b) for a, b in zip(m_res.state_dict().values(), m_ref.state_dict().values())
    )
    assert res.layers == ref.layers and res.block_safeguard == ref.block_safeguard
    assert res.masks.keys() == ref.masks.keys() and all(
        torch.equal(res.masks[k], ref.masks[k]) for k in ref.masks
    )
    assert not (ck / ".state.json.tmp-dead").exists()


def test_mismatched_config_model_or_calibration_is_refused_and_nothing_is_written(
    tmp_path, monkeypatch
):
    ck = tmp_path / "ck"
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(Interrupted):
        _prune(_flat(checkpoint_dir=str(ck)))
    before = _snapshot(ck)
    bad = [
        (
            _flat(sparsity=0.5, checkpoint_dir=str(ck), resume=True),
            None,
            None,
            "sparsity 0.6 there, 0.5 now",
        ),
        (_flat(checkpoint_dir=str(ck), resume=True), make_llama(4, seed=1), None, "another model"),
        (_flat(checkpoint_dir=str(ck), resume=True), make_llama(3), None, "another model"),
        (
            _flat(checkpoint_dir=str(ck), resume=True),
            None,
            calib(16, 24, seed=7),
            "other calibration data",
        ),
        (_flat(checkpoint_dir=str(ck)), None, None, "add run.resume"),
    ]
    for flat, model, ids, needle in bad:
        model = model if model is not None else make_llama(4)
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(TrimpruneError, match=needle) as e:
            _prune(flat, model, ids)
        assert "\n" not in str(e.value)
        assert _snapshot(ck) == before  # the checkpoint is untouched
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())  # the model too
    # run-only settings are not part of the fingerprint: another batch size resumes (and says so)
    monkeypatch.setattr(resume_mod, "_after_commit", lambda block: None)
    _, res = _prune(_flat(checkpoint_dir=str(ck), resume=True, batch_size=5))
    assert res.resumed_from_block == 0 and any("--batch-size 5" in n for n in res.notes)


def test_cli_resume_report_and_checkpoint_lifecycle(tiny_dir, tmp_path, monkeypatch, capsys):
    ck, out = tmp_path / "ck", tmp_path / "out"
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
        "--trim",
        "--quiet",
        "--checkpoint-dir",
        str(ck),
    ]
    _interrupt_after(monkeypatch, 0, KeyboardInterrupt)
    assert main(base + ["--output", str(out)]) == 130
    assert json.loads((ck / "state.json").read_text())["last_block"] == 0 and not out.exists()
    assert "rerun with --resume" in capsys.readouterr().err
    # another config or no --resume: one line, exit 2, nothing written
    before = _snapshot(ck)
    for extra, needle in (
        (["--resume", "--sparsity", "0.7"], "sparsity 0.5 there, 0.7 now"),
        ([], "add --resume"),
    ):
        assert main(base + extra + ["--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("trimprune: error:") and needle in err[0], err
        assert not out.exists() and _snapshot(ck) == before
    assert (
        main(
            base
            + ["--output", str(tmp_path / "o3"), "--checkpoint-dir", str(tmp_path / "o3" / "ck")]
        )
        == 2
    )
    assert "inside --output" in capsys.readouterr().err
    # resumed: the report says from which block; the checkpoint is removed once the output is written
    monkeypatch.setattr(resume_mod, "_after_commit", lambda block: None)
    assert main(base + ["--resume", "--output", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["resumed_from_block"] == 0 and any(
        "blocks 0..0 of 2 restored" in n for n in rep["notes"]
    )
    assert (
        rep["config"]["run"]["checkpoint_dir"] == str(ck) and rep["config"]["run"]["resume"] is True
    )
    assert not ck.exists()
    # --resume without a checkpoint starts afresh (and says so); --keep-checkpoint keeps it
    assert main(base + ["--resume", "--keep-checkpoint", "--output", str(tmp_path / "out2")]) == 0
    rep = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert rep["resumed_from_block"] is None and any("no resume state" in n for n in rep["notes"])
    assert json.loads((ck / "state.json").read_text())["last_block"] == 1
    assert main(["prune", "--model", "x", "--output", "o", "--resume"]) == 2
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err


def test_records_round_trip_through_their_dict_form():
    model = make("llama")
    res = prune(
        model,
        None,
        PruneConfig.from_flat(
            dict(scorer="sparsegpt", sparsity=0.7, trim=True, nsamples=8, seqlen=24)
        ),
        calibration=calib(8, 24),
        progress=False,
    )
    assert any(r.trim is not None for r in res.layers.values())
    assert any(r.scorer_info is not None for r in res.layers.values())
    for r in res.layers.values():
        assert LinearRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    for g in res.block_safeguard:
        assert BlockSafeguardRecord.from_dict(json.loads(json.dumps(g.to_dict()))) == g
