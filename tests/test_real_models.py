"""The dense perplexity of every real model installed here against a recorded value: the check that the
installed transformers loads each architecture's real checkpoint soundly (the floor in pyproject.toml
is the oldest release that passes it; README "Install").

Recorded on CPU in float32 with transformers 5.24.0 (5.23.0 gives the same values), WikiText-2 test,
the first 8 windows of 512 tokens. Tolerance: 0.1 % (CPU arithmetic of other machines and BLAS
libraries moves the fourth digit at most; a loading fault moves the first two: Gemma-3 gives 69.63
under transformers 5.20.0 and 5.22.2, whose GGUF tokenizer adds no <bos>, and 418.18 under 5.17.0)."""

import pytest

from aliases import need_alias
from trimprune import load_model
from trimprune.io.evaluate import evaluate_sets, prepare_eval_sets

RECORDED = {  # alias -> (seqlen, windows, dense perplexity)
    "smollm2-135m": (512, 8, 30.6406),
    "gemma3-270m": (512, 8, 63.6785),
}


@pytest.mark.slow
@pytest.mark.parametrize("alias", sorted(RECORDED))
def test_dense_perplexity_of_each_real_model(alias, with_data_env):
    need_alias(alias)
    seqlen, windows, want = RECORDED[alias]
    model, tok = load_model(alias, device="cpu", dtype="float32")
    sets = prepare_eval_sets(["wikitext2"], tok, seqlen, None, windows)
    got = evaluate_sets(model, sets, 4)["wikitext2"]["perplexity"]
    assert got == pytest.approx(want, rel=1e-3), (
        f"{alias}: dense perplexity {got:.4f}, recorded {want}"
    )


def test_models_load_as_plain_modules_with_dense_weights():
    """transformers >= 5.25 swaps layers' forwards for hub kernels by default and keeps a GGUF
    file's weights packed where a matmul kernel exists; the prune needs neither."""
    import transformers

    from trimprune.io.autoclass import plain_load_kwargs

    kw = plain_load_kwargs("model.gguf")
    assert kw["gguf_file"] == "model.gguf"
    assert (
        "quantization_config" not in plain_load_kwargs() and "gguf_file" not in plain_load_kwargs()
    )
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 25):
        assert kw["use_kernels"] is False
        assert kw["quantization_config"].dequantize is True
        assert kw["quantization_config"].gguf_file == "model.gguf"
