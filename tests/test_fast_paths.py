"""The execution seam: every registered fast path equals the pure function it replaces, a failing
kernel falls back to the pure function, deferred host copies equal eager ones, graph outputs keep
their structure."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimprune.algo.trim.evaluators import pruned_cross
from trimprune.algo.trim.search import iterate
from trimprune.core.linalg import mm_f32
from trimprune.core.runtime import Executor
from trimprune.exec import fastpaths, kernels, readback
from trimprune.exec.executor import CudaExecutor
from trimprune.exec.graphs import leaves, rebuild

SCRIPT = r"""
import torch
from trimprune.exec import fastpaths
bad = []
for pure, paths in fastpaths.REGISTRY.items():
    for fp in paths:
        if fp.backend != "triton":
            continue
        res = fastpaths.check(fp, torch.device("cpu"))
        print(fp.name, len(res), [d for _, d in res][:2])
        bad += [(fp.name, d) for ok, d in res if not ok]
        assert res, fp.name
print("BAD" if bad else "OK", bad)
"""


TIE_SCRIPT = r"""
import torch
from trimprune.algo.masks import row_ranks
from trimprune.algo.trim.evaluators import GramSpec
from trimprune.algo.trim.search import TrimSearch, TrimSettings, iterate
from trimprune.exec.kernels import fused_iterate

bad = []
for seed, lm in enumerate(["mse", "cosim_flat", "cosim_dim", "mse_dim"]):
    g = torch.Generator().manual_seed(seed)
    P, rows, n, T = 8, 50, 40, 200
    X = torch.randn(P, T, n, generator=g)
    # rows of very different scales: a sum over the rows depends on its order in the last bits
    W = torch.randn(P, rows, n, generator=g) * 10 ** (8 * torch.rand(P, rows, 1, generator=g) - 4)
    ranks = torch.stack([row_ranks(W[p].abs() * X[p].norm(dim=0)) for p in range(P)])
    settings = TrimSettings(layer_metric=lm, dim_metric="mse" if seed % 2 else "cosim")
    s = torch.full((P,), 0.5, dtype=torch.float64)
    ev, s3, base_lm, base_dq, _ = TrimSearch(settings)._start(
        GramSpec(T, tables="on"), W, X.transpose(1, 2) @ X, ranks, s
    )
    # steps far below one weight per row: every iteration keeps the uniform counts, so every
    # iteration's metric equals the uniform allocation's, and the uniform allocation stays
    args = (ev, ranks, s3, base_lm, base_dq, torch.tensor([1e-4, 2e-4], dtype=torch.float64), settings)
    bx, bm, bit = iterate(*args)
    assert torch.equal(bx, s3.expand_as(bx)) and torch.equal(bm, base_lm.expand_as(bm)), lm
    assert not bit.any(), lm
    fx, fm, fit = fused_iterate(*args)
    if not (torch.equal(fx, bx) and torch.equal(fm, bm) and torch.equal(fit, bit)):
        bad.append((lm, float((fm - bm).abs().max()), int((fx != bx).any(-1).sum())))
print("BAD" if bad else "OK", bad)
"""


def test_registry_holds_every_fast_path_with_examples():
    """Each fast path is registered against its pure function and can be checked (examples on any device);
    the Triton ones are checked below, the CUDA ones by benchmarks/gpu_check.py."""
    names = {pure: [fp.backend for fp in fps] for pure, fps in fastpaths.REGISTRY.items()}
    assert names == {mm_f32: ["cuda"], pruned_cross: ["triton"], iterate: ["triton"]}
    for fps in fastpaths.REGISTRY.values():
        for fp in fps:
            assert next(iter(fp.examples(torch.device("cpu"))), None) is not None, fp.name


def _interpret(script: str):
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.heavy
def test_triton_fast_paths_equal_their_pure_functions_in_the_interpreter():
    """The cross term equals the pure tensor code (rel. 1e-5); the fused iterations give the same best
    vectors and iterations and (to 1e-12) metrics, for the four layer metrics and both dimension-wise ones."""
    pytest.importorskip("triton")
    out = _interpret(SCRIPT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def test_fused_iterations_break_ties_as_the_pure_function():
    """Every iteration ties with the uniform allocation (steps too small to move a count): the kernel
    keeps the uniform allocation, its metric and iteration 0 as the pure function does (strict `>`,
    the earliest of equal metrics), although it sums the rows in another order than the tensor code
    that measured the uniform metric."""
    pytest.importorskip("triton")
    out = _interpret(TIE_SCRIPT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def test_a_failing_kernel_falls_back_to_the_pure_function(monkeypatch, caplog):
    """A Triton failure (e.g. no C compiler for its launcher) turns the kernels off with one warning and
    the pure function answers instead."""

    def pure(x):
        return x + 1

    def broken(x):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "FAILED", [])
    monkeypatch.setitem(
        fastpaths.REGISTRY,
        pure,
        [
            fastpaths.FastPath(
                "broken",
                pure,
                broken,
                lambda x: kernels.enabled(),
                lambda d: [],
                fastpaths.rel_close(0),
                "triton",
            )
        ],
    )
    monkeypatch.setenv("TRIMPRUNE_TRITON", "1")
    ex = CudaExecutor(torch.device("cpu"))
    if not kernels.enabled():  # no Triton here: the path never applies
        assert ex.call(pure, 1) == 2 and not ex.accelerates(pure, 1)
        return
    with caplog.at_level("WARNING", logger="trimprune"):
        assert ex.call(pure, 1) == 2
    assert "Triton kernels unavailable" in caplog.text and "no compiler" in kernels.FAILED[0]
    assert not kernels.enabled() and not ex.accelerates(pure, 1)


def test_deferred_host_copies_equal_eager_ones():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a/f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "b/long": torch.arange(5),
        "c/bool": torch.tensor(True),
        "d/f32": torch.randn(7, generator=g),
        "e/bytes": torch.arange(9, dtype=torch.uint8),
        "f/bytes": torch.tensor([255, 1], dtype=torch.uint8),
        "g/scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    want = Executor().defer(tensors, dict).result()
    got = readback.stage(tensors, dict)
    assert got.ready()
    got = got.result()
    assert got.keys() == want.keys()
    for k in want:
        assert (
            got[k].dtype == want[k].dtype
            and got[k].shape == want[k].shape
            and torch.equal(got[k], want[k])
        ), k


def test_graph_outputs_keep_their_structure():
    @dataclasses.dataclass
    class Out:
        a: torch.Tensor
        b: tuple

    out = (Out(torch.zeros(2), (torch.ones(3), 4)), [torch.arange(2)])
    ts = leaves(out)
    assert len(ts) == 3
    again = rebuild(out, iter([t + 10 for t in ts]))
    assert torch.equal(again[0].a, torch.full((2,), 10.0)) and again[0].b[1] == 4
    assert torch.equal(again[1][0], torch.arange(2) + 10)
