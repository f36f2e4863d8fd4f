"""NaN / Inf never passes: weights, activations, statistics and evaluation results stop with a one-line
error naming the tensor, before anything is written; dead inputs are handled by every scorer."""

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tiny_models import calib, make
from trimprune import PruneConfig, prune
from trimprune.algo.scorers import Member, SparseGPT, Target
from trimprune.algo.stats import InputStats, StatsNeeds
from trimprune.calib.data import sample_from_model
from trimprune.cli import main
from trimprune.core.finite import check_finite, extrema, nonfinite
from trimprune.core.model import ModelAdapter, weight_2d
from trimprune.errors import NonFiniteError, TrimpruneError
from trimprune.io.evaluate import evaluate_sets


def _prune(model, **flat):
    cfg = dict(scorer="wanda", sparsity=0.5, nsamples=8, seqlen=24) | flat
    return prune(model, None, PruneConfig.from_flat(cfg), calibration=calib(8, 24), progress=False)


def _poisoned(value, family="llama"):
    model = make(family)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = value
    return model


def test_check_finite_names_each_tensor_with_nan_or_inf():
    t = {
        "a": torch.ones(3),
        "b": torch.tensor([1.0, math.nan]),
        "c": torch.tensor([-math.inf, 0.0]),
        "d": torch.tensor([math.inf, math.nan], dtype=torch.bfloat16),
        "e": torch.empty(0),
        "f": torch.full((2,), 6e4, dtype=torch.float16),
    }
    assert nonfinite({k: extrema(v) for k, v in t.items()}) == {"b": "NaN", "c": "Inf", "d": "NaN"}
    check_finite({"a": t["a"], "e": t["e"], "f": t["f"]}, "never raised")
    with pytest.raises(NonFiniteError, match=r"^weights of x: b holds NaN, c holds Inf: do this$"):
        check_finite({"a": t["a"], "b": t["b"], "c": t["c"]}, "weights of x", "do this")


@pytest.mark.parametrize("scorer", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("value,kind", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
def test_non_finite_weight_names_the_linear_before_any_block_is_pruned(scorer, value, kind):
    model = _poisoned(value)
    with pytest.raises(TrimpruneError) as e:
        _prune(model, scorer=scorer)
    msg = str(e.value)
    assert isinstance(e.value, NonFiniteError) and "\n" not in msg
    assert (
        "model.layers.1.mlp.up_proj.weight holds " + kind in msg
        and "block 1 (model.layers.1)" in msg
    )
    assert "checkpoint" in msg and msg.startswith("before pruning, non-finite weights in block 1")
    ad = ModelAdapter.from_model(model)  # the weights check ran first: no block was touched
    assert not any(
        bool((weight_2d(m) == 0).any()) for i in range(2) for m in ad.linears(i).values()
    )


@pytest.mark.parametrize("scorer", ["magnitude", "sparsegpt"])
def test_the_walk_checks_each_block_as_it_is_loaded(scorer, monkeypatch):
    """Without the weights check (as for blocks restored from a checkpoint), the walk's own check
    stops at block 1: block 0 is pruned, block 1 untouched."""
    import trimprune.session as api

    monkeypatch.setattr(api, "check_dense_weights", lambda *a, **k: None)
    model = _poisoned(math.nan)
    with pytest.raises(NonFiniteError) as e:
        _prune(model, scorer=scorer)
    msg = str(e.value)
    assert (
        "model.layers.1.mlp.up_proj.weight holds NaN" in msg and "block 1 (model.layers.1)" in msg
    )
    assert not msg.startswith("before pruning")
    ad = ModelAdapter.from_model(model)
    assert all(float((weight_2d(m) == 0).float().mean()) == 0.5 for m in ad.linears(0).values())
    assert not any(bool((weight_2d(m) == 0).any()) for m in ad.linears(1).values())


@pytest.mark.parametrize(
    "flat",
    [
        dict(allocation="owl"),
        dict(allocation="alphapruning"),
        dict(scorer="sparsegpt", trim=True, trim_input_recalc=True),
    ],
)
def test_non_finite_weight_stops_allocations_and_input_recalculation(flat, tmp_path):
    if flat.get("allocation") == "alphapruning":
        flat = flat | {"alpha_cache_dir": str(tmp_path)}
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj"):
        _prune(_poisoned(math.nan), **flat)


def test_non_finite_norm_weight_is_named():
    model = make("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = math.inf
    with pytest.raises(
        NonFiniteError, match=r"model\.layers\.1\.post_attention_layernorm\.weight holds Inf"
    ):
        _prune(model)


def test_nan_embeddings_stop_at_the_inputs_of_block_0():
    model = make("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] = math.nan
    with pytest.raises(
        NonFiniteError,
        match=r"inputs of block 0 \(model\.layers\.0.*model\.embed_tokens\.weight holds "
        r"NaN",
    ):
        _prune(model)


@pytest.mark.parametrize("block", [0, 1])
def test_block_outputs_overflowing_in_float16_name_the_block(block):
    """Biases of 60000 on both residual branches: every input of the block's linears is finite, its
    output (about 120000) is not, in float16."""
    model = make("gpt2", dtype=torch.float16)
    h = model.transformer.h[block]
    with torch.no_grad():
        h.attn.c_proj.bias.fill_(6e4)
        h.mlp.c_proj.bias.fill_(6e4)
    with pytest.raises(
        NonFiniteError,
        match=rf"outputs of block {block} \(transformer\.h\.{block}\) hold Inf .*"
        r"--dtype bfloat16",
    ):
        _prune(model)


@pytest.mark.parametrize(
    "dtype,fix", [(torch.float16, "--dtype bfloat16"), (torch.float32, "check the checkpoint")]
)
def test_activations_overflowing_inside_a_block_stop_at_its_statistics(dtype, fix, monkeypatch):
    """The block's first, dense pass stops first, on its outputs (naming the block and the fix),
    before any weight changes; without that check, the statistics check of the same pass names the
    linears that read the overflow."""

    def overflowing():
        model = make("llama", dtype=dtype)
        with torch.no_grad():
            for p in model.model.layers[0].mlp.parameters():
                p.mul_(1e4 if dtype == torch.float16 else 1e15)
        return model

    model = overflowing()
    with pytest.raises(NonFiniteError) as e:
        _prune(model, scorer="sparsegpt")
    msg = str(e.value)
    assert msg.startswith("before pruning, the dense outputs of block 0 (model.layers.0)"), msg
    assert fix in msg, msg
    ad = ModelAdapter.from_model(model)
    assert not any(bool((weight_2d(m) == 0).any()) for m in ad.linears(0).values())
    import trimprune.engine.walk as walk

    monkeypatch.setattr(walk, "check_dense_outputs", lambda *a, **k: None)
    with pytest.raises(NonFiniteError) as e:
        _prune(overflowing(), scorer="sparsegpt")
    msg = str(e.value)
    assert (
        "model.layers.0.mlp.down_proj" in msg and "block 0 (model.layers.0)" in msg and fix in msg
    ), msg


def test_sparsegpt_non_finite_gram_is_an_error_and_a_non_finite_reconstruction_falls_back_per_linear(
    caplog,
):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 32, generator=g)
    st = InputStats(32, X.device, StatsNeeds(sqnorm=True, gram=True))
    st.add(X)
    a = torch.randn(16, 32, generator=g)
    b = torch.randn(8, 32, generator=g).clamp(-3, 3) * 1e38  # finite, but its OBS update overflows
    sg = SparseGPT(blocksize=8)
    out = sg.prune_group([Member("a", a, Target(0.5)), Member("b", b, Target(0.5))], st)
    alone = sg.prune_group([Member("a", a, Target(0.5))], st)[0]
    assert torch.equal(out[0].weight, alone.weight) and out[0].info.fallback is None
    assert out[1].info.fallback and torch.equal(out[1].weight, b.masked_fill(out[1].mask, 0.0))
    assert int(out[1].mask.sum()) == 128 and "reconstruction of b is not finite" in caplog.text
    bad = InputStats(32, X.device, StatsNeeds(sqnorm=True, gram=True))
    bad.add(X)
    bad.gram[3, 4] = math.inf
    with pytest.raises(NonFiniteError, match="Gram matrix"):
        SparseGPT().prune_group([Member("a", a, Target(0.5))], bad)


# ----------------------------------------------------------------------------- dead inputs
@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("scorer", ["magnitude", "wanda", "sparsegpt"])
def test_dead_inputs_are_pruned_exactly_without_error(scorer, trim):
    """Block 1: the MLP's inputs are all zero (its norm weight is 0: gate/up/down have all-zero Gram
    matrices) and q/k/v's first 8 input features are zero."""
    model = make("llama")
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.post_attention_layernorm.weight.zero_()
        layer.input_layernorm.weight[:8] = 0
    res = _prune(model, scorer=scorer, trim=trim)
    ad = ModelAdapter.from_model(model)
    for name, mod in ad.linears(1).items():
        w, r = weight_2d(mod), res.layers[f"model.layers.1.{name}"]
        assert bool(torch.isfinite(w).all()), name
        assert r.zeros == r.numel // 2, (name, r.zeros)  # exact, every shape is even
        assert bool((w[res.mask(f"model.layers.1.{name}")] == 0).all()), name
        if scorer == "sparsegpt":  # dead columns zeroed
            dead = (
                64
                if name == "mlp.down_proj"
                else 32
                if name.startswith("mlp.")
                else 8
                if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
                else 0
            )
            assert r.scorer_info.dead_columns == dead and r.scorer_info.fallback is None, name
            if dead:
                assert bool((w[:, :dead] == 0).all()), name
    assert res.notes == []


# ----------------------------------------------------------------------------- evaluation and sampling
def test_evaluation_never_returns_a_nan_perplexity():
    model = make("llama")
    sets = {"wikitext2": {"windows": calib(2, 16)}}
    assert math.isfinite(evaluate_sets(model, sets)["wikitext2"]["perplexity"])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(
        NonFiniteError,
        match=r"wikitext2 perplexity of the dense model is not a number.*"
        r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN",
    ):
        evaluate_sets(model, sets, label="the dense model")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN"):
        evaluate_sets(model, sets, offload=True)
    with pytest.raises(
        NonFiniteError, match=r"sampling from the model.*model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        sample_from_model(model, None, 2, 8, seed=0)


def test_evaluation_blames_overflow_when_the_weights_are_finite():
    model = make("llama", dtype=torch.float16)
    with torch.no_grad():
        model.model.norm.weight.fill_(6e4)  # final hidden states overflow, weights finite
    with pytest.raises(
        NonFiniteError, match=r"its weights are finite; the activations overflow in float16"
    ):
        evaluate_sets(model, {"c4": {"windows": calib(2, 16)}})


# ----------------------------------------------------------------------------- command line
@pytest.fixture
def nan_dir(tiny_dir, tmp_path):
    """The tiny hub-style Llama with one NaN in block 1's up_proj."""
    d = tmp_path / "nan-model"
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5, 6] = math.nan
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(d)
    return d


def _one_line_error(capsys) -> tuple[str, str]:
    """The one line on stderr, and stdout."""
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trimprune: error:"), err
    return err[0], cap.out


@pytest.mark.parametrize(
    "extra", [["--calib", "c4"], ["--calib", "self"], ["--calib", "c4", "--eval", "wikitext2"]]
)
def test_cli_prune_of_a_nan_checkpoint_exits_2_and_writes_nothing(
    extra, nan_dir, tmp_path, capsys, with_data_env
):
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    rc = main(
        [
            "prune",
            "--model",
            str(nan_dir),
            "--output",
            str(out),
            "--quiet",
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--eval-limit",
            "2",
        ]
        + extra
    )
    err, _ = _one_line_error(capsys)
    assert rc == 2 and "model.layers.1.mlp.up_proj.weight holds NaN" in err, err
    assert list(out.parent.iterdir()) == []  # no output folder, no .out.tmp-* left


def test_cli_eval_of_a_nan_checkpoint_exits_2_instead_of_printing_nan(
    nan_dir, capsys, with_data_env
):
    rc = main(
        [
            "eval",
            "--model",
            str(nan_dir),
            "--eval",
            "wikitext2",
            "--eval-limit",
            "2",
            "--seqlen",
            "32",
            "--quiet",
        ]
    )
    err, out = _one_line_error(capsys)
    assert (
        rc == 2 and "wikitext2" in err and "model.layers.1.mlp.up_proj.weight holds NaN" in err
    ), err
    assert "perplexity" not in out
