"""The Triton kernels (kernels.py) against the tensor code, run in Triton's CPU interpreter.

Skipped where Triton is not installed (it is not a dependency: CUDA builds of torch bring it).
The same comparisons run on a GPU in benchmarks/gpu_check.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import torch
from trimprune.kernels import _pruned_cross_triton, pruned_cross_reference, trim_iterations
from trimprune.masks import row_ranks
from trimprune.quality import GramEvaluator
from trimprune.trim import TrimSearch, TrimSettings

g = torch.Generator().manual_seed(0)
for P, R, N in [(1, 5, 7), (2, 37, 70)]:
    W = torch.randn(P, R, N, generator=g)
    G = torch.randn(N, N, generator=g).expand(P, N, N)
    rk = torch.stack([row_ranks(torch.randn(R, N, generator=g)) for _ in range(P)])
    want = pruned_cross_reference(W.double(), rk, G.double())
    got = _pruned_cross_triton(W, rk, G, BR=4, BA=16, BB=16).double()
    assert ((got - want).abs().max() / want.abs().max()) < 1e-5, "cross term"

for seed in range(8):
    g = torch.Generator().manual_seed(seed)
    P, rows, n, T = 3, 50, 40, 200
    X = torch.randn(P, T, n, generator=g) * torch.rand(n, generator=g) * 3
    W = torch.randn(P, rows, n, generator=g)
    W[1, :5] *= 6
    ranks = torch.stack([row_ranks(W[p].abs() * X[p].norm(dim=0)) for p in range(P)])
    lm = ["cosim_flat", "cosim_dim", "mse", "mse_dim"][seed % 4]
    dm = ["cosim", "mse"][seed % 2]
    ts = TrimSearch(TrimSettings(layer_metric=lm, dim_metric=dm))
    s = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)
    ev, s3, base_lm, base_dq, _ = ts._start(lambda src: GramEvaluator(src, T, tables="on"), W,
                                            X.transpose(1, 2) @ X, ranks, s)
    lrs = torch.tensor(ts.all_lrs, dtype=torch.float64) * (1 if seed < 4 else 20)
    bx, bm, bit = ts._iterate(ev, ranks, s3, base_lm, base_dq, lrs)          # tensor code (CPU)
    fx, fm, fit = trim_iterations(ev.count_tables(), ev.yy, s3.view(P), base_lm[:, 0], base_dq[:, 0], lrs, 10,
                                  0.95, int(0.95 * n + 1e-9), T, lm, dm)
    assert torch.equal(bx, fx) and torch.equal(bit, fit), (seed, lm, dm)
    assert (bm - fm).abs().max() <= 1e-12, (seed, lm, dm)
    assert bit.max() > 0, "some rate improved on uniform"
print("OK")
'''


def test_kernels_equal_tensor_code_in_the_triton_interpreter():
    """The cross term equals the reference; the fused iterations give the same best vectors, iterations
    and (to 1e-12) metrics as TrimSearch._iterate, for the four layer metrics and both dimension-wise ones."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
