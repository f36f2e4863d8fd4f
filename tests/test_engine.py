"""The layer-sequential engine is exact and generic across model families."""

import pytest
import torch

from tiny_models import FAMILIES, LINEARS_PER_BLOCK, calib, make
from trimprune.core.model import ModelAdapter, is_prunable
from trimprune.engine.capture import capture
from trimprune.engine.walk import Streams, forward_block_all, walk


def _reference_block_outputs(model, adapter, ids):
    ref = {}
    hooks = [
        b.register_forward_hook(
            lambda mod, a, o, i=i: ref.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i, b in enumerate(adapter.blocks)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_walk_reproduces_every_block_output(family):
    model = make(family)
    ad = ModelAdapter.from_model(model)
    ids = calib(6, 20)
    ref = _reference_block_outputs(model, ad, ids)
    cap = capture(model, ad, list(ids.split(4)), torch.device("cpu"))  # batches of 4 and 2
    hidden = cap.hidden
    for i in range(ad.num_blocks):
        hidden = forward_block_all(ad.blocks[i], cap, i, hidden)
        torch.testing.assert_close(torch.cat(hidden), ref[i], rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_finds_blocks_and_linears_not_head_or_embeddings(family):
    model = make(family)
    ad = ModelAdapter.from_model(model)
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    assert ad.num_blocks == n_layers
    lin = ad.all_linears()
    assert all(len(ad.linears(i)) == LINEARS_PER_BLOCK[family] for i in range(ad.num_blocks))
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    assert all(m is not head and m is not emb for m in lin.values())
    # every prunable module of the blocks is found, and nothing outside the blocks
    inside = {id(m) for m in ad.blocks.modules() if is_prunable(m)}
    assert inside == {id(m) for m in lin.values()}


def test_offload_path_gives_identical_outputs():
    model = make("llama")
    ad = ModelAdapter.from_model(model)
    ids = calib(5, 16)
    a = capture(model, ad, list(ids.split(2)), torch.device("cpu"), offload=False)
    b = capture(model, ad, list(ids.split(2)), torch.device("cpu"), offload=True)
    ha = walk(ad, a, Streams(a.hidden), lambda run: None, progress=False).main
    hb = walk(ad, b, Streams(b.hidden), lambda run: None, offload=True, progress=False).main
    torch.testing.assert_close(torch.cat(ha), torch.cat(hb), rtol=0, atol=0)
    assert b.store_device.type == "cpu"
