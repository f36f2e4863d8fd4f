"""Multimodal checkpoints (``...ForConditionalGeneration``): only the language model's decoder
blocks are pruned; the vision tower and the multimodal projector stay bit-identical and are listed
in the report; calibration and evaluation feed text token ids only.

The references are independent of the adapter: the expected pruned weights are the language
model's 2-D / 3-D block parameters found by name in the state dict (routers left out), and the
excluded towers' parameter counts are summed from the state dict under their known names.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tiny_models import MM_V, MULTIMODAL, V, calib, make_multimodal
from trimprune import PruneConfig, prune
from trimprune.core.model import ModelAdapter
from trimprune.io.compact import load_pruned
from trimprune.io.evaluate import logits_batches, nll_of_windows
from trimprune.io.export import write_outputs
from trimprune.io.models import auto_model_class, load_model
from trimprune.io.report import build_report, markdown, summary_text

N, L = 4, 16
FAMILIES = list(MULTIMODAL)

# where each family keeps its language model's blocks and its towers (transformers' module names)
BLOCKS = {
    "gemma3": "model.language_model.layers.",
    "llama4": "language_model.model.layers.",
    "qwen2_5_vl": "model.language_model.layers.",
    "qwen3_vl": "model.language_model.layers.",
    "qwen3_vl_moe": "model.language_model.layers.",
    "mistral3": "model.language_model.layers.",
}
TOWERS = {
    "gemma3": {"vision tower": "model.vision_tower.", "multimodal projector": "model.multi_"},
    "llama4": {"vision tower": "vision_model.", "multimodal projector": "multi_modal_projector."},
    "qwen2_5_vl": {"vision tower": "model.visual."},
    "qwen3_vl": {"vision tower": "model.visual."},
    "qwen3_vl_moe": {"vision tower": "model.visual."},
    "mistral3": {"vision tower": "model.vision_tower.", "multimodal projector": "model.multi_"},
}
ROUTERS = ("feed_forward.router.weight", "mlp.gate.weight")


def _cfg(**kw):
    flat = dict(nsamples=N, seqlen=L, sparsity=0.5, moe_min_tokens=0)
    flat.update(kw)
    return PruneConfig.from_flat(flat)


def _prunable(model, family) -> dict[str, torch.Tensor]:
    """The language model's block weights that are pruned: every 2-D (linear) or 3-D (fused
    experts) parameter under its blocks, routers left out."""
    return {
        n: p
        for n, p in model.named_parameters()
        if n.startswith(BLOCKS[family]) and p.dim() in (2, 3) and not n.endswith(ROUTERS)
    }


def _tower_params(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scorer", ["wanda", "sparsegpt"])
def test_only_the_language_model_is_pruned(family, scorer):
    model = make_multimodal(family)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    weights = _prunable(model, family)
    total = sum(p.numel() for p in weights.values())
    res = prune(model, None, _cfg(scorer=scorer), calibration=calib(N, L), progress=False)
    zeros = sum(int((p == 0).sum()) for p in weights.values())
    assert zeros * 2 == total  # exactly 50 % of the language model's linears
    assert sum(r.numel for r in res.layers.values()) == total
    assert all(n.startswith(BLOCKS[family]) for n in res.layers)
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(weights)  # towers, embeddings, norms, head bit-identical
    for prefix in TOWERS[family].values():
        assert not any(n.startswith(prefix) for n in changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_report_lists_the_excluded_towers(family):
    model = make_multimodal(family)
    res = prune(model, None, _cfg(), calibration=calib(N, L), progress=False)
    rep = build_report(res, {"source": family}, {"perplexity": {}}, res.timings)
    rep = json.loads(json.dumps(rep))  # as report.json holds it
    kinds = {e["kind"]: e for e in rep["excluded"]}
    assert set(kinds) == set(TOWERS[family])
    text, md = summary_text(rep), markdown(rep)
    for kind, prefix in TOWERS[family].items():
        n = _tower_params(model, prefix)
        assert n > 0 and kinds[kind]["params"] == n
        assert model.get_submodule(kinds[kind]["name"]) is not None
        line = f"excluded: {kind} ({n} params)"
        assert line in text and line in md


def test_causal_lm_has_no_excluded_tower():
    from tiny_models import make

    assert ModelAdapter.from_model(make("gemma3")).excluded == ()


def _reference_nll(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    return float(
        F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            windows[:, 1:].reshape(-1),
            reduction="sum",
        )
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_perplexity_and_captured_block_inputs(family):
    """The block-by-block walk (the capture's recorded arguments: rotary / 3-D mrope position
    embeddings, sliding and chunked attention masks) gives the model's own logits on text, dense
    and pruned; perplexity on text windows matches a direct cross-entropy."""
    model = make_multimodal(family)
    windows = calib(3, L, seed=5)
    assert int(windows.max()) < V < MM_V  # text only: no image token among the ids
    dev = torch.device("cpu")
    for step in ("dense", "pruned"):
        with torch.no_grad():
            direct = model(input_ids=windows, use_cache=False).logits
        walked = torch.cat([lg for _, lg in logits_batches(model, [windows], dev, offload=True)])
        torch.testing.assert_close(walked, direct, rtol=1e-5, atol=1e-5)
        nll, n = nll_of_windows(model, windows, batch_size=2)
        assert n == 3 * (L - 1)
        assert nll == pytest.approx(_reference_nll(model, windows), rel=1e-5)
        assert math.isfinite(math.exp(nll / n))
        if step == "dense":
            prune(model, None, _cfg(), calibration=calib(N, L), progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_back_the_whole_model(family, tmp_path):
    model = make_multimodal(family)
    res = prune(model, None, _cfg(), calibration=calib(N, L), progress=False)
    rep = build_report(res, {"source": family}, {"perplexity": {}}, res.timings)
    ids = calib(2, L, seed=9)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for fmt in ("dense", "compact"):
        out = tmp_path / fmt
        write_outputs(out, model, None, res, rep, markdown(rep), save_format=fmt)
        back = load_pruned(out)
        assert type(back) is type(model)
        for n, t in model.state_dict().items():
            assert torch.equal(back.state_dict()[n], t), n  # vision tower included
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma3", "llama4", "qwen2_5_vl", "mistral3"])
def test_auto_class_of_a_multimodal_config(family):
    from transformers import AutoModelForImageTextToText

    cfg = make_multimodal(family).config
    cfg.architectures = [type(make_multimodal(family)).__name__]
    assert auto_model_class(cfg) is AutoModelForImageTextToText


@pytest.fixture(scope="module")
def tiny_multimodal_dir(tmp_path_factory, data_dir):
    """A tiny Qwen2.5-VL saved like a hub model, with the GPT-2 tokenizer (its vocabulary plus
    the image tokens)."""
    import transformers as T
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizers" / "gpt2"))
    tok.model_max_length = 256
    n = len(tok)
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    cfg = T.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=n + 4,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_parameters=rope,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            patch_size=4,
            out_hidden_size=32,
            window_size=8,
            fullatt_block_indexes=[1],
        ),
        image_token_id=n,
        video_token_id=n + 1,
        vision_start_token_id=n + 2,
        vision_end_token_id=n + 3,
    )
    d = tmp_path_factory.mktemp("tiny_vl")
    T.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_prunes_a_multimodal_folder(tiny_multimodal_dir, tmp_path, capsys, with_data_env):
    from trimprune.cli import main

    out = tmp_path / "pruned"
    rc = main(
        [
            "prune", "--model", str(tiny_multimodal_dir), "--scorer", "wanda",
            "--sparsity", "0.5", "--calib", "c4", "--nsamples", "4", "--seqlen", "32",
            "--eval", "wikitext2", "--eval-limit", "2", "--output", str(out), "--quiet",
            "--dtype", "float32",  # the checkpoint's own: a GPU's default is bfloat16
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    dense = load_model(str(tiny_multimodal_dir), device="cpu", dtype="float32").model
    n = _tower_params(dense, "model.visual.")
    assert f"excluded: vision tower ({n} params): model.visual" in captured.out
    r = json.loads((out / "report.json").read_text())
    assert r["excluded"] == [{"name": "model.visual", "kind": "vision tower", "params": n}]
    assert math.isfinite(r["metrics"]["perplexity"]["wikitext2"])
    assert r["sparsity"]["achieved"] == 0.5
    pruned = load_model(str(out), device="cpu", dtype="float32").model
    assert type(pruned) is type(dense)
    sd = pruned.state_dict()
    for name, t in dense.state_dict().items():
        if name.startswith("model.visual."):
            assert torch.equal(sd[name], t), name


@pytest.mark.parametrize("family", ["gemma3", "llama4", "qwen2_5_vl", "qwen3_vl", "mistral3"])
def test_disk_offload_output_equals_the_in_memory_prune(family, tmp_path):
    """`--offload disk` builds the multimodal model (`auto_model_class`), streams the language
    model's blocks and writes the whole model, towers included, as the in-memory prune does."""
    from test_offload_disk import prune_from_disk, stored_tensors

    make_multimodal(family).save_pretrained(tmp_path / "src")
    flat = dict(scorer="wanda", sparsity=0.5, nsamples=N, seqlen=L, moe_min_tokens=0)
    ids = calib(N, L)
    mem = load_pruned(tmp_path / "src")
    res = prune(mem, None, PruneConfig.from_flat(flat), calibration=ids, progress=False)
    write_outputs(tmp_path / "mem", mem, None, res, {})
    _, _, disk = prune_from_disk(tmp_path / "src", flat, ids, tmp_path / "disk")
    assert disk.excluded == res.excluded and res.excluded
    a, b = stored_tensors(tmp_path / "mem"), stored_tensors(tmp_path / "disk")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    back = load_pruned(tmp_path / "disk")
    assert type(back) is type(mem)
    for name, t in mem.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
