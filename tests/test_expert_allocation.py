"""Expert-aware allocation (`--allocation expert`): per-expert sparsities within MoE blocks from the
routed-token counts (and outlier ratios), the block's parameter-weighted mean kept exactly.

The routing counts are checked against the dense model's own experts forward (transformers' eager
implementation, hooked: `test_moe._experts_calls`), the sparsities against the formula of
`algo.allocation.expert` computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_moe import _experts_calls
from tiny_models import calib, make, make_moe
from trimprune import PruneConfig, prune
from trimprune.algo.allocation.base import Allocation
from trimprune.algo.allocation.expert import (
    UPPER,
    Expert,
    apply_experts,
    expert_scores,
    expert_sparsities,
    routing_feature,
)
from trimprune.cli import main
from trimprune.core.model import ModelAdapter
from trimprune.core.moe import ExpertLinear, is_fused_experts
from trimprune.errors import ConfigError

N, L = 8, 24


def _experts(counts, outliers=None, group="mlp.experts"):
    outliers = outliers or [0.0] * len(counts)
    return [
        Expert((f"b.{group}.{e}.up_proj",), group, c, o)
        for e, (c, o) in enumerate(zip(counts, outliers))
    ]


# ------------------------------------------------------------------------------ the pure rule
def test_hand_computed_sparsities():
    counts = [0, 1, 7]  # c + 1/2 = 0.5, 1.5, 7.5: n(phi) = 0, log 3 / log 15, 1
    ex = _experts(counts)
    phi = routing_feature(ex)
    assert phi == pytest.approx([math.log(c + 0.5) - math.log(8 + 1.5) for c in counts])
    s = [0.0, math.log(3) / math.log(15), 1.0]
    assert expert_scores(ex, 0.0) == pytest.approx(s, abs=1e-15)
    mean_s = sum(s) / 3
    want = [0.5 - 2 * 0.1 * (x - mean_s) for x in s]
    got = expert_sparsities(ex, [1, 1, 1], 0.5, 0.1)
    assert got == pytest.approx(want, abs=1e-12)
    # unequal weights: the centre is the weighted mean of the scores
    w = [1, 2, 5]
    mean_w = sum(a * b for a, b in zip(s, w)) / sum(w)
    got = expert_sparsities(ex, w, 0.4, 0.05)
    assert got == pytest.approx([0.4 - 0.1 * (x - mean_w) for x in s], abs=1e-12)
    # beta: outlier ratios [4, 1, 2] -> n(o) = 1, 0, 1/3; a never-routed expert scores 0
    sb = expert_scores(_experts(counts, [4.0, 1.0, 2.0]), 0.5)
    assert sb == pytest.approx([0.0, 0.5 * s[1], 0.5 + 0.5 / 3], abs=1e-15)
    # the outlier ratios alone (beta 1) on routed experts
    assert expert_scores(_experts([3, 3, 3], [4.0, 1.0, 2.0]), 1.0) == pytest.approx(
        [1.0, 0.0, 1 / 3]
    )


def test_lambda_zero_or_equal_routing_is_uniform():
    ex = _experts([5, 9, 0, 2])
    assert expert_sparsities(ex, [3, 3, 3, 3], 0.55, 0.0) == [0.55] * 4
    assert expert_sparsities(_experts([6, 6, 6]), [1, 2, 3], 0.3, 0.2) == [0.3] * 3


def test_clipping_keeps_the_mean_and_the_bounds():
    ex = _experts([0, 1000, 1000, 1000])  # one never-routed expert pushed to the top bound
    t = expert_sparsities(ex, [1, 1, 1, 1], 0.9, 0.5)
    assert max(t) == pytest.approx(UPPER) and t[0] == max(t)
    assert sum(t) / 4 == pytest.approx(0.9, abs=1e-12)
    t = expert_sparsities(_experts([1, 1000, 1000, 1000]), [1] * 4, 0.05, 0.5)
    assert min(t) == 0.0 and sum(t) / 4 == pytest.approx(0.05, abs=1e-12)


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5000), st.integers(1, 10**6), st.floats(0, 30)),
        min_size=1,
        max_size=12,
    ),
    st.floats(0, 0.98),
    st.floats(0, 0.99),
    st.floats(0, 1),
    st.integers(1, 3),
)
def test_exact_weighted_mean_bounds_and_monotone(rows, target, lam, beta, groups):
    ex = [Expert((f"x.{e}",), f"g{e % groups}", c, o) for e, (c, _, o) in enumerate(rows)]
    w = [n for _, n, _ in rows]
    t = expert_sparsities(ex, w, target, lam, beta)
    mean = sum(a * b for a, b in zip(t, w)) / sum(w)
    assert abs(mean - target) <= 1e-9
    assert all(0.0 <= x <= UPPER for x in t)
    never = [x for x, e in zip(t, ex) if e.routed == 0]
    assert all(v == max(t) for v in never)  # never routed: the block's highest sparsity
    # routing alone (beta 0), one experts module: less frequent => at least as sparse
    t0 = expert_sparsities([Expert(e.linears, "g", e.routed) for e in ex], w, target, lam)
    for i, a in enumerate(ex):
        for j, b in enumerate(ex):
            if a.routed < b.routed:
                assert t0[i] >= t0[j] - 1e-12


def test_apply_experts_keeps_every_block_mean_and_the_other_linears():
    numels = {"a.0": 100, "e.0.0": 10, "e.0.1": 10, "e.1.0": 10, "e.1.1": 10, "d.1": 50}
    block_of = {"a.0": 0, "e.0.0": 0, "e.0.1": 0, "e.1.0": 0, "e.1.1": 0, "d.1": 1}
    per = {"a.0": 0.6, "e.0.0": 0.5, "e.0.1": 0.7, "e.1.0": 0.6, "e.1.1": 0.6, "d.1": 0.4}
    base = Allocation("owl", 0.56, per, numels, block_of)
    ex = [Expert(("e.0.0", "e.0.1"), "e", 10), Expert(("e.1.0", "e.1.1"), "e", 90)]
    out = apply_experts(base, [ex, []], 0.1, 0.0)
    assert out.per_block() == pytest.approx(base.per_block(), abs=1e-15)
    assert out.per_linear["a.0"] == 0.6 and out.per_linear["d.1"] == 0.4
    assert out.per_linear["e.0.0"] == out.per_linear["e.0.1"] > out.per_linear["e.1.0"]
    assert out.per_linear["e.0.0"] + out.per_linear["e.1.0"] == pytest.approx(1.2, abs=1e-15)
    assert out.details["layerwise"] == "owl" and out.details["routed_tokens"] == {
        "e.0": 10,
        "e.1": 90,
    }


# ------------------------------------------------------------------------------ end to end
def _cfg(**kw):
    return PruneConfig.from_flat(dict(nsamples=N, seqlen=L, moe_min_tokens=0) | kw)


def _counts(model, ids) -> dict[str, int]:
    """Routed tokens per expert (full name prefix) from the dense model's own forward."""
    adapter = ModelAdapter.from_model(model)
    calls = _experts_calls(model, ids)
    out = {}
    for i, blk in enumerate(adapter.blocks):
        for name, m in blk.named_modules():
            if is_fused_experts(m):
                idx = torch.cat([c[1].flatten() for c in calls[m]])
                counts = torch.bincount(idx, minlength=m.down_proj.shape[0])
                for e, c in enumerate(counts.tolist()):
                    out[f"{adapter.blocks_name}.{i}.{name}.{e}"] = c
    return out


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "gpt_oss"])
def test_prune_follows_the_routing_and_keeps_every_block_mean(family):
    model = make_moe(family, dtype=torch.float64)
    ids = calib(N, L)
    counts = _counts(model, ids)
    s = 0.6
    res = prune(
        model,
        None,
        _cfg(sparsity=s, allocation="expert", expert_lambda=0.2, batch_size=4),
        ids,
        progress=False,
    )
    a = res.allocation
    assert a.method == "expert" and a.details["routed_tokens"] == counts
    assert a.per_block() == pytest.approx([s] * len(a.per_block()), abs=1e-12)
    assert a.achieved == pytest.approx(s, abs=1e-12)
    # measured: every linear hits its own target (Wanda: per row), experts follow the routing
    measured = {}
    for n, r in res.layers.items():
        assert r.zeros == round(r.target_sparsity * r.shape[1]) * r.shape[0], n
        expert, kind = n.rsplit(".", 1)
        if expert in counts:
            measured[(expert, kind)] = r.zeros / r.numel
            assert r.target_sparsity == a.details["per_expert"][expert]
        else:
            assert r.target_sparsity == pytest.approx(s, abs=1e-15), n  # attention, shared, dense
    assert len({round(v, 9) for v in a.details["per_expert"].values()}) > 1
    for (e1, k1), m1 in measured.items():
        for (e2, k2), m2 in measured.items():
            same_block = e1.rsplit(".", 1)[0] == e2.rsplit(".", 1)[0]
            if k1 == k2 and same_block and counts[e1] < counts[e2]:
                assert m1 >= m2, (e1, e2)


def test_routing_counts_do_not_depend_on_moe_calibration_or_fallback():
    ids = calib(N, L)
    runs = [
        dict(),
        dict(moe_calibration="all"),
        dict(moe_min_tokens=10**6),  # every expert falls back to every token's statistics
    ]
    got = []
    for kw in runs:
        res = prune(
            make_moe("qwen3_moe"), None, _cfg(allocation="expert", **kw), ids, progress=False
        )
        got.append(res.allocation.details["routed_tokens"])
    assert got[0] == got[1] == got[2] == _counts(make_moe("qwen3_moe"), ids)
    assert sum(got[0].values()) == 2 * N * L * 2  # top-2 routing, two MoE blocks


@pytest.mark.parametrize("layerwise", ["owl", "atp"])
def test_composes_with_the_layerwise_rule(layerwise):
    ids = calib(N, L)
    base = prune(make_moe("qwen2_moe"), None, _cfg(allocation=layerwise), ids, progress=False)
    res = prune(
        make_moe("qwen2_moe"),
        None,
        _cfg(allocation="expert", expert_layerwise=layerwise, expert_beta=0.5),
        ids,
        progress=False,
    )
    a, b = res.allocation, base.allocation
    assert a.details["layerwise"] == layerwise
    assert a.per_block() == pytest.approx(b.per_block(), abs=1e-12)
    for k, v in b.per_linear.items():
        if ".experts." not in k:
            assert a.per_linear[k] == v


def test_a_dense_model_is_pruned_as_uniform():
    ids = calib(N, L)
    uni = prune(make("qwen2"), None, _cfg(), ids, progress=False)
    model = make("qwen2")
    res = prune(model, None, _cfg(allocation="expert", expert_lambda=0.3), ids, progress=False)
    assert res.allocation.per_linear == uni.allocation.per_linear
    for n in uni.layers:
        assert torch.equal(res.mask(n), uni.mask(n)), n


def test_search_with_the_experts_dimension(tmp_path):
    pytest.importorskip("optuna")
    ids = calib(N, L)
    flat = dict(
        allocation="search",
        search_space="rules,free,experts",
        search_trials=6,
        search_holdout=2,
        search_seed=3,
        alpha_cache_dir=str(tmp_path),
    )
    res = prune(make_moe("qwen3_moe"), None, _cfg(**flat), ids, progress=False)
    trials = res.search["trials"]
    assert len(trials) == 6 and all(t["state"] == "complete" for t in trials)
    assert all({"expert_lambda", "expert_beta"} <= set(t["params"]) for t in trials)
    assert trials[0]["params"]["expert_lambda"] == 0.0  # warm start: the profile alone
    assert any(t["params"]["expert_lambda"] > 0 for t in trials[4:])
    assert res.allocation.achieved == pytest.approx(0.5, abs=1e-12)
    best = res.search["best"]["params"]
    experts = [n for n, r in res.layers.items() if ".experts." in n]
    distinct = {round(res.layers[n].target_sparsity, 12) for n in experts}
    if best["expert_lambda"] > 0:
        assert len(distinct) > 2
    # a dense model: the experts space has nothing to search
    res = prune(make("qwen2"), None, _cfg(**flat | {"search_trials": 2}), ids, progress=False)
    assert all("expert_lambda" not in t["params"] for t in res.search["trials"])


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "flat,needle",
    [
        (dict(expert_lambda=1.0), "expert_lambda"),
        (dict(expert_lambda=-0.1), "expert_lambda"),
        (dict(expert_beta=1.5), "expert_beta"),
        (dict(expert_layerwise="search"), "expert_layerwise"),
        (dict(allocation="expert", mask_structure="2:4"), "mask_structure"),
        (dict(allocation="search", search_space="experts"), "needs rules or free"),
        (dict(allocation="search", search_space="trim,experts"), "e.g. rules,free,trim,experts"),
    ],
)
def test_bad_expert_settings_are_one_line_errors(flat, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        _cfg(**flat)
    assert "\n" not in str(e.value)


def test_cli_refuses_a_bad_expert_lambda_with_exit_2(tmp_path, capsys):
    rc = main(
        ["prune", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o")]
        + ["--allocation", "expert", "--expert-lambda", "2"]
    )
    err = [e for e in capsys.readouterr().err.splitlines() if e]
    assert rc == 2 and len(err) == 1 and "--expert-lambda 2" in err[0], err


def test_expert_linears_are_what_the_allocation_groups():
    model = make_moe("qwen2_moe")
    adapter = ModelAdapter.from_model(model)
    experts = {
        n.rsplit(".", 1)[0] for n, m in adapter.all_linears().items() if isinstance(m, ExpertLinear)
    }
    res = prune(model, None, _cfg(allocation="expert"), calib(N, L), progress=False)
    assert set(res.allocation.details["per_expert"]) == experts


# ------------------------------------------------------------------------------ two processes
def _dist_worker(rank: int, world: int, port: int, out: str):
    import json
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        cfg = _cfg(allocation="expert", expert_lambda=0.2, expert_beta=0.3, batch_size=N // 2)
        res = prune(make_moe("qwen3_moe"), None, cfg, calib(N, L), progress=False)
        if rank == 0:
            with open(os.path.join(out, "expert.json"), "w") as f:
                json.dump(
                    {"per_linear": res.allocation.per_linear, "details": res.allocation.details},
                    f,
                )
    finally:
        dist.destroy_process_group()


@pytest.mark.heavy
def test_two_processes_count_the_routing_as_one(tmp_path):
    """The routed counts (and outlier ratios) are summed over the ranks: two processes, each with
    half of the sequences, give one process's expert allocation."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / "expert.json").read_text())
    ids = calib(N, L)
    cfg = _cfg(allocation="expert", expert_lambda=0.2, expert_beta=0.3, batch_size=N // 2)
    want = prune(make_moe("qwen3_moe"), None, cfg, ids, progress=False).allocation
    assert got["details"]["routed_tokens"] == want.details["routed_tokens"]
    assert got["details"]["routed_tokens"] == _counts(make_moe("qwen3_moe"), ids)
    assert got["per_linear"] == pytest.approx(want.per_linear, abs=1e-9)
