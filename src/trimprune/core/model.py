"""The model's structure: decoder blocks, their prunable linears, and weight access.

One adapter serves every causal LM: it finds the stack of decoder blocks (the largest
``nn.ModuleList`` of identical blocks) and, inside each block, the prunable linear layers
(``nn.Linear``, GPT-2's ``Conv1D``, and each expert's projections of fused mixture-of-experts
parameters as `core.moe.ExpertLinear` s). Embeddings, ``lm_head`` and the routers of MoE blocks are
never pruned.

A multimodal checkpoint (``...ForConditionalGeneration``: Gemma-3, Llama-4, Qwen2.5/3-VL,
Mistral-3) has its own config for the language model (``config.text_config``): only that model's
decoder blocks are searched, and the other towers beside it (vision tower, multimodal projector)
are left as they are and listed as `ExcludedModule` s.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from trimprune.core.moe import (
    ExpertLinear,
    expert_set,
    is_fused_experts,
    is_router,
    prunable_experts,
)
from trimprune.errors import TrimpruneError

try:  # GPT-2 style "Conv1D" (weight stored as in x out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


# --------------------------------------------------------------------------- adapter
def is_prunable(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.Linear, ExpertLinear))
        or (Conv1D != () and isinstance(module, Conv1D))
        or is_fused_experts(module)
    )


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, so in-place edits write through."""
    weight = cast(torch.Tensor, module.weight)
    if Conv1D != () and isinstance(module, Conv1D):
        return weight.data.t()
    return weight.data


def set_weight_2d(module: nn.Module, w: torch.Tensor) -> None:
    weight_2d(module).copy_(w.to(cast(torch.Tensor, module.weight).dtype))


@dataclass(frozen=True)
class ExcludedModule:
    """A tower of a multimodal model that is not pruned: its module name, what it is ("vision
    tower", "multimodal projector", "audio tower", or the module's own name) and its parameter
    count (parameters shared with the language model not counted)."""

    name: str
    kind: str
    params: int

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict) -> ExcludedModule:
        return cls(d["name"], d["kind"], int(d["params"]))

    def describe(self) -> str:
        return f"{self.kind} ({self.params} params): {self.name}"


def _kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1].lower()
    if "projector" in leaf or "connector" in leaf:
        return "multimodal projector"
    for word, kind in (("vision", "vision tower"), ("visual", "vision tower")):
        if word in leaf:
            return kind
    if "audio" in leaf:
        return "audio tower"
    return leaf


def language_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the language model of a multimodal model: one whose config has a separate
    text config (``config.get_text_config()`` is not the config itself); found as
    ``model.get_decoder()``, else as a ``language_model`` submodule. None for a causal LM."""
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if cfg is None or get_text is None or get_text() is cfg:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    candidates = []
    with contextlib.suppress(AttributeError, NotImplementedError, TypeError):
        candidates.append(model.get_decoder())  # type: ignore[operator]
    candidates += [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "language_model"]
    for m in candidates:
        name = names.get(id(m))
        if isinstance(m, nn.Module) and name:
            return name, m
    return None


def excluded_towers(model: nn.Module, lm_name: str) -> tuple[ExcludedModule, ...]:
    """The modules beside the language model on the way from the top to it (vision tower,
    multimodal projector...), the output head left out, with their parameter counts."""
    lm_params = {id(p) for p in model.get_submodule(lm_name).parameters()}
    head = None
    with contextlib.suppress(AttributeError, NotImplementedError, TypeError):
        head = model.get_output_embeddings()  # type: ignore[operator]
    if isinstance(head, nn.Module):
        lm_params |= {id(p) for p in head.parameters()}
    out = []
    parent, prefix = model, ""
    for part in lm_name.split("."):
        for child_name, child in parent.named_children():
            if child_name == part or child is head:
                continue
            n = sum(p.numel() for p in child.parameters() if id(p) not in lm_params)
            if n:
                full = prefix + child_name
                out.append(ExcludedModule(full, _kind(full), n))
        parent, prefix = parent.get_submodule(part), f"{prefix}{part}."
    return tuple(out)


@dataclass
class ModelAdapter:
    """Finds decoder blocks and prunable linears of any causal LM (of a multimodal model: of its
    language model; `excluded` lists the towers beside it)."""

    model: nn.Module
    blocks_name: str
    blocks: nn.ModuleList
    excluded: tuple[ExcludedModule, ...] = ()

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelAdapter:
        lm = language_model(model)
        root, prefix = (lm[1], f"{lm[0]}.") if lm is not None else (model, "")
        best = None
        for name, mod in root.named_modules(prefix=prefix.rstrip(".")):
            if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
                continue
            if len({type(b) for b in mod}) != 1:
                continue
            if not any(is_prunable(x) for x in mod[0].modules()):
                continue
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
        if best is None:
            raise TrimpruneError(
                f"{type(model).__name__} has no stack of decoder blocks with linear layers: "
                "trimprune prunes decoder-only causal LMs"
            )
        excluded = excluded_towers(model, lm[0]) if lm is not None else ()
        return cls(model=model, blocks_name=best[1], blocks=best[2], excluded=excluded)

    def linears(self, block_index: int) -> OrderedDict[str, nn.Module]:
        """Prunable linears of one block, in module order, keyed by their name inside the block.
        Fused experts give one linear per expert and projection (``mlp.experts.3.down_proj``);
        routers (`moe.is_router`) and fused experts of an unknown layout (`moe.layout_known`) are
        left out."""
        out: OrderedDict[str, nn.Module] = OrderedDict()
        for name, mod in self.blocks[block_index].named_modules():
            if not name:
                continue
            if prunable_experts(mod):
                out.update(expert_set(mod).named(name))
            elif is_fused_experts(mod):
                continue  # an unknown layout: left dense (`core.coverage` refuses or lists it)
            elif is_prunable(mod) and not is_router(name, mod):
                out[name] = mod
        return out

    def full_name(self, block_index: int, linear_name: str) -> str:
        return f"{self.blocks_name}.{block_index}.{linear_name}"

    def all_linears(self) -> OrderedDict[str, nn.Module]:
        out = OrderedDict()
        for i in range(len(self.blocks)):
            for n, m in self.linears(i).items():
                out[self.full_name(i, n)] = m
        return out

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def check_context(self, length: int, flag: str) -> None:
        """Refuse sequences longer than the model's context (one line naming the flag and the
        fix). `flag`: a flag, or a config field's token such as `{seqlen}` (`errors`)."""
        n_ctx = self.max_context()
        if n_ctx is not None and length > n_ctx:
            raise TrimpruneError(
                f"{flag} {length} is above the model's context of {n_ctx} tokens: "
                f"use {flag} {n_ctx} or less"
            )

    def max_context(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        if cfg is None:
            return None
        cfg = getattr(cfg, "text_config", None) or cfg
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def hidden_size(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        for key in ("hidden_size", "n_embd", "d_model"):
            v = getattr(cfg, key, None)
            if isinstance(v, int):
                return v
        raise TrimpruneError("cannot tell the model's hidden size from its config")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
