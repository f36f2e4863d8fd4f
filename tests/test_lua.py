"""`--allocation lua`: the soft top-k relaxation against hand-computed values and the scorer's own
masks, the masked forward against hard-masked weights, the budget projection, determinism, replay,
the model left as it was, refusals and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_models import calib, make, make_moe
from trimprune import PruneConfig, prune
from trimprune.algo.allocation.lua import (
    UPPER,
    hard_mask,
    kl_per_token,
    lua_allocation,
    project,
    soft_mask,
    unit_ranks,
)
from trimprune.algo.masks import row_mask
from trimprune.core.model import ModelAdapter
from trimprune.engine.influence import linear_weights
from trimprune.engine.lua import masked_forward, masked_logits
from trimprune.errors import ConfigError, TrimpruneError


def _cfg(**kw):
    base = dict(scorer="wanda", sparsity=0.6, nsamples=6, seqlen=12, allocation="lua")
    return PruneConfig.from_flat(base | dict(lua_steps=6, lua_lr=0.02) | kw)


# ------------------------------------------------------------------------------------------ pure
def test_unit_ranks_by_hand():
    r = unit_ranks(torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 0.0]]))
    assert r.flatten().tolist() == pytest.approx([5 / 6, 1 / 6, 1 / 2, 1 / 2, 5 / 6, 1 / 6])


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.8])
def test_the_hard_limit_is_the_scorers_row_mask(sparsity):
    scores = torch.rand(7, 40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(hard_mask(unit_ranks(scores), sparsity), row_mask(scores, sparsity))


def test_soft_mask_values_and_gradient_by_hand():
    r = torch.tensor([[0.25, 0.5, 0.75]])
    t = torch.tensor(0.5, requires_grad=True)
    m = soft_mask(r, t, 0.25)
    s = 1 / (1 + math.exp(1))  # sigmoid(-1)
    assert m.detach().flatten().tolist() == pytest.approx([s, 0.5, 1 - s])
    m.sum().backward()  # d/dt sigmoid((r - t) / tau) = -sigma (1 - sigma) / tau
    want = -(2 * s * (1 - s) + 0.25) / 0.25
    assert float(t.grad) == pytest.approx(want)
    sharp = soft_mask(r, torch.tensor(0.6), 1e-4)  # tau -> 0: the hard mask's complement
    assert torch.equal(sharp > 0.5, ~hard_mask(r, 0.6))


def test_projection_exact_mean_bounds_and_shift():
    numels = torch.tensor([10.0, 30.0, 60.0])
    t = torch.tensor([0.5, 0.7, 0.6])
    p = project(t, numels, 0.65)
    assert float((p.double() * numels.double()).sum() / numels.sum()) == pytest.approx(
        0.65, abs=1e-6
    )
    d = (p - t).tolist()
    assert d == pytest.approx([d[0]] * 3, abs=1e-6)  # one constant shift
    clipped = project(torch.tensor([0.05, 0.99, 0.99]), numels, 0.9)
    assert float(clipped.max()) <= UPPER + 1e-7 and float(clipped.min()) >= 0.0


def test_kl_per_token_by_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(kl_per_token(torch.log_softmax(a, -1), b)) == pytest.approx(float(want), rel=1e-5)
    assert float(kl_per_token(torch.log_softmax(a, -1), a)) == pytest.approx(0.0, abs=1e-6)


def test_allocation_is_exact_and_named_lua():
    numels = {"a": 100, "b": 300, "c": 600}
    alloc = lua_allocation({"a": 0.2, "b": 0.9, "c": 0.7}, 0.7, numels, {"a": 0, "b": 0, "c": 1})
    assert alloc.method == "lua" and alloc.achieved == pytest.approx(0.7, abs=1e-12)
    assert all(0.0 <= v <= UPPER for v in alloc.per_linear.values())
    assert alloc.per_linear["a"] < alloc.per_linear["c"] < alloc.per_linear["b"]


# ------------------------------------------------------------------------------------------ engine
def test_masked_forward_equals_hard_masked_weights():
    """With tau -> 0 the functional forward is the model with every prunable weight masked at its
    own threshold: every linear's mask reaches the forward, none is written into the model."""
    model = make("llama")
    ad = ModelAdapter.from_model(model)
    params = linear_weights(ad, "lua")
    g = torch.Generator().manual_seed(1)
    ranks = {k: unit_ranks(torch.rand(p.shape, generator=g)) for k, p in params.items()}
    t = torch.rand(len(params), generator=g) * 0.8
    x = calib(2, 10)
    before = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        got = masked_logits(model, params, ranks, t, 1e-6, x)
        assert all(torch.equal(p, before[k]) for k, p in params.items())
        for j, (k, p) in enumerate(params.items()):
            p.masked_fill_(hard_mask(ranks[k], float(t[j])), 0.0)
        want = model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpointed_masks_equal_the_functional_ones(family):
    """The masks applied inside each nn.Linear's forward under checkpointing give the logits and
    the threshold gradients of the plain functional forward (GPT-2's Conv1D weights always take the
    functional path)."""
    model = make(family)
    ad = ModelAdapter.from_model(model)
    params = linear_weights(ad, "lua")
    g = torch.Generator().manual_seed(2)
    ranks = {k: unit_ranks(torch.rand(p.shape, generator=g)).half() for k, p in params.items()}
    x = calib(2, 10)
    dense = torch.log_softmax(model(input_ids=x, use_cache=False).logits.detach(), -1)
    for p in model.parameters():
        p.requires_grad_(False)
    got = []
    for checkpointed in (True, False, "blocks"):
        t = torch.rand(len(params), generator=torch.Generator().manual_seed(3)) * 0.8
        t.requires_grad_(True)
        if checkpointed == "blocks":  # and every decoder block: the backward inside the context
            with masked_forward(model, params, ranks, t, 0.05, True, ad) as forward:
                logits = forward(x)
                kl_per_token(dense, logits).backward()
        else:
            logits = masked_logits(model, params, ranks, t, 0.05, x, checkpointed=checkpointed)
            kl_per_token(dense, logits).backward()
        got.append((logits.detach(), t.grad.clone()))
    for other in got[1:]:
        torch.testing.assert_close(got[0][0], other[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[0][1], other[1], rtol=1e-5, atol=1e-8)
    assert float(got[0][1].abs().sum()) > 0
    assert all("forward" not in m.__dict__ for m in model.modules())  # the class forwards back


def test_determinism_exact_mean_and_replay(tmp_path):
    ids = calib(6, 12)
    res = prune(make("llama"), None, _cfg(), calibration=ids, progress=False)
    again = prune(make("llama"), None, _cfg(), calibration=ids, progress=False)
    a = res.allocation
    assert a.method == "lua" and a.per_linear == again.allocation.per_linear
    assert a.achieved == pytest.approx(0.6, abs=1e-9)
    assert all(0.0 <= v <= UPPER for v in a.per_linear.values())
    assert len(set(a.per_linear.values())) > 1  # learned, not uniform
    d = a.details
    assert d["steps"] == 6 and len(d["kl"]) == 6 and all(math.isfinite(v) for v in d["kl"])
    for n in res.layers:
        assert torch.equal(res.mask(n), again.mask(n))
    other = prune(make("llama"), None, _cfg(seed=1), calibration=ids, progress=False)
    assert other.allocation.per_linear != a.per_linear  # another seed draws other batches
    path = tmp_path / "allocation.json"
    a.save(path)
    rep = prune(
        make("llama"), None, _cfg(allocation=f"file:{path}"), calibration=ids, progress=False
    )
    assert rep.allocation.per_linear == a.per_linear
    for n in res.layers:
        assert torch.equal(rep.mask(n), res.mask(n))


@pytest.mark.parametrize("scorer", ["magnitude", "sparsegpt"])
def test_other_scorers(scorer):
    res = prune(make("llama"), None, _cfg(scorer=scorer), calibration=calib(6, 12), progress=False)
    assert res.allocation.method == "lua" and res.allocation.details["scorer"] == scorer
    assert res.allocation.achieved == pytest.approx(0.6, abs=1e-9)


def test_a_bf16_model_is_trained_in_float32_and_left_as_it_was():
    model = make("llama", dtype=torch.bfloat16)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    from trimprune.engine.lua import train_thresholds

    ad = ModelAdapter.from_model(model)
    params = linear_weights(ad, "lua")
    ranks = {k: unit_ranks(p.detach().float().abs()).half() for k, p in params.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t, d = train_thresholds(_cfg(), model, ad, ranks, calib(6, 12), "cpu")
    assert set(t) == set(params) and d["kl_first"] > 0
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags


def test_refusals():
    with pytest.raises(ConfigError, match="offload"):
        _cfg(offload="cpu")
    for flat, needle in [
        (dict(lua_steps=0), "--lua-steps 0"),
        (dict(lua_lr=0.0), "--lua-lr 0.0"),
        (dict(lua_temperature=0.0), "--lua-temperature 0.0"),
        (dict(lua_batch=0), "--lua-batch 0"),
    ]:
        with pytest.raises(ConfigError) as e:
            _cfg(**flat)
        assert needle in e.value.cli_message() and "\n" not in str(e.value)
    with pytest.raises(TrimpruneError, match="view into a fused tensor"):
        prune(make_moe("qwen3_moe"), None, _cfg(), calibration=calib(6, 12), progress=False)


def test_cli_records_the_method_and_its_training(tiny_dir, tmp_path, capsys, with_data_env):
    from trimprune.cli import main

    out = tmp_path / "l"
    argv = ["prune", "--model", str(tiny_dir), "--calib", "c4", "--nsamples", "4", "--seqlen"]
    argv += ["16", "--sparsity", "0.7", "--allocation", "lua", "--lua-steps", "3", "--quiet"]
    assert main([*argv, "--no-save-model", "--output", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert r["allocation"]["method"] == "lua" and len(r["allocation"]["details"]["kl"]) == 3
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["method"] == "lua" and alloc["achieved_sparsity"] == pytest.approx(0.7, abs=1e-9)
