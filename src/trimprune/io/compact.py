"""Compact checkpoints: every pruned weight as a bitmask plus its kept values (safetensors, no
pickle).

A compact directory holds what `save_pretrained` writes besides the weights (config.json,
generation_config.json) and the tokenizer files, unchanged, and instead of model.safetensors:

    model.compact.safetensors
        <param>.mask     for each pruned weight W (as the module stores it): bit-packed, 1 = stored,
                         row-major over W's shape, numpy.packbits bit order
        <param>.values   W's stored entries in row-major order, in W's dtype
        <param>          every other tensor of the state dict, as it is
        metadata         format, the pruned parameters' shapes, tied parameters

The stored entries are the non-zero ones, so W is rebuilt exactly, whatever zeros its kept weights
hold. At sparsity s in float16 a pruned weight takes 1/16 + (1 - s) of its dense bytes (0.36 at 70
%). `load_pruned(DIR)` returns an ordinary transformers model; `trimprune export --dense` writes a
plain Hugging Face directory from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from trimprune.errors import TrimpruneError
from trimprune.io.integrity import check_model_folder
from trimprune.io.tensorfile import save_tensors

COMPACT_FORMAT = "trimprune-compact-v1"
COMPACT_FILE = "model.compact.safetensors"
LOAD_FIX = "rerun the prune that wrote the folder, or restore it from a copy"


def compact_tensors(
    state: dict[str, torch.Tensor], sparse: set[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of `model.compact.safetensors` for a state dict whose parameters
    named in `sparse` are stored as bitmask + values. Tensors that share storage (tied embeddings)
    are stored once."""
    out, shapes, tied, seen = {}, {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.device)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu().contiguous()
        if name in sparse:
            keep = t != 0
            out[f"{name}.mask"] = torch.from_numpy(np.packbits(keep.numpy().reshape(-1)))
            out[f"{name}.values"] = t[keep]
            shapes[name] = list(t.shape)
        else:
            out[name] = t
    meta = {"format": COMPACT_FORMAT, "sparse_shapes": json.dumps(shapes), "tied": json.dumps(tied)}
    return out, meta


def dense_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict stored in a compact file (pruned weights rebuilt), and the tied parameters."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != COMPACT_FORMAT:
            raise TrimpruneError(
                f"{path} is not a trimprune compact checkpoint (format {meta.get('format')!r}): "
                "give the folder a `--save-format compact` run wrote"
            )
        shapes = json.loads(meta["sparse_shapes"])
        state = {}
        for key in f.keys():
            if key.endswith(".mask") and key[:-5] in shapes:
                continue
            if key.endswith(".values") and key[:-7] in shapes:
                name = key[:-7]
                n = int(np.prod(shapes[name]))
                keep = np.unpackbits(f.get_tensor(f"{name}.mask").numpy())[:n].astype(bool)
                values = f.get_tensor(key)
                w = torch.zeros(n, dtype=values.dtype)
                w[torch.from_numpy(keep)] = values
                state[name] = w.view(shapes[name])
            else:
                state[key] = f.get_tensor(key)
    return state, json.loads(meta["tied"])


def save_compact(out: Path, model, tokenizer, sparse: set[str]) -> None:
    """Write a compact model directory (module docstring) into `out`; `sparse`: parameter names."""
    tensors, meta = compact_tensors(model.state_dict(), sparse)
    model.config.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    save_tensors(tensors, out / COMPACT_FILE, meta)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def load_pruned(path: str | Path, device=None, trust_remote_code: bool = False):
    """An ordinary transformers model from a trimprune output folder: a compact checkpoint is
    rebuilt dense; a folder with model.safetensors loads as usual."""
    from transformers import AutoConfig

    from trimprune.io.autoclass import auto_model_class, plain_load_kwargs

    p = Path(path)
    check_model_folder(p, LOAD_FIX)  # its safetensors are whole (io.integrity)
    if not (p / COMPACT_FILE).is_file():
        if not (p / "config.json").is_file():
            raise TrimpruneError(
                f"{str(path)!r} holds no model (no config.json / {COMPACT_FILE}): give the "
                "--output folder of a prune that saved its model"
            )
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        auto = auto_model_class(config)
        model = auto.from_pretrained(
            str(p), trust_remote_code=trust_remote_code, **plain_load_kwargs()
        )
        return model.to(device).eval() if device is not None else model.eval()
    return load_compact(p, trust_remote_code=trust_remote_code, device=device)


def load_compact(path: str | Path, dtype=None, device=None, trust_remote_code: bool = False):
    """The model of a compact folder (its `COMPACT_FILE` rebuilt dense, see the module docstring)
    in `dtype` (None: the checkpoint's), evaluation mode."""
    from transformers import AutoConfig

    from trimprune.io.autoclass import auto_model_class

    p = Path(path)
    state, tied = dense_state(p / COMPACT_FILE)
    config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    auto = auto_model_class(config)
    try:
        model = auto.from_config(config, dtype=stored, trust_remote_code=trust_remote_code)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = auto.from_config(config, torch_dtype=stored, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(tied):
        raise TrimpruneError(
            f"{str(path)!r} does not match its config: missing "
            f"{sorted(set(missing) - set(tied))[:3]}, unexpected {unexpected[:3]}"
        )
    if tied:
        model.tie_weights()
    if dtype is not None and dtype != stored:
        model.to(dtype)
    return model.to(device).eval() if device is not None else model.eval()
