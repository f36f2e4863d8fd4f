"""The automatic calibration batch (session.auto_batch_size), with hand-computed expectations.

A sequence's forward working memory is estimated as seqlen * (10 * hidden + 4 * intermediate)
elements; on a GPU the batch is what fits in a quarter of the free memory, at most 64, and for a
dense model at most BATCH_BYTES (3 GiB) of working memory but never under 16384 tokens."""

import pytest
import torch

from tiny_models import make_llama, make_moe
from trimprune import PruneConfig, session
from trimprune.core.model import ModelAdapter

GPU = torch.device("cuda", 0)
GiB = 1 << 30


def _batch(model, free_bytes, monkeypatch, **flat):
    monkeypatch.setattr(session, "usable_bytes", lambda device: free_bytes)
    cfg = PruneConfig.from_flat({"sparsity": 0.5, "nsamples": 128, "seqlen": 2048} | flat)
    return session.auto_batch_size(ModelAdapter.from_model(model), cfg, GPU, torch.float16)


def _shaped(model, hidden, inter):
    model.config.hidden_size, model.config.intermediate_size = hidden, inter
    return model


@pytest.mark.parametrize(
    "hidden, inter, free_gib, expected",
    [
        # SmolLM2-135M: 2048 * (5760 + 6144) * 2 B = 48.8 MB a sequence; 3 GiB hold 66 -> 64
        (576, 1536, 70, 64),
        # Llama-3-8B: 402.7 MB a sequence; 3 GiB hold 8 (16384 tokens)
        (4096, 14336, 110, 8),
        # Llama-3-70B: 805 MB a sequence; 3 GiB hold 4, raised to 16384 tokens = 8
        (8192, 28672, 110, 8),
        # little free memory: a quarter of 5 GiB holds 3 sequences of the 8B shape
        (4096, 14336, 5, 3),
        # nothing free: still one sequence
        (4096, 14336, 0, 1),
    ],
)
def test_dense_batch(hidden, inter, free_gib, expected, monkeypatch):
    model = _shaped(make_llama(num_layers=1), hidden, inter)
    assert _batch(model, free_gib * GiB, monkeypatch) == expected


def test_nsamples_and_explicit_batch_and_cpu(monkeypatch):
    model = _shaped(make_llama(num_layers=1), 576, 1536)
    assert _batch(model, 70 * GiB, monkeypatch, nsamples=16) == 16
    assert _batch(model, 70 * GiB, monkeypatch, batch_size=5) == 5
    cfg = PruneConfig.from_flat({"sparsity": 0.5, "nsamples": 128, "seqlen": 2048})
    adapter = ModelAdapter.from_model(model)
    assert session.auto_batch_size(adapter, cfg, torch.device("cpu"), torch.float32) == 8


def test_mixture_of_experts_batch_is_not_capped(monkeypatch):
    """Experts run once per batch in the statistics pass: smaller batches would be slower."""
    model = make_moe("qwen3_moe")
    cfg = model.config
    cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size = 2048, 6144, 768
    top_k = cfg.num_experts_per_tok
    inter = max(6144, 2 * top_k * 768)
    per_sample = 2048 * (10 * 2048 + 4 * inter) * 2
    free = 80 * GiB
    expected = min(64, int(0.25 * free) // per_sample)
    assert expected > 3 * GiB // per_sample  # the dense cap would have been lower
    assert _batch(model, free, monkeypatch) == expected
