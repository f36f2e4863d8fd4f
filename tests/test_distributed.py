"""Data-parallel pruning over several processes (torch.distributed, gloo on CPU) against one process.

The results are bit-identical: two processes holding one calibration batch each sum their statistics
as s1 + s2, as one process holding both batches does (0 + s1 + s2). That holds for the Gram matrix
too, because each batch's product X^T X is finished before it is added (an `addmm_` into the running
sum rounds differently, which moved TRIM's decisions and SparseGPT's solution on SmolLM2). Runs with
shares of unequal size are compared within a tolerance.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from aliases import need_alias
from tiny_models import calib, make
from trimprune import PruneConfig, prune
from trimprune.core.model import ModelAdapter, weight_2d
from trimprune.core.ranks import Ranks

CASES = {
    # name: (family, nsamples, config) -- batch_size = nsamples / 2: one batch per rank with two ranks
    "wanda": ("llama", 8, dict(scorer="wanda", sparsity=0.5)),
    "wanda_trim_last": (
        "llama",
        8,
        dict(scorer="wanda", sparsity=0.6, trim=True, trim_inputs="last-token"),
    ),
    "wanda_trim_sample": (
        "qwen2",
        8,
        dict(scorer="wanda", sparsity=0.6, trim=True, trim_inputs="sample:40"),
    ),
    "owl": ("llama", 8, dict(scorer="wanda", sparsity=0.6, allocation="owl")),
    "wanda_trim_all": ("llama", 8, dict(scorer="wanda", sparsity=0.6, trim=True)),
    "sparsegpt": ("llama", 8, dict(scorer="sparsegpt", sparsity=0.5)),
    "sparsegpt_trim": ("qwen2", 8, dict(scorer="sparsegpt", sparsity=0.6, trim=True)),
    "recalc": (
        "llama",
        8,
        dict(
            scorer="wanda",
            sparsity=0.5,
            trim=True,
            trim_inputs="last-token",
            trim_input_recalc=True,
        ),
    ),
}
L = 24


def _config(name: str, world: int) -> tuple[str, torch.Tensor, PruneConfig]:
    family, n, kw = CASES[name]
    per_rank = -(-n // 2)  # one batch per rank with two ranks (the same batches in one process)
    return (
        family,
        calib(n, L),
        PruneConfig.from_flat(dict(kw, nsamples=n, seqlen=L, batch_size=per_rank)),
    )


def _run(name: str, world: int):
    family, ids, cfg = _config(name, world)
    model = make(family)
    res = prune(model, None, cfg, calibration=ids, progress=False)
    lin = ModelAdapter.from_model(model).all_linears()
    tensors = {f"w/{k}": weight_2d(m).detach().clone().contiguous() for k, m in lin.items()}
    tensors |= {f"m/{k}": res.mask(k).contiguous() for k in lin}
    return tensors, res


def _approx(x):
    if isinstance(x, dict):
        return {k: _approx(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_approx(v) for v in x]
    return pytest.approx(x, rel=1e-9, abs=1e-15) if isinstance(x, float) else x


def _worker(rank: int, world: int, port: int, names: list[str], out: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for name in names:
            tensors, res = _run(name, world)
            if rank == 0:
                save_file(tensors, os.path.join(out, f"{name}.safetensors"))
                meta = {
                    "layers": {k: r.to_dict() for k, r in res.layers.items()},
                    "guard": [g.to_dict() for g in res.block_safeguard],
                    "allocation": res.allocation.per_linear,
                    "shape": list(res.calibration_shape),
                }
                with open(os.path.join(out, f"{name}.json"), "w") as f:
                    json.dump(meta, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), list(CASES), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one(name, two_ranks):
    got = load_file(str(two_ranks / f"{name}.safetensors"))
    meta = json.loads((two_ranks / f"{name}.json").read_text())
    want, res = _run(name, 1)
    assert set(got) == set(want)
    assert meta["shape"] == list(res.calibration_shape)
    assert meta["allocation"] == pytest.approx(res.allocation.per_linear, abs=1e-12)
    for k, r in res.layers.items():  # exact per-linear sparsity holds in both runs
        assert meta["layers"][k]["zeros"] == r.zeros
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # records: equal up to float64 rounding of the row-quality statistics (BLAS results may depend on
    # the memory alignment of the gathered token matrices)
    assert meta["layers"] == _approx({k: r.to_dict() for k, r in res.layers.items()})
    assert meta["guard"] == _approx([g.to_dict() for g in res.block_safeguard])


def _uneven_worker(rank: int, world: int, port: int, out: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = make("llama")
        cfg = PruneConfig.from_flat(
            dict(scorer="wanda", sparsity=0.6, trim=True, nsamples=7, seqlen=L, batch_size=2)
        )
        res = prune(model, None, cfg, calibration=calib(7, L), progress=False)
        lin = ModelAdapter.from_model(model).all_linears()
        save_file(
            {k: weight_2d(m).detach().contiguous() for k, m in lin.items()},
            os.path.join(out, f"rank{rank}.safetensors"),
        )
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "sparsity": res.global_sparsity,
                    "n": len(res.layers),
                    "guard": len(res.block_safeguard),
                },
                f,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.heavy
def test_three_processes_with_uneven_shares_hold_the_same_weights(tmp_path):
    """7 sequences over 3 ranks (3, 2, 2): every rank ends with the same weights and records, close to one
    process (the sums are in a different order)."""
    mp.spawn(_uneven_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)
    w = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(3)]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for r in (1, 2):
        assert meta[r] == meta[0]
        for k in w[0]:
            assert torch.equal(w[r][k], w[0][k]), k
    model = make("llama")
    cfg = PruneConfig.from_flat(
        dict(scorer="wanda", sparsity=0.6, trim=True, nsamples=7, seqlen=L, batch_size=2)
    )
    res = prune(model, None, cfg, calibration=calib(7, L), progress=False)
    assert meta[0]["sparsity"] == pytest.approx(res.global_sparsity, abs=1e-12)
    assert meta[0]["n"] == len(res.layers)


def test_shares_and_assignment():
    assert [Ranks(r, 3).share(7) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert [Ranks(r, 4).share(2) for r in range(4)] == [
        slice(0, 1),
        slice(1, 2),
        slice(2, 2),
        slice(2, 2),
    ]
    # largest first to the least loaded rank
    assert Ranks(0, 2).assign([192, 64, 128, 128]) == [0, 0, 1, 1]
    assert Ranks(1, 3).assign([10, 10, 10, 10]) == [0, 1, 2, 0]
    assert Ranks(0, 1).assign([5, 1]) == [0, 0]


def test_too_few_sequences_for_the_processes_is_an_error():
    import trimprune.session as api
    from trimprune.errors import TrimpruneError

    orig = api.Ranks.current
    api.Ranks.current = classmethod(lambda cls: Ranks(0, 4))
    try:
        with pytest.raises(TrimpruneError, match="calib.nsamples 4"):
            prune(
                make("llama"),
                None,
                PruneConfig.from_flat(dict(nsamples=2, seqlen=8)),
                calibration=calib(2, 8),
                progress=False,
            )
    finally:
        api.Ranks.current = orig


@pytest.mark.heavy
def test_torchrun_command_line(tiny_dir, tmp_path, with_data_env):
    """`torchrun --nproc-per-node 2 -m trimprune prune ...` (gloo on CPU): rank 0 writes the output, whose
    masks equal a one-process run's; the perplexity is shared over the ranks."""
    base = [
        "prune",
        "--model",
        str(tiny_dir),
        "--scorer",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        "c4",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--eval",
        "wikitext2",
        "--eval-limit",
        "5",
        "--device",
        "cpu",
        "--quiet",
        "--trim",
        "--trim-inputs",
        "last-token",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "trimprune",
        ]
        + base
        + ["--output", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("written:") == 1  # rank 0 alone writes and prints
    r1 = subprocess.run(
        [sys.executable, "-m", "trimprune"] + base + ["--output", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "masks.safetensors")) for d in ("two", "one"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("two", "one"))
    pa, pb = ra["metrics"]["perplexity"]["wikitext2"], rb["metrics"]["perplexity"]["wikitext2"]
    assert pa == pytest.approx(pb, rel=1e-6)
    assert ra["metrics"]["dense_perplexity"]["wikitext2"] == pytest.approx(
        rb["metrics"]["dense_perplexity"]["wikitext2"], rel=1e-6
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


FAILING = """
import sys, time
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from tiny_models import V, calib, make
from trimprune import PruneConfig, prune
dist.init_process_group("gloo")
ids = calib(4, 16)
ids[3, 5] = V + 100          # a token id outside the vocabulary, in rank 1's share only
prune(make("llama"), None, PruneConfig.from_flat(dict(nsamples=4, seqlen=16)), calibration=ids, progress=False)
"""


@pytest.mark.heavy
def test_a_failing_rank_stops_every_rank(tmp_path):
    """Rank 1 fails (a bad token id in its share of the calibration) while rank 0 waits for it in a
    collective: torchrun stops both with the error instead of hanging."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode != 0
    assert "IndexError" in r.stderr and "index out of range" in r.stderr


@pytest.mark.slow
def test_smollm2_two_processes_perplexity(tmp_path, with_data_env):
    """SmolLM2-135M on CPU, two gloo processes of one batch each against one process of two batches:
    WikiText-2 perplexity of wanda, wanda+TRIM and sparsegpt at 50 % equal (measured: 91.423, 90.234,
    90.554 in both). SparseGPT's and TRIM's results from 16 x 256 calibration tokens move by up to a
    few percent with any change in the rounding of the Gram matrix (in one process, 2 threads instead
    of 1 moved SparseGPT from 89.68 to 92.18), so equality here checks that the sums match bit for bit."""
    need_alias("smollm2-135m")
    script = os.path.join(os.path.dirname(__file__), "dist_smollm2.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            script,
            str(tmp_path / "two.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert a["world"] == 2 and b["world"] == 1
    for name in ("wanda", "wanda_trim", "sparsegpt"):
        assert a[name]["sparsity"] == pytest.approx(b[name]["sparsity"], abs=1e-9)
        assert a[name]["ppl"] == b[name]["ppl"], name
