"""TRIM steering SparseGPT (`--trim-sparsegpt steer`, `algo.trim.steer`): row weights on the
saliency, exact sparsity, never below SparseGPT alone, the batched search equal to a plain loop."""

import pytest
import torch

from tiny_models import calib, make
from trimprune import PruneConfig, prune
from trimprune.algo.scorers import Member, Target
from trimprune.algo.scorers.sparsegpt import SparseGPT
from trimprune.algo.stats import InputStats, StatsNeeds
from trimprune.algo.trim.evaluators import GramEvaluator
from trimprune.algo.trim.metrics import dim_metric, layer_metric
from trimprune.algo.trim.settings import TrimSettings
from trimprune.algo.trim.steer import steer_groups
from trimprune.core.records import Kept
from trimprune.errors import ConfigError


def _stats(X: torch.Tensor) -> InputStats:
    st = InputStats(X.shape[1], torch.device("cpu"), StatsNeeds(sqnorm=False, gram=True))
    st.gram, st.n_tokens = X.T @ X, X.shape[0]
    return st


def test_a_row_scale_moves_the_pruned_weights_between_rows_by_hand():
    """With H = I (no update spreads) and two equal rows, SparseGPT alone prunes the two smallest
    weights of each row (ties in row-major order); weighting row 1's saliency by 100 makes the four
    smallest all row 0's. The matrix keeps its pruned count."""
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    st = _stats(torch.eye(4))
    sg = SparseGPT(blocksize=4)
    alone = sg.prune_group([Member("w", W, Target(0.5))], st)[0].mask
    steered = sg.prune_group(
        [Member("w", W, Target(0.5, row_scale=torch.tensor([1.0, 100.0])))], st
    )[0].mask
    assert alone.tolist() == [[True, True, False, False]] * 2
    assert steered.tolist() == [[True] * 4, [False] * 4]


@pytest.mark.parametrize("seed", [0, 1])
def test_row_scales_batched_equal_one_by_one_and_ones_equal_alone(seed):
    """Same-shape groups with row scales solved as one batch (`_prune_batch`) give what each gives
    alone (`prune_group`); scales of 1 give SparseGPT alone."""
    g = torch.Generator().manual_seed(seed)
    rows, n, T = 12, 40, 90
    st = _stats(torch.randn(T, n, generator=g, dtype=torch.float64).float())
    W = torch.randn(rows, n, generator=g)
    sg = SparseGPT(blocksize=16)
    scales = [torch.rand(rows, generator=g) * 3 for _ in range(3)] + [torch.ones(rows)]
    groups = [([Member("w", W, Target(0.6, row_scale=s))], st) for s in scales]
    batched = sg.prune_groups(groups)
    for (ms, _), got in zip(groups, batched):
        one = sg.prune_group(ms, st)[0]
        assert torch.equal(got[0].mask, one.mask)
        torch.testing.assert_close(got[0].weight, one.weight, rtol=1e-5, atol=1e-6)
        assert int(got[0].mask.sum()) == round(0.6 * rows * n)
    plain = sg.prune_group([Member("w", W, Target(0.6))], st)[0]
    assert torch.equal(batched[-1][0].mask, plain.mask)


def _plain_steer(sg, W, st, s, settings):
    """The steered search (module docstring of `algo.trim.steer`) for one linear, one rate after
    the other, each candidate solved by `prune_group`: the best layer metric and its mask."""
    ev = GramEvaluator(st.gram, st.n_tokens)
    ev.prepare(W)

    def solve(z):
        t = Target(s, row_scale=None if z is None else torch.exp(z))
        o = sg.prune_group([Member("w", W, t)], st)[0]
        rs = ev.stats_from_weight(o.weight.unsqueeze(0))
        return float(layer_metric(settings.layer_metric, rs)[0]), dim_metric("cosim", rs)[0], o

    base, dq0, alone = solve(None)
    best, best_mask = base, alone.mask
    for lr in settings.lrs:
        z, dq = torch.zeros(W.shape[0], dtype=torch.float64), dq0
        for _ in range(settings.iterations):
            d = (dq.double() - dq.min()) / (dq.max() - dq.min() + 1e-6) * 2 * lr
            z = z - (d - d.mean())
            m, dq, o = solve(z)
            if m > best:
                best, best_mask = m, o.mask
    return base, best, best_mask


def test_the_batched_steered_search_equals_a_plain_loop():
    """`steer_groups` (every rate in one scorer call per iteration) gives the metric and mask of a
    plain per-rate loop over `prune_group`."""
    g = torch.Generator().manual_seed(3)
    rows, n, T, s = 16, 48, 120, 0.7
    X = torch.randn(T, n, generator=g) * torch.linspace(0.2, 3.0, n)
    st = _stats(X.double().float())
    W = torch.randn(rows, n, generator=g)
    sg = SparseGPT(blocksize=16)
    settings = TrimSettings(iterations=4, lrs=(0.02, 0.1, 0.4))
    alone, steered = steer_groups(
        sg,
        [([Member("w", W, Target(s))], st)],
        lambda m: True,
        lambda _g: GramEvaluator(st.gram, st.n_tokens),
        settings,
    )
    base, best, mask = _plain_steer(sg, W, st, s, settings)
    got = steered["w"]
    assert float(got.alone_metric) == pytest.approx(base, abs=1e-9)
    assert float(got.trim_metric) == pytest.approx(best, abs=1e-9)
    assert bool(got.keep) == (best > base)
    assert torch.equal(got.trim.mask, mask)
    assert torch.equal(alone[0][0].mask, sg.prune_group([Member("w", W, Target(s))], st)[0].mask)
    assert int(got.trim.mask.sum()) == round(s * rows * n)


@pytest.mark.parametrize("block_safeguard", [False, True])
def test_steered_prune_is_exact_and_never_below_sparsegpt_alone(block_safeguard):
    """On a tiny Qwen2 at 70 %: every linear prunes SparseGPT's own count, keeps TRIM only where
    its layer metric beats SparseGPT alone's, most linears keep it, and their rows differ."""
    s = 0.7
    res = prune(
        make("qwen2"),
        None,
        PruneConfig.from_flat(
            dict(
                scorer="sparsegpt",
                sparsity=s,
                nsamples=8,
                seqlen=24,
                trim=True,
                trim_sparsegpt="steer",
                trim_block_safeguard=block_safeguard,
            )
        ),
        calibration=calib(8, 24),
        progress=False,
    )
    kept = 0
    for name, r in res.layers.items():
        t = r.trim
        assert r.zeros == round(s * r.numel), name
        assert t.trim_weights_metric >= t.scorer_alone_metric, name
        if t.kept != Kept.SAFEGUARD:
            assert t.trim_weights_metric > t.scorer_alone_metric, name
            assert t.search.lr is not None and t.search.best_iter >= 1
        kept += t.kept == Kept.TRIM
    assert kept >= len(res.layers) // 2
    assert any(r.row_sparsity_max - r.row_sparsity_min > 0.05 for r in res.layers.values())


def test_steer_needs_sparsegpt():
    with pytest.raises(ConfigError, match=r"trim\.sparsegpt steer .*scorer\.name wanda"):
        PruneConfig.from_flat(dict(trim=True, trim_sparsegpt="steer"))
