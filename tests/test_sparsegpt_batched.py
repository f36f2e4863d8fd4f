"""SparseGPT's batched solve (`SparseGPT.prune_groups`: the same-shape groups of a block, e.g. the
experts of a MoE block, in one stacked solve) equals solving the groups one by one
(`prune_group`), item by item: weights, masks and solver info."""

import math
from types import SimpleNamespace

import pytest
import torch

from tiny_models import calib, make_moe
from trimprune import PruneConfig, prune
from trimprune.algo import block
from trimprune.algo.scorers import Member, Scorer, SparseGPT, Target
from trimprune.algo.scorers import sparsegpt as sgmod
from trimprune.algo.stats import InputStats, StatsNeeds
from trimprune.core.model import ModelAdapter, weight_2d

D = torch.float64


def _stats(X: torch.Tensor) -> InputStats:
    st = InputStats(X.shape[1], X.device, StatsNeeds(sqnorm=True, gram=True), dtype=X.dtype)
    st.add(X)
    return st


def _groups(seed: int, n: int, cols: int = 48, nm=None, row_counts=False):
    """n groups of two members (16 and 8 rows) reading their own random inputs, the members'
    sparsities differing within a group and between groups. Group 1 has 5 dead input columns,
    group 2 an indefinite Gram matrix (its Cholesky needs damping retries), group 3 a member whose
    OBS update overflows (non-finite fallback)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        X = torch.randn(200, cols, generator=g, dtype=D) * torch.linspace(0.2, 2, cols, dtype=D)
        if j == 1:
            X[:, :5] = 0
        st = _stats(X)
        if j == 2:
            st.gram[10, 11] = st.gram[11, 10] = 1e6
        a = torch.randn(16, cols, generator=g, dtype=D)
        b = torch.randn(8, cols, generator=g, dtype=D)
        if j == 3:
            b = b.clamp(-3, 3) * 1e307
        sa, sb = 0.4 + 0.05 * j, 0.7 - 0.03 * j
        ta = Target(sa, nm=nm)
        tb = Target(sb, nm=nm)
        if row_counts:
            ta.row_counts = torch.randint(0, cols, (16,), generator=g)
            tb.row_counts = torch.randint(0, cols, (8,), generator=g)
        out.append(([Member(f"a{j}", a, ta), Member(f"b{j}", b, tb)], st))
    return out


def _fresh(groups):
    """The same groups with new statistics (no cached inverse factor)."""
    out = []
    for ms, st in groups:
        s2 = InputStats(st.in_features, st.device, StatsNeeds(sqnorm=True, gram=True), dtype=D)
        s2.gram, s2.sqnorm, s2.n_tokens = st.gram.clone(), st.sqnorm.clone(), st.n_tokens
        out.append((ms, s2))
    return out


def _same_float(a: float, b: float, rel: float) -> bool:
    """Equal within `rel`, or both NaN (the OBS loss of a non-finite reconstruction)."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _assert_same(batched, single):
    for ob, os_ in zip(batched, single, strict=True):
        for x, y in zip(ob, os_, strict=True):
            assert torch.equal(x.mask, y.mask)
            torch.testing.assert_close(x.weight, y.weight, rtol=1e-12, atol=1e-12)
            ix, iy = x.info, y.info
            assert (ix.percdamp_used, ix.damp_retries, ix.fallback, ix.dead_columns) == (
                iy.percdamp_used,
                iy.damp_retries,
                iy.fallback,
                iy.dead_columns,
            )
            assert _same_float(ix.obs_loss, iy.obs_loss, 1e-12), (ix, iy)


@pytest.mark.parametrize(
    "kw", [{}, {"nm": (2, 4)}, {"row_counts": True}], ids=["unstructured", "2:4", "row-counts"]
)
def test_batched_solve_equals_group_by_group(kw, monkeypatch):
    groups = _groups(0, 5, **kw)
    sg = SparseGPT(blocksize=16)
    calls = []
    batch = sg._prune_batch
    monkeypatch.setattr(sg, "_prune_batch", lambda gs: calls.append(len(gs)) or batch(gs))
    batched = sg.prune_groups(groups)
    assert calls == [5]  # one batch
    single = [sg.prune_group(ms, st) for ms, st in _fresh(groups)]
    _assert_same(batched, single)
    assert batched[1][0].info.dead_columns == 5
    assert batched[2][0].info.damp_retries >= 1
    assert batched[3][1].info.fallback and batched[3][0].info.fallback is None
    for (ms, _), outs in zip(groups, batched):
        for m, o in zip(ms, outs):
            assert bool(torch.isfinite(o.weight).all()) and bool((o.weight[o.mask] == 0).all())
            if "row_counts" in kw:
                assert torch.equal(o.mask.sum(1), m.target.row_counts)
            elif "nm" not in kw:
                assert int(o.mask.sum()) == round(m.target.sparsity * m.weight.numel())


def test_groups_of_other_shapes_chunks_and_singletons(monkeypatch):
    """Groups of different shapes go to different batches; a chunk bounded by
    BATCH_GRAM_ELEMENTS is solved in balanced parts; a group alone in its shape, and a group
    without members, as before."""
    monkeypatch.setattr(sgmod, "BATCH_GRAM_ELEMENTS", 3 * 48 * 48)
    groups = _groups(1, 7) + _groups(2, 1, cols=32) + [([], None)]
    sg = SparseGPT(blocksize=16)
    calls = []
    batch = sg._prune_batch
    monkeypatch.setattr(sg, "_prune_batch", lambda gs: calls.append(len(gs)) or batch(gs))
    batched = sg.prune_groups(groups)
    assert calls == [2, 2, 3] and batched[-1] == []
    _assert_same(batched[:-1], [sg.prune_group(ms, st) for ms, st in _fresh(groups[:-1])])


def test_prepare_computes_the_inverse_factors_of_each_size_in_batches():
    groups = _groups(4, 4) + _groups(5, 3, cols=32)
    stats = [st for _, st in groups]
    sg = SparseGPT(blocksize=16)
    dev = torch.device("cpu")
    sg.prepare(stats + stats[:2], dev)  # repeated statistics are factorised once
    key = sg._factor_key(dev)
    assert all(st.has_derived(key) for st in stats)
    for st, (_, fresh) in zip(stats, _fresh(groups)):
        got, ref = sg.inverse_factor(st, dev), sg._inverse_factor(fresh.gram, dev)
        torch.testing.assert_close(got.U, ref.U, rtol=1e-12, atol=1e-12)
        assert torch.equal(got.dead, ref.dead)
        assert (got.percdamp_used, got.damp_retries, got.fallback, got.dead_columns) == (
            ref.percdamp_used,
            ref.damp_retries,
            ref.fallback,
            ref.dead_columns,
        )


def test_a_non_finite_gram_in_a_batch_is_an_error():
    groups = _groups(3, 3)
    groups[1][1].gram[0, 0] = math.inf
    with pytest.raises(sgmod.NonFiniteError, match="Gram matrix"):
        SparseGPT(blocksize=16).prune_groups(groups)


def _prune_moe(family: str, trim: bool, batched: bool, monkeypatch):
    sizes: list[int] = []
    if batched:
        batch = SparseGPT._prune_batch
        monkeypatch.setattr(
            SparseGPT, "_prune_batch", lambda self, gs: sizes.append(len(gs)) or batch(self, gs)
        )
    else:
        monkeypatch.setattr(SparseGPT, "prune_groups", Scorer.prune_groups)
        monkeypatch.setattr(SparseGPT, "prepare", Scorer.prepare)
    model = make_moe(family, dtype=D)
    flat = dict(
        scorer="sparsegpt", sparsity=0.6, nsamples=4, seqlen=16, moe_min_tokens=0, blocksize=8
    )
    if trim:
        flat |= dict(trim=True, trim_inputs="all")
    res = prune(model, None, PruneConfig.from_flat(flat), calibration=calib(4, 16), progress=False)
    monkeypatch.undo()
    assert not batched or max(sizes) >= 2  # the experts were solved in batches
    return model, res, sizes


@pytest.mark.parametrize("trim", [False, True], ids=["sparsegpt", "sparsegpt+trim"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_moe_prune_equals_group_by_group(family, trim, monkeypatch):
    m1, r1, sizes = _prune_moe(family, trim, True, monkeypatch)
    m2, r2, _ = _prune_moe(family, trim, False, monkeypatch)
    assert max(sizes) >= 4  # every expert of a block in one batch
    l1 = ModelAdapter.from_model(m1).all_linears()
    l2 = ModelAdapter.from_model(m2).all_linears()
    assert any(".experts.1." in n for n in l1)
    for n in l1:
        assert torch.equal(r1.mask(n), r2.mask(n)), n
        torch.testing.assert_close(weight_2d(l1[n]), weight_2d(l2[n]), rtol=0, atol=1e-12)
        a, b = r1.layers[n].scorer_info, r2.layers[n].scorer_info
        assert (a is None) == (b is None), n
        if a is not None:
            assert (a.percdamp_used, a.damp_retries, a.fallback, a.dead_columns) == (
                b.percdamp_used,
                b.damp_retries,
                b.fallback,
                b.dead_columns,
            )
            assert _same_float(a.obs_loss, b.obs_loss, 1e-12), n


def test_parts_are_consecutive_balanced_and_bounded(monkeypatch):
    monkeypatch.setattr(block, "PART_WEIGHTS", 100)
    sizes = {"a": 30, "b": 30, "c": 30, "d": 30, "e": 250, "f": 10}
    run = SimpleNamespace(
        linears={n: SimpleNamespace(weight=torch.empty(k)) for n, k in sizes.items()}
    )
    groups = [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    parts = block._parts(run, groups)
    assert [g for p in parts for g in p] == groups  # consecutive, in order
    # 380 weights: 4 parts of about 95 (plus at most one group), cut by the weights before each
    # group; the one the large group skips is empty
    assert parts == [[["a", "b"], ["c"], ["d"]], [["e"]], [["f"]]]
    assert block._parts(run, groups[:2]) == [groups[:2]]  # 90 weights: one part


def test_moe_prune_in_parts_equals_one_part(monkeypatch):
    _, r1, _ = _prune_moe("qwen3_moe", False, True, monkeypatch)
    monkeypatch.setattr(block, "PART_WEIGHTS", 2000)  # a tiny block in several parts
    got = []
    parts = block._parts
    monkeypatch.setattr(block, "_parts", lambda run, gs: got.append(parts(run, gs)) or got[-1])
    _, r2, _ = _prune_moe("qwen3_moe", False, True, monkeypatch)
    assert max(len(p) for p in got) >= 3
    for n in r1.layers:
        assert torch.equal(r1.mask(n), r2.mask(n)), n
