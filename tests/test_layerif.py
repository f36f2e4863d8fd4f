"""`--allocation layerif`: the influence math against brute force, the streaming gradient engine
against explicit per-example gradients, the mapping (exact mean, bounds), determinism and replay."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import calib, make, make_llama
from trimprune import PruneConfig, prune
from trimprune.algo.allocation.layerif import (
    datainf_damping,
    influences,
    layer_score,
    layerif_allocation,
    positive_influence,
    zero_score_warning,
)
from trimprune.core.model import ModelAdapter
from trimprune.engine.influence import layerif_scores
from trimprune.errors import ConfigError


def _random(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_datainf_closed_form_equals_brute_force_inverses(seed):
    """DataInf's closed form is the average of the damped rank-one inverses applied to v, exactly
    (Sherman-Morrison): -g_k^T (1/n) sum_i (lambda I + g_i g_i^T)^{-1} v."""
    G, v = _random(seed=seed)
    n, d = G.shape
    lam = datainf_damping((G * G).sum(1), d, 0.1)
    inv = sum(torch.linalg.inv(lam * torch.eye(d, dtype=G.dtype) + torch.outer(g, g)) for g in G)
    expected = -(G @ (inv / n) @ v)
    torch.testing.assert_close(influences(G, v, "datainf"), expected, rtol=1e-10, atol=1e-12)
    assert lam == pytest.approx(0.1 * float((G * G).mean()))


def test_datainf_equals_inverse_of_damped_mean_outer_product_for_one_example():
    """With one training example the average of inverses is the inverse of (lambda I + mean g g^T);
    with several, DataInf approximates it (closer as lambda grows against ||g||^2)."""
    G, v = _random(n=1, d=4, seed=3)
    lam = datainf_damping((G * G).sum(1), 4, 0.1)
    exact = -(G @ torch.linalg.solve(lam * torch.eye(4, dtype=G.dtype) + G.T @ G, v))
    torch.testing.assert_close(influences(G, v, "datainf"), exact, rtol=1e-10, atol=1e-12)
    G, v = _random(n=8, d=6, seed=4)
    # strong damping (||g||^2 << lambda): both reduce to -(1/lambda) G v, to O((||g||^2/lambda)^2)
    lam = datainf_damping((G * G).sum(1), 6, 1000.0)
    H = lam * torch.eye(6, dtype=G.dtype) + G.T @ G / 8
    exact = -(G @ torch.linalg.solve(H, v))
    torch.testing.assert_close(influences(G, v, "datainf", 1000.0), exact, rtol=1e-4, atol=0)


def test_identity_influence_and_positive_sum():
    G, v = _random(seed=5)
    infl = influences(G, v, "identity")
    torch.testing.assert_close(infl, -(G @ v))
    assert positive_influence(infl) == pytest.approx(float((-(G @ v)).clamp_min(0).sum()))
    assert layer_score(infl, "positive") == positive_influence(infl)
    # signed: every example counts, the helpful ones (negative influence) too: -sum_i g_i . v
    assert layer_score(infl, "signed") == pytest.approx(-float(G.sum(0) @ v))
    with pytest.raises(ValueError, match="signed"):
        layer_score(infl, "mean")


def test_hand_computed_scores_and_the_zero_score_warning():
    """g_1 = (1, 0), g_2 = (0, 2), v = (1, -1): I = -(g . v) = (-1, 2); positive 2, signed 1."""
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    infl = influences(G, torch.tensor([1.0, -1.0], dtype=torch.float64), "identity")
    assert infl.tolist() == [-1.0, 2.0]
    assert layer_score(infl, "positive") == 2.0 and layer_score(infl, "signed") == 1.0
    assert zero_score_warning({"0": 0.0, "1": 0.0, "2": 3.0}, "positive").startswith(
        "LayerIF: 2 of 3 groups have no positive influence"
    )
    assert zero_score_warning({"0": 0.0, "1": 1.0, "2": 3.0}, "positive") is None  # 1 of 3
    assert zero_score_warning({"0": 0.0, "1": 0.0, "2": 3.0}, "signed") is None


def _explicit_grads(model, adapter, ids):
    """Brute force: every per-example gradient of every prunable linear weight, by autograd."""
    names, params = [], []
    for i in range(adapter.num_blocks):
        for n, m in adapter.linears(i).items():
            names.append(adapter.full_name(i, n))
            params.append(m.weight)
    out = []
    for j in range(ids.shape[0]):
        x = ids[j : j + 1]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        gs = torch.autograd.grad(loss, params)
        out.append({k: g.detach().double().flatten() for k, g in zip(names, gs)})
    return names, out


@pytest.mark.parametrize(
    "hessian, per_linear, score",
    [
        ("identity", False, "positive"),
        ("identity", True, "positive"),
        ("datainf", False, "positive"),
        ("datainf", True, "positive"),
        ("identity", False, "signed"),
        ("datainf", True, "signed"),
    ],
)
def test_streaming_scores_equal_explicit_per_example_gradients(hessian, per_linear, score):
    model = make_llama(num_layers=2)
    ad = ModelAdapter.from_model(model)
    ids = calib(6, 12)
    train, val = ids[:4], ids[4:]
    names, tr = _explicit_grads(model, ad, train)
    _, va = _explicit_grads(model, ad, val)
    groups = {}
    for k in names:
        groups.setdefault(
            k if per_linear else k.split(".mlp")[0].split(".self_attn")[0], []
        ).append(k)
    expected = {}
    for members in groups.values():
        G = torch.stack([torch.cat([e[k] for k in members]) for e in tr])
        v = torch.stack([torch.cat([e[k] for k in members]) for e in va]).mean(0)
        s = layer_score(influences(G, v, hessian), score)
        expected.update({k: s for k in members})
    got, details = layerif_scores(
        model, ad, train, val, torch.device("cpu"), hessian, 0.1, per_linear, score=score
    )
    assert set(got) == set(names)
    for k in names:
        assert got[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-9), k
    assert any(v != 0 for v in got.values())
    assert details["score_kind"] == score
    # the model is left as it was: no parameter requires grad beyond the original flags, no grads
    assert all(p.grad is None for p in model.parameters())
    assert details["train_sequences"] == 4 and details["validation_sequences"] == 2


def test_mapping_exact_mean_bounds_and_order():
    numels = {f"b{i}.l{j}": (100 if j else 10) * (i + 1) for i in range(4) for j in range(2)}
    block_of = {k: int(k[1]) for k in numels}
    scores = {k: float(block_of[k]) ** 2 for k in numels}
    for s, eps in [(0.5, 0.3), (0.8, 0.3), (0.95, 0.5)]:
        a = layerif_allocation(scores, eps, "block_wise", s, numels, block_of)
        mean = sum(a.per_linear[k] * numels[k] for k in numels) / sum(numels.values())
        assert mean == pytest.approx(s, abs=1e-12)
        assert all(0.0 <= v <= 0.99 for v in a.per_linear.values())
        pb = a.per_block()
        assert pb == sorted(pb)  # larger cumulative positive influence -> pruned more
        assert a.method == "layerif"


def _cfg(**kw):
    base = dict(
        scorer="wanda",
        sparsity=0.6,
        allocation="layerif",
        nsamples=6,
        seqlen=12,
        layerif_holdout=2,
    )
    base.update(kw)
    return PruneConfig.from_flat(base)


def test_determinism_and_replay(tmp_path):
    ids = calib(6, 12)
    res = prune(make("llama"), None, _cfg(), calibration=ids, progress=False)
    again = prune(make("llama"), None, _cfg(), calibration=ids, progress=False)
    assert res.allocation.method == "layerif"
    assert res.allocation.per_linear == again.allocation.per_linear
    assert len(set(res.allocation.per_block())) > 1
    assert res.allocation.achieved == pytest.approx(0.6, abs=1e-9)
    for n in res.layers:
        assert torch.equal(res.mask(n), again.mask(n))
    path = tmp_path / "allocation.json"
    res.allocation.save(path)
    rep = prune(
        make("llama"), None, _cfg(allocation=f"file:{path}"), calibration=ids, progress=False
    )
    assert rep.allocation.per_linear == res.allocation.per_linear
    for n in res.layers:
        assert torch.equal(rep.mask(n), res.mask(n))


def test_the_zero_score_warning_reaches_the_report_notes(monkeypatch):
    """Scores that are 0 in most blocks (as on in-distribution calibration data): the allocation
    carries the warning and the prune's notes repeat it; the signed score does not warn."""
    import trimprune.engine.influence as influence

    def zeros_but_last(model, adapter, train, val, device, *args, score="positive", **kw):
        last = adapter.num_blocks - 1
        s = {
            adapter.full_name(i, n): float(i == last)
            for i in range(adapter.num_blocks)
            for n in adapter.linears(i)
        }
        return s, {
            "scores": {str(i): float(i == last) for i in range(adapter.num_blocks)},
            "score_kind": score,
        }

    monkeypatch.setattr(influence, "layerif_scores", zeros_but_last)
    ids = calib(6, 12)
    res = prune(make_llama(num_layers=3), None, _cfg(), calibration=ids, progress=False)
    warning = res.allocation.details["warning"]
    assert warning.startswith("LayerIF: 2 of 3 groups have no positive influence")
    assert warning in res.notes
    signed = prune(
        make_llama(num_layers=3),
        None,
        _cfg(layerif_score="signed"),
        calibration=ids,
        progress=False,
    )
    assert "warning" not in signed.allocation.details
    assert not any(n.startswith("LayerIF") for n in signed.notes)
    assert signed.allocation.details["score"].startswith("total signed influence")


def test_bad_input_refused():
    with pytest.raises(ConfigError, match="layerif_holdout"):
        _cfg(layerif_holdout=6)
    with pytest.raises(ConfigError, match="layerif_damping"):
        _cfg(layerif_damping=0.0)
    with pytest.raises(ConfigError, match="offload"):
        _cfg(offload="cpu")
    with pytest.raises(ConfigError, match="offload"):
        _cfg(allocation="search", search_space="rules,layerif", offload="cpu")
    with pytest.raises(ConfigError, match="layerif_hessian"):
        _cfg(layerif_hessian="exact")
    with pytest.raises(ConfigError, match="layerif_score"):
        _cfg(layerif_score="mean")


def test_cli_records_the_method_and_replays_to_identical_masks(
    tiny_dir, tmp_path, capsys, with_data_env
):
    from trimprune import load_masks
    from trimprune.cli import main

    common = ["prune", "--model", str(tiny_dir), "--calib", "c4", "--nsamples", "8"]
    common += ["--seqlen", "32", "--sparsity", "0.7", "--quiet", "--no-save-model"]
    out, rep = tmp_path / "l", tmp_path / "r"
    flags = ["--allocation", "layerif", "--layerif-hessian", "identity", "--layerif-per-linear"]
    assert main([*common, *flags, "--output", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert r["allocation"]["method"] == "layerif"
    d = r["allocation"]["details"]
    assert d["hessian"] == "identity" and d["per_linear"] is True
    assert d["train_sequences"] == 7 and d["validation_sequences"] == 1
    alloc = out / "allocation.json"
    assert main([*common, "--allocation", f"file:{alloc}", "--output", str(rep)]) == 0
    a, b = load_masks(out / "masks.safetensors"), load_masks(rep / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_model_is_scored_in_float32_and_restored_bit_for_bit():
    model = make("llama", dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    ad = ModelAdapter.from_model(model)
    ids = calib(4, 12)
    got, _ = layerif_scores(model, ad, ids[:3], ids[3:], torch.device("cpu"), "identity")
    ref = make("llama", dtype=torch.bfloat16).float()
    want, _ = layerif_scores(
        ref, ModelAdapter.from_model(ref), ids[:3], ids[3:], torch.device("cpu"), "identity"
    )
    assert got == want  # the same float32 arithmetic as the model cast to float32 beforehand
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
