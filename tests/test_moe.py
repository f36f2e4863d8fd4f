"""Mixture-of-experts: experts pruned as matrices, statistics from the routed tokens.

The references are brute force: the dense model's own (eager) experts forward is hooked to get
each MoE block's input and routing, each expert's inputs are gathered by hand (only its routed
tokens; the down projection's are act(gate) * up of them), and Wanda's and SparseGPT's masks and
weights are recomputed from those rows alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_scorers import _reference_fasterprune
from tiny_models import MOE_FAMILIES, calib, make_moe
from trimprune import PruneConfig, prune
from trimprune.algo.masks import row_mask
from trimprune.core.model import ModelAdapter
from trimprune.core.moe import ExpertLinear, expert_set, is_fused_experts, routed_experts
from trimprune.errors import ConfigError

N, L = 8, 24


def _cfg(**kw):
    flat = dict(nsamples=N, seqlen=L, moe_min_tokens=0)
    flat.update(kw)
    return PruneConfig.from_flat(flat)


def _experts_calls(model, ids):
    """(experts module -> [(hidden_states, top_k_index, top_k_weights)]) from the dense model's
    own experts forward (transformers' default implementation), one entry per batch."""
    calls: dict = {}
    hooks = []
    for m in model.modules():
        if is_fused_experts(m) and hasattr(m, "is_transposed"):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, args, out: calls.setdefault(mod, []).append(
                        tuple(a.detach().clone() for a in args[:3])
                    )
                )
            )
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return calls


def _dense_expert_inputs(model, ids, block: int):
    """Per expert e of `block`'s experts: (X_e routed tokens, act(gate)*up of them) with the
    dense weights, from the hooked eager forward (one batch: all sequences)."""
    adapter = ModelAdapter.from_model(model)
    experts = next(m for m in adapter.blocks[block].modules() if is_fused_experts(m))
    hidden, idx, _ = _experts_calls(model, ids)[experts][0]
    s = expert_set(experts)
    out = []
    for e in range(s.num_experts):
        tokens = torch.where(idx == e)[0]
        x = hidden[tokens]
        p = s.linears[e]
        g = F.linear(x, p["gate_proj"].weight, p["gate_proj"].bias)
        u = F.linear(x, p["up_proj"].weight, p["up_proj"].bias)
        h = experts._apply_gate(
            torch.cat([g, u], -1) if s.concatenated else torch.stack([g, u], -1).flatten(-2)
        )
        out.append((x, h))
    return experts, out


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_every_expert_matrix_is_pruned_to_the_target(family):
    model = make_moe(family)
    adapter = ModelAdapter.from_model(model)
    res = prune(model, None, _cfg(sparsity=0.5), calib(N, L), progress=False)
    experts = [n for n, m in adapter.all_linears().items() if isinstance(m, ExpertLinear)]
    assert experts, "the family's experts are prunable matrices"
    for name, m in adapter.all_linears().items():
        w = m.weight
        assert int((w == 0).sum()) == res.layers[name].zeros
        assert res.layers[name].zeros == w.shape[0] * round(0.5 * w.shape[1])  # Wanda: per row
    # the fused parameters hold the pruned experts: state-dict tensors are 50 % zero
    for m in model.modules():
        if is_fused_experts(m):
            for p in ("gate_up_proj", "up_proj", "down_proj"):
                t = getattr(m, p, None)
                if t is not None:
                    assert int((t == 0).sum()) == t.numel() // 2


def test_routers_and_shared_expert_gates_are_never_pruned():
    model = make_moe("qwen2_moe")
    before = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if ".gate." in n or n.endswith("shared_expert_gate.weight") or ".gate.weight" in n
    }
    assert any("shared_expert_gate" in n for n in before)
    names = set(ModelAdapter.from_model(model).all_linears())
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in names)
    assert any(n.endswith("shared_expert.down_proj") for n in names)  # pruned like a dense MLP
    prune(model, None, _cfg(sparsity=0.6), calib(N, L), progress=False)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    llama4 = make_moe("llama4")
    assert not any("router" in n for n in ModelAdapter.from_model(llama4).all_linears())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_routed_forward_equals_the_models_own(family):
    model = make_moe(family, dtype=torch.float64)
    ids = calib(4, L)
    seen = []
    with torch.no_grad():
        ref = model(ids).logits
        with routed_experts(model) as sets:
            unobserved = model(ids).logits  # nothing collects statistics: the model's own forward
            hooks = [
                p.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
                for s in sets
                for p in s.linears[0].values()
            ]
            out = model(ids).logits  # observed: expert by expert, through the ExpertLinears
            for h in hooks:
                h.remove()
        again = model(ids).logits  # the model's implementation is back
    assert seen and sum(seen) < 3 * len(sets) * ids.numel()  # routed rows only
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(unobserved, ref)
    assert torch.equal(again, ref)


def test_llama4_routed_forward_equals_the_fused_one():
    model = make_moe("llama4", dtype=torch.float64)
    ids = calib(4, L)
    seen = []
    with torch.no_grad():
        ref = model(ids).logits
        with routed_experts(model) as sets:
            unobserved = model(ids).logits
            hooks = [
                p.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
                for s in sets
                for p in s.linears[0].values()
            ]
            out = model(ids).logits
            for h in hooks:
                h.remove()
    assert seen
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(unobserved, ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_wanda_equals_bruteforce_on_routed_tokens(family):
    model = make_moe(family, dtype=torch.float64)
    ids = calib(N, L)
    experts, inputs = _dense_expert_inputs(model, ids, 0)
    s = expert_set(experts)
    dense = {
        (e, k): p.weight.clone() for e, projs in enumerate(s.linears) for k, p in projs.items()
    }
    res = prune(model, None, _cfg(sparsity=0.5, batch_size=N), ids, progress=False)
    prefix = next(n for n in res.layers if ".experts.0." in n).rsplit(".0.", 1)[0]
    for e, (x, h) in enumerate(inputs):
        assert x.shape[0] > 0
        for kind, xin in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
            W = dense[(e, kind)]
            score = W.abs() * xin.norm(dim=0)
            ref = row_mask(score, 0.5)
            assert torch.equal(res.mask(f"{prefix}.{e}.{kind}"), ref), (e, kind)


def test_expert_sparsegpt_equals_reference_on_routed_tokens():
    model = make_moe("qwen3_moe", dtype=torch.float64)
    ids = calib(N, L)
    experts, inputs = _dense_expert_inputs(model, ids, 0)
    s = expert_set(experts)
    dense = {
        (e, k): p.weight.clone() for e, projs in enumerate(s.linears) for k, p in projs.items()
    }
    prune(model, None, _cfg(sparsity=0.5, scorer="sparsegpt", batch_size=N), ids, progress=False)
    for e, (x, h) in enumerate(inputs):
        for kind, xin in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
            ref = _reference_fasterprune(dense[(e, kind)], xin.T @ xin, 0.5)
            torch.testing.assert_close(s.linears[e][kind].weight, ref, rtol=1e-7, atol=1e-9)


def test_an_expert_with_too_few_routed_tokens_takes_every_tokens_statistics():
    model = make_moe("qwen3_moe", dtype=torch.float64)
    ids = calib(N, L)
    calls = _experts_calls(model, ids)
    experts = next(
        m for m in ModelAdapter.from_model(model).blocks[0].modules() if is_fused_experts(m)
    )
    hidden, idx, _ = calls[experts][0]
    counts = torch.bincount(idx.flatten(), minlength=4)
    low = int(counts.argmin())
    threshold = int(counts[low]) + 1  # exactly one expert below it (counts differ)
    assert int((counts < threshold).sum()) == 1
    s = expert_set(experts)
    W = s.linears[low]["gate_proj"].weight.clone()
    res = prune(
        model, None, _cfg(sparsity=0.5, moe_min_tokens=threshold, batch_size=N), ids, progress=False
    )
    name = next(n for n in res.layers if f".experts.{low}.gate_proj" in n and ".0." in n)
    assert res.moe_fallback[name] == int(counts[low])
    ref = row_mask(W.abs() * hidden.norm(dim=0), 0.5)  # every token
    assert torch.equal(res.mask(name), ref)
    assert not any(f".experts.{int(counts.argmax())}." in n for n in res.moe_fallback)


def test_moe_calibration_all_uses_every_token_for_every_expert():
    model = make_moe("mixtral", dtype=torch.float64)
    ids = calib(N, L)
    experts = next(
        m for m in ModelAdapter.from_model(model).blocks[0].modules() if is_fused_experts(m)
    )
    hidden = _experts_calls(model, ids)[experts][0][0]
    s = expert_set(experts)
    dense = [s.linears[e]["up_proj"].weight.clone() for e in range(s.num_experts)]
    res = prune(
        model, None, _cfg(sparsity=0.5, moe_calibration="all", batch_size=N), ids, progress=False
    )
    assert res.moe_fallback == {}
    for e, W in enumerate(dense):
        name = next(
            n
            for n in res.layers
            if f".0.block_sparse_moe.experts.{e}.up_proj" in n or f".0.mlp.experts.{e}.up_proj" in n
        )
        ref = row_mask(W.abs() * hidden.norm(dim=0), 0.5)
        assert torch.equal(res.mask(name), ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4", "deepseek_v3"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(scorer="sparsegpt"),
        dict(trim=True),
        dict(trim=True, trim_inputs="last-token"),
        dict(trim=True, trim_inputs="sample:64"),
        dict(allocation="owl"),
        dict(allocation="alphapruning"),
        dict(allocation="atp"),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_scorers_trim_and_allocations_run_on_experts(family, kw):
    model = make_moe(family)
    res = prune(model, None, _cfg(sparsity=0.6, **kw), calib(N, L), progress=False)
    ex = [r for n, r in res.layers.items() if ".experts." in n]
    assert ex and all(r.zeros > 0 for r in ex)
    total = sum(r.numel for r in res.layers.values())
    assert abs(res.global_sparsity - 0.6) < 0.02 or kw.get("allocation") in ("owl",)
    assert total == sum(
        m.weight.numel() for m in ModelAdapter.from_model(model).all_linears().values()
    )


def test_nm_on_experts():
    model = make_moe("qwen3_moe")
    res = prune(model, None, _cfg(mask_structure="2:4"), calib(N, L), progress=False)
    for n in res.layers:
        m = res.mask(n)
        assert torch.equal(
            m.view(m.shape[0], -1, 4).sum(-1), torch.full((m.shape[0], m.shape[1] // 4), 2)
        )


def test_moe_min_tokens_is_validated():
    with pytest.raises(ConfigError, match="moe_min_tokens"):
        _cfg(moe_min_tokens=-1)
    with pytest.raises(ConfigError):
        _cfg(moe_calibration="some")


class _LinearExpert(torch.nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _LinearMoe(torch.nn.Module):
    """A MoE block whose experts are `nn.Linear` modules (older checkpoints, remote code): the
    block itself sends each expert its routed tokens."""

    def __init__(self, hidden: int, inter: int, experts: int, top_k: int):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(_LinearExpert(hidden, inter) for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(flat).softmax(-1).topk(self.top_k, -1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tokens, k = torch.where(idx == e)
            out.index_add_(0, tokens, expert(flat[tokens]) * w[tokens, k, None])
        return out.reshape(x.shape)


def test_experts_as_linear_modules_are_pruned_from_their_routed_tokens():
    from tiny_models import make_llama

    model = make_llama(2, dtype=torch.float64)
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = _LinearMoe(model.config.hidden_size, 16, 4, 2).to(torch.float64)
    ids = calib(N, L)
    moe = model.model.layers[0].mlp
    seen: dict = {}
    hooks = [
        lin.register_forward_hook(
            lambda mod, args, out: seen.setdefault(mod, []).append(args[0].detach().clone())
        )
        for lin in moe.modules()
        if isinstance(lin, torch.nn.Linear) and lin is not moe.gate
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    dense = {m: m.weight.detach().clone() for m in seen}
    names = set(ModelAdapter.from_model(model).all_linears())
    assert not any(n.endswith("mlp.gate") for n in names)  # the router is never pruned
    router = moe.gate.weight.detach().clone()
    res = prune(model, None, _cfg(sparsity=0.5, batch_size=N), ids, progress=False)
    assert torch.equal(moe.gate.weight, router)
    for name, module in moe.named_modules():
        if module not in seen:
            continue
        x = torch.cat(seen[module])  # the expert's routed tokens only
        assert x.shape[0] < N * L
        ref = row_mask(dense[module].abs() * x.norm(dim=0), 0.5)
        assert torch.equal(res.mask(f"model.layers.0.mlp.{name}"), ref), name


@pytest.mark.parametrize("trim_inputs", ["all", "last-token"])
def test_experts_searched_together_equal_experts_searched_alone(monkeypatch, trim_inputs):
    """Experts see different token counts; batching their TRIM searches changes nothing."""
    import trimprune.algo.block as block

    def run():
        model = make_moe("qwen3_moe")
        cfg = _cfg(sparsity=0.6, trim=True, trim_inputs=trim_inputs)
        return prune(model, None, cfg, calib(N, L), progress=False)

    together = run()
    monkeypatch.setattr(block, "_search_class", lambda plan, m, tokens: (m.name,))
    alone = run()
    searched = [n for n, r in together.layers.items() if r.trim is not None]
    assert any(".experts." in n for n in searched)
    for n in together.layers:
        assert torch.equal(together.mask(n), alone.mask(n)), n


def test_searches_collected_in_waves_equal_searches_in_flight_together(monkeypatch):
    import trimprune.algo.block as block

    def run():
        model = make_moe("deepseek_v3")
        cfg = _cfg(sparsity=0.6, trim=True, trim_block_safeguard=True)
        return prune(model, None, cfg, calib(N, L), progress=False)

    together = run()
    monkeypatch.setattr(block, "WAVE_ELEMENTS", 1)  # one batch per wave
    waves = run()
    assert sum(r.trim is not None for r in together.layers.values()) > 4
    for n, r in together.layers.items():
        assert torch.equal(together.mask(n), waves.mask(n)), n
        assert r.trim == waves.layers[n].trim, n
