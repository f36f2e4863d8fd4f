"""Mixture-of-experts: every expert's projections as prunable matrices, fed their routed tokens.

transformers 5.x stores the experts of a MoE block fused, as 3-D parameters of one module:
``experts.gate_up_proj`` [E, 2I, H] (gate and up concatenated, or interleaved as in gpt-oss;
[E, H, 2I] when ``is_transposed``) and ``experts.down_proj`` [E, H, I] ([E, I, H] transposed).
Each expert's gate, up and down projection becomes an `ExpertLinear`: a small module whose
``weight`` is an (out_features, in_features) *view* into the fused parameter, so everything that
prunes an ``nn.Linear`` (scorers, TRIM, allocations, safeguards, resume states) prunes it, in
place, and the model keeps transformers' own layout for ``save_pretrained``.

Statistics follow the router. Under `routed_experts` the experts run a forward of their own (the
seam transformers made for this: ``ExpertsInterface``, selected by
``config._experts_implementation``; Llama-4's experts, which have no such seam, get a documented
per-family forward): every expert's `ExpertLinear` s are *called* with the tokens the router
sends to that expert, so forward hooks see exactly those tokens, and the down projection sees
act(gate)·up of them. `calibrate_all` sends every token through chosen experts for statistics
only (the block's output still follows the router).

The block's output is computed as transformers' eager experts forward does it (one expert at a
time, outputs weighted by the routing weights and summed in the hidden states' dtype).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trimprune.core.forwards import instance_forwards
from trimprune.errors import TrimpruneError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
IMPLEMENTATION = "trimprune_routed"
# linears that route tokens (never pruned): the router / gate of a MoE block, shared-expert gates
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate", "expert_gate"})


@dataclass(frozen=True)
class Routed:
    """The tokens an `ExpertLinear` was called with in one forward: their positions in the
    flattened batch (`positions`) out of `batch_tokens` tokens, and how many of them the router
    sent to the expert (`routed`: fewer than the rows under `calibrate_all`; None: as many as the
    rows)."""

    positions: torch.Tensor
    batch_tokens: int
    routed: int | None = None


class ExpertLinear(nn.Module):
    """One expert's projection: ``weight`` is an (out, in) view into the fused 3-D parameter (rows
    `rows` of expert `expert`, transposed first for transposed layouts). Not a child module of the
    experts module: the model's state dict and parameters are unchanged."""

    def __init__(
        self,
        experts: nn.Module,
        param: str,
        expert: int,
        rows: slice,
        transposed: bool,
        kind: str,
    ):
        super().__init__()
        object.__setattr__(self, "_owner", weakref.ref(experts))  # not a submodule
        self.param, self.expert, self.rows, self.transposed = param, expert, rows, transposed
        self.kind = kind  # gate_proj / up_proj / down_proj
        self.routed: Routed | None = None  # set by the experts forward before each call

    @property
    def owner(self) -> nn.Module:
        m: nn.Module | None = self.__dict__["_owner"]()
        if m is None:  # pragma: no cover - the model was freed
            raise RuntimeError("the experts module of this ExpertLinear no longer exists")
        return m

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.owner, self.param).data[self.expert]
        return (w.t() if self.transposed else w)[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.owner, f"{self.param}_bias", None)
        return None if b is None else b.data[self.expert][self.rows]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"expert={self.expert}, {self.kind}, in={self.in_features}, out={self.out_features}"


@dataclass
class ExpertSet:
    """The `ExpertLinear` s of one fused experts module, `linears[e][projection]`."""

    module: nn.Module
    num_experts: int
    has_gate: bool
    concatenated: bool
    transposed: bool
    linears: list[dict[str, ExpertLinear]]

    def named(self, prefix: str) -> Iterator[tuple[str, ExpertLinear]]:
        """(name, linear) in expert order, named like unfused checkpoints:
        ``<prefix>.<e>.gate_proj``."""
        for e, projs in enumerate(self.linears):
            for kind in PROJECTIONS:
                if kind in projs:
                    yield f"{prefix}.{e}.{kind}", projs[kind]


_SETS: weakref.WeakKeyDictionary[nn.Module, ExpertSet] = weakref.WeakKeyDictionary()

# experts modules without an ExpertsInterface seam: class name -> (transposed, concatenated); their
# MoE block's forward is replaced (`BLOCK_FORWARDS`)
NO_SEAM = {"Llama4TextExperts": (True, True)}


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding experts as 3-D parameters: ``down_proj`` and ``gate_up_proj`` (or
    ``up_proj``)."""
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def layout_known(module: nn.Module) -> bool:
    """Whether trimprune can tell the layout of a fused experts module: transformers' experts
    interface (``is_transposed``) or a family of `NO_SEAM`. Experts of an unknown layout are not
    pruned (`core.model.ModelAdapter.linears` leaves them out); `core.coverage` lists them and the
    run is refused unless --allow-unpruned."""
    return hasattr(module, "is_transposed") or type(module).__name__ in NO_SEAM


def prunable_experts(module: nn.Module) -> bool:
    """A fused experts module whose experts trimprune prunes (one of a known layout)."""
    return is_fused_experts(module) and layout_known(module)


def expert_set(module: nn.Module) -> ExpertSet:
    """The `ExpertSet` of a fused experts module (made once per module)."""
    found = _SETS.get(module)
    if found is None:
        found = _SETS[module] = _make_set(module)
    return found


def _make_set(module: nn.Module) -> ExpertSet:
    name = type(module).__name__
    has_gate = hasattr(module, "gate_up_proj")
    if hasattr(module, "is_transposed"):
        transposed = bool(module.is_transposed)
        concatenated = bool(getattr(module, "is_concatenated", True))
        has_gate = bool(getattr(module, "has_gate", has_gate))
    elif name in NO_SEAM:
        transposed, concatenated = NO_SEAM[name]
    else:
        raise TrimpruneError(
            f"{name} stores experts as 3-D parameters without transformers' experts interface "
            "(use_experts_implementation): trimprune cannot tell its layout; convert the "
            "checkpoint with a transformers version that has it, or pass --allow-unpruned"
        )
    up: torch.Tensor = getattr(module, "gate_up_proj" if has_gate else "up_proj")
    n_exp = int(up.shape[0])
    width = int(up.shape[2] if transposed else up.shape[1])  # 2I with a gate, else I
    half = width // 2
    linears = []
    for e in range(n_exp):
        projs: dict[str, ExpertLinear] = {}
        if has_gate:
            gate_rows = slice(0, half) if concatenated else slice(0, width, 2)
            up_rows = slice(half, width) if concatenated else slice(1, width, 2)
            projs["gate_proj"] = ExpertLinear(
                module, "gate_up_proj", e, gate_rows, transposed, "gate_proj"
            )
            projs["up_proj"] = ExpertLinear(
                module, "gate_up_proj", e, up_rows, transposed, "up_proj"
            )
        else:
            projs["up_proj"] = ExpertLinear(
                module, "up_proj", e, slice(None), transposed, "up_proj"
            )
        projs["down_proj"] = ExpertLinear(
            module, "down_proj", e, slice(None), transposed, "down_proj"
        )
        linears.append(projs)
    return ExpertSet(module, n_exp, has_gate, concatenated, transposed, linears)


def is_router(name: str, module: nn.Module) -> bool:
    """A linear that routes tokens (a MoE block's router, a shared expert's gate): never
    pruned."""
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES or "Router" in type(module).__name__


# ------------------------------------------------------------------------------ calibration scope
@dataclass
class _Scope:
    all_experts: bool = False  # every token through every expert (statistics only)
    forced: frozenset[tuple[int, int]] = frozenset()  # (id(module), expert): every token


_scope = _Scope()


@contextlib.contextmanager
def calibrate_all(
    everything: bool = False, forced: set[tuple[nn.Module, int]] | None = None
) -> Iterator[None]:
    """Statistics from every calibration token: for every expert (`everything`) or for the
    `(experts module, expert)` pairs of `forced`. Outputs still follow the router."""
    global _scope
    old = _scope
    _scope = _Scope(everything, frozenset((id(m), e) for m, e in (forced or ())))
    try:
        yield
    finally:
        _scope = old


# --------------------------------------------------------------------------------- the forwards
def _combine(s: ExpertSet, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate and up outputs in the fused layout `_apply_gate` expects."""
    if s.concatenated:
        return torch.cat([gate, up], -1)
    return torch.stack([gate, up], -1).flatten(-2)


def _expert(
    s: ExpertSet,
    e: int,
    x: torch.Tensor,
    positions: torch.Tensor,
    batch_tokens: int,
    routed_tokens: int | None = None,
) -> torch.Tensor:
    """Expert e on the rows `x` (at `positions` of the flattened batch), through its
    `ExpertLinear` s (forward hooks see these rows; `routed_tokens` of them were routed to it)."""
    projs = s.linears[e]
    routed = Routed(positions, batch_tokens, routed_tokens)
    for p in projs.values():
        p.routed = routed
    m: Any = s.module
    if s.has_gate and hasattr(m, "_apply_gate"):
        h = m._apply_gate(_combine(s, projs["gate_proj"](x), projs["up_proj"](x)))
    elif s.has_gate:  # experts without the interface (Llama-4): act(gate) * up
        h = m.act_fn(projs["gate_proj"](x)) * projs["up_proj"](x)
    else:
        h = m.act_fn(projs["up_proj"](x))
    y = projs["down_proj"](h)
    if getattr(m, "has_post_expert_norm", False):
        y = m.post_expert_norm(y)
    return y


def _inputs(s: ExpertSet, e: int, hidden: torch.Tensor, tokens: torch.Tensor):
    """The rows expert e computes on: its routed tokens, or every token (calibrate_all)."""
    if _scope.all_experts or (id(s.module), e) in _scope.forced:
        return hidden, torch.arange(hidden.shape[0], device=hidden.device), tokens
    return hidden[tokens], tokens, None


def _observed(s: ExpertSet) -> bool:
    """Whether something reads what the experts of `s` see (a forward hook on one of their
    `ExpertLinear` s: statistics are being collected)."""
    return any(p._forward_hooks or p._forward_pre_hooks for ps in s.linears for p in ps.values())


# the experts implementation each config had before `routed_experts` (id(config) -> name)
_OWN: dict[int, Any] = {}


def _own_forward(module: nn.Module):
    """The experts forward the model's config selected (transformers' own), or None."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    eager = getattr(type(module).forward, "__wrapped__", None)
    cfg = getattr(module, "config", None)
    if eager is None or cfg is None or id(cfg) not in _OWN:
        return None
    impl = _OWN[id(cfg)]
    return eager if impl in (None, "eager") else ALL_EXPERTS_FUNCTIONS.get_interface(impl, eager)


def routed_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights, *a, **kw):
    """An ``ExpertsInterface`` forward: each expert in turn on the tokens routed to it, through
    its `ExpertLinear` s. Every expert is called in every batch (with no rows when it gets none),
    so statistics stay aligned with the batches. When nothing collects statistics (the forwards
    that only carry the hidden states on), the model's own experts forward computes instead."""
    s = expert_set(self)
    if not _observed(s):
        own = _own_forward(self)
        if own is not None:
            return own(self, hidden_states, top_k_index, top_k_weights, *a, **kw)
    out = torch.zeros_like(hidden_states)
    n, top_k = top_k_index.shape
    # the (token, slot) pairs grouped by expert, in token order (as torch.where(top_k_index == e)
    # lists them), with one device-to-host copy for the group sizes
    flat = top_k_index.flatten()
    flat = torch.where((flat >= 0) & (flat < s.num_experts), flat, s.num_experts)  # none: last
    order = torch.sort(flat, stable=True).indices
    sizes = torch.bincount(flat, minlength=s.num_experts)[: s.num_experts].tolist()
    start = 0
    for e in range(s.num_experts):
        pairs = order[start : start + sizes[e]]
        start += sizes[e]
        tokens, k = pairs // top_k, pairs % top_k
        x, pos, pick = _inputs(s, e, hidden_states, tokens)
        y = _expert(s, e, x, pos, n, int(tokens.numel()))
        if pick is not None:
            y = y[pick]
        y = y * top_k_weights[tokens, k, None].to(y.dtype)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def _llama4_moe_forward(self: Any, hidden_states: torch.Tensor):
    """Llama-4's MoE block, whose experts have no ExpertsInterface seam (documented per-family
    forward): the router's sigmoid scores scale each expert's *input* (zero where the expert is
    not routed), the shared expert sees every token. Each expert computes on its routed tokens
    only (with `calibrate_all`: every token, unscaled where it is not routed); the sum follows the
    router as the fused forward does (no biases)."""
    s = expert_set(self.experts)
    if not _observed(s):  # nothing collects statistics: the family's own forward
        return type(self).forward(self, hidden_states)
    hidden = hidden_states.reshape(-1, self.hidden_dim)
    scores, logits = self.router(hidden)
    out = self.shared_expert(hidden)
    n = hidden.shape[0]
    for e in range(s.num_experts):
        tokens = torch.nonzero(scores[:, e] > 0).flatten()
        scale = scores[tokens, e, None].to(hidden.dtype)
        if _scope.all_experts or (id(s.module), e) in _scope.forced:
            x = hidden.clone()
            x[tokens] = x[tokens] * scale
            y = _expert(s, e, x, torch.arange(n, device=hidden.device), n, int(tokens.numel()))
            y = y[tokens]
        else:
            y = _expert(s, e, hidden[tokens] * scale, tokens, n, int(tokens.numel()))
        out.index_add_(0, tokens, y.to(out.dtype))
    return out, logits


# MoE blocks whose experts have no ExpertsInterface seam: block class name -> its forward
BLOCK_FORWARDS = {"Llama4TextMoe": _llama4_moe_forward}


def _register() -> bool:
    try:
        from transformers.integrations.moe import ExpertsInterface
    except Exception:  # pragma: no cover - transformers without the experts interface
        return False
    ExpertsInterface.register(IMPLEMENTATION, routed_experts_forward)
    return True


@contextlib.contextmanager
def routed_experts(model: nn.Module) -> Iterator[list[ExpertSet]]:
    """While open, the model's fused experts compute through their `ExpertLinear` s (statistics
    follow the router); the experts implementation each config had is restored on exit. Yields
    the model's `ExpertSet` s (none for a dense model)."""
    sets = expert_sets(model)
    configs: dict[int, tuple[Any, Any]] = {}
    try:
        for s in sets:
            m: Any = s.module
            cfg = getattr(m, "config", None)
            if hasattr(m, "is_transposed") and cfg is not None:
                if not _register():  # pragma: no cover
                    raise TrimpruneError(
                        "this transformers has no experts interface: upgrade transformers"
                    )
                configs.setdefault(id(cfg), (cfg, getattr(cfg, "_experts_implementation", None)))
                _OWN.setdefault(id(cfg), configs[id(cfg)][1])
                cfg._experts_implementation = IMPLEMENTATION
        blocks = [(b, BLOCK_FORWARDS.get(type(b).__name__)) for b in model.modules()]
        with instance_forwards((b, f.__get__(b)) for b, f in blocks if f is not None):
            yield sets
    finally:
        for cfg, old in configs.values():
            cfg._experts_implementation = old
            _OWN.pop(id(cfg), None)


def expert_sets(model: nn.Module) -> list[ExpertSet]:
    """The `ExpertSet` s of the model's fused experts of a known layout (`prunable_experts`)."""
    return [expert_set(m) for m in model.modules() if prunable_experts(m)]


@dataclass(frozen=True)
class MoeCalibration:
    """Where experts' statistics come from: ``routed`` (the tokens the router sends to each
    expert; an expert with fewer than `min_tokens` of them takes every token's statistics
    instead, and is listed) or ``all`` (every token through every expert, statistics only)."""

    mode: str = "routed"
    min_tokens: int = 64


# ------------------------------------------------------------------------ outputs: fused layout
@dataclass(frozen=True)
class FusedSlot:
    """Where an expert's projection lies in its fused parameter: rows `rows` of
    ``parameter[expert]`` (of its transpose when `transposed`), as (out, in). `parameter` is the
    state-dict name of the fused 3-D parameter, `shape` its shape."""

    parameter: str
    expert: int
    rows: slice
    transposed: bool
    shape: tuple[int, ...]

    def view(self, fused: torch.Tensor) -> torch.Tensor:
        """The (out, in) view of this projection in `fused` (a tensor of the fused shape)."""
        w = fused[self.expert]
        return (w.t() if self.transposed else w)[self.rows]

    def to_json(self) -> list:
        r = self.rows
        return [self.parameter, self.expert, [r.start, r.stop, r.step], self.transposed,
                list(self.shape)]  # fmt: skip

    @classmethod
    def from_json(cls, v: list) -> FusedSlot:
        return cls(str(v[0]), int(v[1]), slice(*v[2]), bool(v[3]), tuple(int(x) for x in v[4]))


def fused_parameter(model: nn.Module, name: str) -> FusedSlot | None:
    """The fused parameter an expert projection named like ``model.layers.1.mlp.experts.3.up_proj``
    (`core.model.ModelAdapter.linears`) lives in, or None when `name` is not an expert's
    projection of `model`."""
    prefix, _, rest = name.rpartition(".")
    owner_name, _, index = prefix.rpartition(".")
    if rest not in PROJECTIONS or not index.isdigit():
        return None
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    if not is_fused_experts(owner):
        return None
    s = expert_set(owner)
    e = int(index)
    lin = s.linears[e].get(rest) if e < s.num_experts else None
    if lin is None:
        return None
    shape = tuple(getattr(owner, lin.param).shape)
    return FusedSlot(f"{owner_name}.{lin.param}", e, lin.rows, lin.transposed, shape)


def fused_masks(
    masks: dict[str, torch.Tensor], slots: dict[str, FusedSlot]
) -> dict[str, torch.Tensor]:
    """`masks` (linear name -> (out, in) bool mask, True = pruned) with the experts' folded into
    one bool mask per fused parameter (its shape and layout; False where no mask covers an entry);
    the other masks are returned under their own names."""
    out: dict[str, torch.Tensor] = {}
    for name, m in masks.items():
        slot = slots.get(name)
        if slot is None:
            out[name] = m
            continue
        fused = out.setdefault(slot.parameter, torch.zeros(slot.shape, dtype=torch.bool))
        slot.view(fused).copy_(m)
    return out
