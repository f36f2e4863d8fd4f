"""Coverage: the share of the blocks' weights that was pruned, per kind, never silent.

Expected parameter counts are computed by hand from the tiny models' configs (shapes of every
projection), independently of `core.coverage`; weights trimprune cannot prune stop the run (exit 2)
above 1 % of a block's parameters, and --allow-unpruned prunes the rest and lists them.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tiny_models import MOE_FAMILIES, calib, make, make_moe
from trimprune import PruneConfig, prune
from trimprune.core.coverage import Coverage, summary_of
from trimprune.core.model import ModelAdapter
from trimprune.errors import TrimpruneError
from trimprune.io.render import render_html, render_markdown

N, L = 8, 24
H = 32  # hidden size of the tiny models

# per block, by hand: (attention, dense MLP, experts, routers) parameters of the weights
QWEN3_MOE = (H * H + 16 * H + 16 * H + H * H, 0, 4 * 2 * 16 * H + 4 * H * 16, 4 * H)
LLAMA = (H * H + 16 * H + 16 * H + H * H, 3 * 64 * H, 0, 0)
HAND = {
    "qwen3_moe": [QWEN3_MOE, QWEN3_MOE],
    "mixtral": [QWEN3_MOE, QWEN3_MOE],
    # shared expert of 24 in the dense MLP; its gate (1 x H) is a router
    "qwen2_moe": [(QWEN3_MOE[0], 3 * 24 * H, QWEN3_MOE[2], 4 * H + H)] * 2,
    # multi-head latent attention (q_a 24xH, q_b 64x24, kv_a 24xH, kv_b 64x16, o Hx32); block 0
    # dense (64), block 1 routed experts and one shared expert (16)
    "deepseek_v3": [
        (24 * H + 64 * 24 + 24 * H + 64 * 16 + H * H, 3 * 64 * H, 0, 0),
        (24 * H + 64 * 24 + 24 * H + 64 * 16 + H * H, 3 * 16 * H, QWEN3_MOE[2], 4 * H),
    ],
    "llama": [LLAMA, LLAMA],
    # Conv1D: c_attn H x 3H, c_proj H x H; c_fc H x 4H, c_proj 4H x H
    "gpt2": [(H * 3 * H + H * H, 2 * H * 4 * H, 0, 0)] * 2,
}


def _model(family: str):
    return make_moe(family) if family in MOE_FAMILIES else make(family)


def _cfg(**kw):
    flat = dict(nsamples=N, seqlen=L, moe_min_tokens=0, sparsity=0.5)
    flat.update(kw)
    return PruneConfig.from_flat(flat)


@pytest.mark.parametrize("family", list(HAND))
def test_counts_per_kind_are_the_projections_shapes(family):
    model = _model(family)
    cov = Coverage.of(ModelAdapter.from_model(model))
    want = [sum(b[k] for b in HAND[family]) for k in range(4)]
    got = cov.to_dict()["kinds"]
    assert [got[k]["total"] for k in ("attention", "dense_mlp", "experts")] == want[:3]
    assert [got[k]["pruned"] for k in ("attention", "dense_mlp", "experts")] == want[:3]
    assert got["other"] == {"total": 0, "pruned": 0, "fraction": 0.0}
    assert cov.total == cov.pruned == sum(want[:3]) and cov.fraction == 1.0
    assert cov.unprunable == () and cov.refused() == []
    excluded = {e.what: e for e in cov.excluded}
    if want[3]:
        assert excluded["routers"].params == want[3]
    else:
        assert "routers" not in excluded
    # every parameter of every block is a weight counted once, a router, or a norm / bias
    n_blocks = sum(p.numel() for b in ModelAdapter.from_model(model).blocks for p in b.parameters())
    assert cov.total + want[3] + excluded["norms and biases"].params - _outside_1d(model) == (
        n_blocks
    )
    assert sum(cov.block_params) == n_blocks
    vocab_embed = model.get_input_embeddings().weight.numel()
    assert excluded["embeddings"].params >= vocab_embed


def _outside_1d(model) -> int:
    """1-D parameters outside the blocks (the final norm)."""
    blocks = {id(p) for p in ModelAdapter.from_model(model).blocks.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in blocks and p.dim() < 2)


def test_tied_lm_head_is_named_once_and_counted_once():
    model = make("gpt2")  # lm_head shares the token embedding
    cov = Coverage.of(ModelAdapter.from_model(model))
    emb = next(e for e in cov.excluded if e.what == "embeddings")
    assert emb.tensors == 2 and emb.params == 96 * H + 128 * H  # wte and wpe
    assert "lm_head.weight (= transformer.wte.weight)" in emb.names
    assert not any(e.what == "lm_head" for e in cov.excluded)


def _with_extra(model, shape, block: int = 0):
    """A parameter trimprune cannot prune (a 3-D tensor on the block itself)."""
    blk = ModelAdapter.from_model(model).blocks[block]
    blk.register_parameter("extra", nn.Parameter(torch.randn(*shape) * 0.02))
    return model


def test_an_unprunable_weight_above_one_percent_is_refused_and_allowed_on_request():
    model = _with_extra(make_moe("qwen3_moe"), (4, 8, 8))
    block0 = sum(QWEN3_MOE) + 80 + 256  # weights + norms (q, k: 8; input, post: 32) + extra
    with pytest.raises(TrimpruneError) as e:
        prune(model, None, _cfg(), calib(N, L), progress=False)
    msg = e.value.cli_message()
    assert "\n" not in msg and "--allow-unpruned" in msg
    assert f"model.layers.0.extra (4x8x8, {100 * 256 / block0:.1f} % of block 0)" in msg
    assert "run.allow_unpruned" in str(e.value)
    assert msg.startswith("1 weight in 1 of 2 blocks that trimprune cannot prune (more than 1 %")
    # nothing was pruned
    assert all((m.weight != 0).all() for m in ModelAdapter.from_model(model).all_linears().values())

    res = prune(model, None, _cfg(allow_unpruned=True), calib(N, L), progress=False)
    cov = res.coverage
    assert [u.name for u in cov.unprunable] == ["model.layers.0.extra"]
    u = cov.unprunable[0]
    assert (u.kind, u.shape, u.numel, u.block) == ("other", (4, 8, 8), 256, 0)
    assert u.share == pytest.approx(256 / block0, abs=0)
    assert cov.kind("other").total == 256 and cov.kind("other").pruned == 0
    assert cov.fraction == pytest.approx(2 * sum(QWEN3_MOE[:3]) / (2 * sum(QWEN3_MOE[:3]) + 256))
    assert res.global_sparsity == pytest.approx(0.5, abs=1e-9)


def test_an_unprunable_weight_below_one_percent_passes_and_is_listed():
    model = _with_extra(make_moe("qwen3_moe"), (2, 2, 2), block=1)
    res = prune(model, None, _cfg(), calib(N, L), progress=False)
    (u,) = res.coverage.unprunable
    assert u.name == "model.layers.1.extra" and u.share < 0.01
    assert "1 weight left dense (8 parameters" in res.coverage.summary()


class OddExperts(nn.Module):
    """Fused experts without transformers' experts interface: trimprune cannot tell the layout."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = src.gate_up_proj, src.down_proj, src.act_fn

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in range(self.gate_up_proj.shape[0]):
            tok, k = torch.where(top_k_index == e)
            gate, up = (hidden[tok] @ self.gate_up_proj[e].t()).chunk(2, -1)
            y = (self.act_fn(gate) * up) @ self.down_proj[e].t()
            out.index_add_(0, tok, y * top_k_weights[tok, k, None])
        return out


def test_fused_experts_of_an_unknown_layout_are_refused_or_left_dense():
    model = make_moe("qwen3_moe")
    ids = calib(N, L)
    for blk in ModelAdapter.from_model(model).blocks:
        blk.mlp.experts = OddExperts(blk.mlp.experts)
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    with pytest.raises(TrimpruneError) as e:
        prune(model, None, _cfg(), ids, progress=False)
    msg = e.value.cli_message()
    assert "model.layers.0.mlp.experts.gate_up_proj (4x32x32" in msg
    assert "fused experts of an unknown layout" in msg and "--allow-unpruned" in msg
    assert "and 1 more" in msg and msg.startswith("4 weights in 2 of 2 blocks")

    res = prune(model, None, _cfg(allow_unpruned=True), ids, progress=False)
    assert not any("experts" in n for n in res.layers)
    for n, p in model.named_parameters():
        if n in experts:
            assert torch.equal(p, experts[n])  # left dense
    cov = res.coverage
    assert cov.kind("experts").total == 2 * QWEN3_MOE[2] and cov.kind("experts").pruned == 0
    assert cov.kind("attention").fraction == 1.0
    assert all(u.unknown_layout and u.kind == "experts" for u in cov.unprunable)
    assert len(cov.unprunable) == 4


# ------------------------------------------------------------------------------ command line
@pytest.fixture
def cli_base(tiny_dir, tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("TRIMPRUNE_DATA", str(data_dir))
    return [
        "prune",
        "--model",
        str(tiny_dir),
        "--calib",
        "self",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--quiet",
        "--no-save-model",
    ]


def _extra_on_load(monkeypatch, shape):
    import trimprune.io.models as models

    load = models.load_model

    def loaded_with_extra(*a, **kw):
        out = load(*a, **kw)
        _with_extra(out.model, shape)
        return out

    monkeypatch.setattr(models, "load_model", loaded_with_extra)


def test_cli_refuses_unprunable_weights_then_reports_them_with_allow_unpruned(
    cli_base, tmp_path, monkeypatch, capsys
):
    from trimprune.cli import main

    _extra_on_load(monkeypatch, (4, 8, 8))
    out = tmp_path / "out"
    assert main(cli_base + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.0.extra (4x8x8," in err[0]
    assert "--allow-unpruned" in err[0] and not out.exists()

    assert main(cli_base + ["--output", str(out), "--allow-unpruned"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rep = json.loads((out / "report.json").read_text())
    cov = rep["coverage"]
    # tiny_dir: Llama, 4 KV heads, hidden 32, MLP 64
    attn, mlp, block0 = 4 * H * H, 3 * 64 * H, 4 * H * H + 3 * 64 * H + 2 * H + 256
    assert cov["kinds"]["attention"] == {"total": 2 * attn, "pruned": 2 * attn, "fraction": 1.0}
    assert cov["kinds"]["dense_mlp"]["pruned"] == 2 * mlp
    assert cov["unprunable"] == [
        {
            "name": "model.layers.0.extra",
            "block": 0,
            "kind": "other",
            "shape": [4, 8, 8],
            "params": 256,
            "share_of_block": 256 / block0,
            "unknown_layout": False,
        }
    ]
    assert {e["what"] for e in cov["excluded_by_design"]} == {
        "embeddings",
        "lm_head",
        "norms and biases",
    }
    assert rep["moe_fallback"] == {}
    line = next(x for x in lines if x.startswith("sparsity:"))
    assert summary_of(cov) in line and "% of block weights (attention 100 %" in line
    assert "1 weight left dense (256 parameters" in line
    md = (out / "report.md").read_text()
    assert "## Coverage" in md and "`model.layers.0.extra` 4x8x8 (other)" in md
    page = render_html([("out", rep, {})])
    assert "<h3>Coverage</h3>" in page and "model.layers.0.extra" in page
    assert "### Coverage" in render_markdown([("out", rep, out)], tmp_path / "x.html")


def test_cli_final_line_of_a_dense_model_states_full_coverage(cli_base, tmp_path, capsys):
    from trimprune.cli import main

    assert main(cli_base + ["--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "pruned 100.0 % of block weights (attention 100 %, dense MLP 100 %)" in out
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["coverage"]["unprunable"] == [] and rep["coverage"]["fraction"] == 1.0


def test_a_resumed_run_reports_the_coverage_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from trimprune.io import resume as resume_mod

    class Interrupted(Exception):
        pass

    def stop_after_block_0(block):
        if block == 0:
            raise Interrupted

    def run(**kw):
        model = _with_extra(make("llama"), (4, 8, 8), block=1)
        cfg = _cfg(allow_unpruned=True, nsamples=4, **kw)
        return prune(model, None, cfg, calib(4, L), progress=False)

    ck = str(tmp_path / "ck")
    monkeypatch.setattr(resume_mod, "_after_commit", stop_after_block_0)
    with pytest.raises(Interrupted):
        run(checkpoint_dir=ck)
    monkeypatch.setattr(resume_mod, "_after_commit", lambda block: None)
    resumed, plain = run(checkpoint_dir=ck, resume=True), run()
    assert resumed.resumed_from_block == 0
    assert resumed.coverage == plain.coverage and resumed.coverage is not None
    assert [u.name for u in resumed.coverage.unprunable] == ["model.layers.1.extra"]


class _CustomMixer(nn.Module):
    """A layer trimprune does not know: a 3-D weight that is not a linear's (never called here:
    only its share of the block matters)."""

    def __init__(self, numel: int, hidden: int):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(numel // hidden, 1, hidden) * 0.02)

    def forward(self, x):
        return x


def test_a_custom_layer_holding_30_percent_of_each_block_refused_then_70_percent_pruned(
    cli_base, tmp_path, monkeypatch, capsys
):
    """The issue's case: exit 2 naming the layer; with --allow-unpruned the report says 70 %."""
    import trimprune.io.models as models
    from trimprune.cli import main

    load = models.load_model

    def loaded_with_mixer(*a, **kw):
        out = load(*a, **kw)
        adapter = ModelAdapter.from_model(out.model)
        for i, blk in enumerate(adapter.blocks):
            prunable = sum(m.weight.numel() for m in adapter.linears(i).values())
            blk.mixer = _CustomMixer(3 * prunable // 7, H)  # 30 % of the block's weights
        return out

    monkeypatch.setattr(models, "load_model", loaded_with_mixer)
    out = tmp_path / "out"
    assert main(cli_base + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.0.mixer.mix (137x1x32, 29.8 % of block 0)" in err[0]
    assert main(cli_base + ["--output", str(out), "--allow-unpruned"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["coverage"]["fraction"] == pytest.approx(0.70, abs=2e-3)
    assert {u["name"] for u in rep["coverage"]["unprunable"]} == {
        "model.layers.0.mixer.mix",
        "model.layers.1.mixer.mix",
    }
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("sparsity:"))
    assert "pruned 70.0 % of block weights" in line
