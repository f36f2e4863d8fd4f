"""The held-out objective of `--allocation search` and `--trim-guard model` (`search.Holdout`):
logits made a slice at a time from the hidden states entering the head, equal to the whole-logits
computation, and the dense logits recomputed exactly from the kept dense hidden states."""

import math

import pytest
import torch

import trimprune.search as search
from tiny_models import FAMILIES, calib, make, make_multimodal
from trimprune.io.evaluate import head_input, head_is_exact, head_logits

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_logits_of_the_head_input_are_the_models_logits_bit_for_bit(family):
    """gemma2 soft-caps its logits (cap * tanh(logits / cap)); every family's logits come back
    exactly from the hidden states entering its head."""
    model = make(family)
    ids = calib(2, 12)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = head_logits(model, head_input(model, ids))
    assert torch.equal(got, want)
    assert head_is_exact(model, ids[:1], CPU)
    if family == "gemma2":
        assert model.config.final_logit_softcapping  # the cap is exercised


def test_a_head_it_cannot_reproduce_is_detected_and_whole_logits_are_kept(monkeypatch):
    """A family scaling its logits after the head (as Granite's logits_scaling does): `head_logits`
    misses the scale, `head_is_exact` says so, and the objective keeps whole logits, with the
    same values as the model's forward gives."""
    model = make("llama")
    real = model.forward

    def scaled(*a, **k):
        out = real(*a, **k)
        out.logits = out.logits / 3.0
        return out

    monkeypatch.setattr(model, "forward", scaled)
    ids = calib(6, 16)
    assert not head_is_exact(model, ids[:1], CPU)
    h = search.Holdout(model, ids, "kl", CPU, batch_size=2)
    assert not h.chunked and len(h.dense_logp) == 3 and not h.dense_hidden
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    nll = -float(lp.gather(-1, ids[:, 1:, None]).sum(dtype=torch.float64)) / (6 * 15)
    assert h.dense["nll"] == pytest.approx(nll, rel=1e-6)


def _reference(model, ids, dense_logp=None):
    """NLL and KL(dense || model) per predicted token from whole float64 logits."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    out = {"nll": -float(lp.gather(-1, ids[:, 1:, None]).sum()) / ids[:, 1:].numel()}
    if dense_logp is not None:
        out["kl"] = float((dense_logp.exp() * (dense_logp - lp)).sum()) / ids[:, 1:].numel()
    return out, lp


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_sliced_objective_equals_whole_logits_and_is_zero_kl_while_dense(family, monkeypatch):
    """Slices of 5 positions (HEAD_CHUNK_BYTES shrunk): NLL and KL equal the whole-logits float64
    reference within 1e-4 (float32 against float64, on any CPU); the dense model against itself
    has a KL of exactly 0; the head never sees more than 5 positions at once."""
    model = make(family)
    ids = calib(6, 23)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(search, "HEAD_CHUNK_BYTES", 4 * vocab * 2 * 5)  # batches of 2
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(  # logits made, not stopped ones
        lambda m, a, out: widths.append(out.shape[1])
    )
    h = search.Holdout(model, ids, "kl", CPU, batch_size=2)
    assert h.chunked and len(h.dense_hidden) == 3 and not h.dense_logp
    dense_ref, dense_lp = _reference(model, ids)
    assert h.dense["nll"] == pytest.approx(dense_ref["nll"], rel=1e-4)
    again = h.measure()
    assert again["kl"] == 0.0 and again["nll"] == h.dense["nll"]
    with torch.no_grad():  # a pruned model: half of every MLP weight zeroed
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight[:, ::2] = 0
    widths.clear()
    got = h.measure()
    # the model's and the dense logits, 5 positions at a time: the forward stops at the head
    assert max(widths) == 5 and sum(widths) == 2 * 3 * 22, widths
    hook.remove()
    ref, _ = _reference(model, ids, dense_lp)
    # KL is a mean of small differences of float32 log-probabilities (~2e-4 here): its relative
    # error is ~1e-4 on a GPU's reduction order, so it gets 1e-3; the NLL keeps 1e-4
    assert got["kl"] > 0 and math.isclose(got["kl"], ref["kl"], rel_tol=1e-3), (got, ref)
    assert math.isclose(got["nll"], ref["nll"], rel_tol=1e-4), (got, ref)


def test_multimodal_language_model_head_is_exact():
    """A ...ForConditionalGeneration checkpoint (Gemma-3): its text logits from the head's input."""
    model = make_multimodal("gemma3")
    ids = calib(1, 10)
    assert head_is_exact(model, ids, CPU)
