"""What share of the model's weights trimprune prunes: never silent about what it leaves dense.

`Coverage.of(adapter)` walks every parameter of every decoder block. A *weight* is a parameter with
two or more dimensions that is not a bias (fused experts' biases are 2-D: [experts, out]). Each
weight is either

- **pruned**: the weight of a linear `core.model.ModelAdapter.linears` yields (``nn.Linear``,
  GPT-2's ``Conv1D``; a fused 3-D experts parameter counts once, at its full size, for its
  `core.moe.ExpertLinear` views);
- **a router** (`core.moe.is_router`): excluded by design, as routing decisions are not pruned;
- or **unprunable**: any other weight, e.g. a 3-D parameter of a custom module, or fused experts of
  an unknown layout (`core.moe.layout_known`).

Pruned and unprunable weights are counted per kind (`KINDS`: attention, dense MLP with shared
experts, routed experts, other), from the parameter's name inside its block. A block whose
unprunable weights are more than `THRESHOLD` of its parameters (all of them, norms included), and
fused experts of an unknown layout at any share, are refused before pruning unless
``--allow-unpruned`` (`check_coverage`). Embeddings, ``lm_head``, norms, biases and routers are
listed as excluded by design (`Excluded`), with their parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from trimprune.core.moe import ExpertLinear, is_fused_experts, is_router, layout_known
from trimprune.errors import TrimpruneError

if TYPE_CHECKING:
    from trimprune.core.model import ModelAdapter

ATTENTION, DENSE_MLP, EXPERTS, OTHER = "attention", "dense_mlp", "experts", "other"
KINDS = (ATTENTION, DENSE_MLP, EXPERTS, OTHER)
LABELS = {ATTENTION: "attention", DENSE_MLP: "dense MLP", EXPERTS: "experts", OTHER: "other"}
THRESHOLD = 0.01  # unprunable weights above this share of a block's parameters are refused
# name parts of the dense MLP (and shared experts) of the supported families
_MLP_PARTS = frozenset(
    {
        "mlp",
        "feed_forward",
        "ffn",
        "block_sparse_moe",
        "moe",
        "shared_expert",
        "shared_experts",
        "fc1",
        "fc2",
        "c_fc",
        "dense_h_to_4h",
        "dense_4h_to_h",
    }
)
# what is excluded by design, in the order the report lists it
EMBEDDINGS, LM_HEAD, NORMS, ROUTERS, OUTSIDE = (
    "embeddings",
    "lm_head",
    "norms and biases",
    "routers",
    "other weights outside the blocks",
)


def kind_of(name: str) -> str:
    """The kind of a weight from its name inside its block (`KINDS`): a name part ``experts`` is
    routed experts; one holding ``attn`` / ``attention``, attention; an MLP part (`_MLP_PARTS`,
    shared experts included), dense MLP; anything else, other."""
    parts = name.split(".")
    if "experts" in parts:
        return EXPERTS
    if any("attn" in p or "attention" in p for p in parts):
        return ATTENTION
    if any(p in _MLP_PARTS or "mlp" in p for p in parts):
        return DENSE_MLP
    return OTHER


@dataclass(frozen=True)
class KindCoverage:
    """The weights of one kind across all blocks: `total` parameters, `pruned` of them."""

    kind: str
    total: int
    pruned: int

    @property
    def fraction(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "pruned": self.pruned, "fraction": self.fraction}


@dataclass(frozen=True)
class Unprunable:
    """A weight of a block that trimprune cannot prune: its full parameter name, block, kind, shape,
    and its `share` of the block's parameters; `unknown_layout`: fused experts whose layout
    trimprune cannot tell (refused at any share)."""

    name: str
    block: int
    kind: str
    shape: tuple[int, ...]
    numel: int
    share: float
    unknown_layout: bool = False

    def describe(self) -> str:
        why = ", fused experts of an unknown layout" if self.unknown_layout else ""
        return (
            f"{self.name} ({'x'.join(map(str, self.shape))}, {100 * self.share:.1f} % of block "
            f"{self.block}{why})"
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "block": self.block,
            "kind": self.kind,
            "shape": list(self.shape),
            "params": self.numel,
            "share_of_block": self.share,
            "unknown_layout": self.unknown_layout,
        }


@dataclass(frozen=True)
class Excluded:
    """Parameters never pruned by design, of one sort (`what`): how many tensors and parameters,
    and their names (a tied ``lm_head`` is named as an alias of the embedding it shares)."""

    what: str
    tensors: int
    params: int
    names: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "what": self.what,
            "tensors": self.tensors,
            "params": self.params,
            "names": list(self.names),
        }


@dataclass(frozen=True)
class Coverage:
    """Which of the blocks' weights are pruned, per kind (`kinds`, in `KINDS` order), which are
    not (`unprunable`), what is excluded by design (`excluded`), and each block's parameter count
    (`block_params`)."""

    kinds: tuple[KindCoverage, ...]
    unprunable: tuple[Unprunable, ...]
    excluded: tuple[Excluded, ...]
    block_params: tuple[int, ...]

    @classmethod
    def of(cls, adapter: ModelAdapter) -> Coverage:
        total = dict.fromkeys(KINDS, 0)
        pruned = dict.fromkeys(KINDS, 0)
        unprunable: list[Unprunable] = []
        # sort -> (name, parameters; None for a tied alias of a tensor named before)
        excluded: dict[str, list[tuple[str, int | None]]] = {}
        block_params: list[int] = []
        in_blocks: set[int] = set()
        for i, block in enumerate(adapter.blocks):
            covered = _pruned_weights(adapter, i)
            params = list(block.named_parameters())
            n_block = sum(p.numel() for _, p in params)
            block_params.append(n_block)
            prefix = adapter.full_name(i, "")
            for name, p in params:
                in_blocks.add(id(p))
                owner_name = name.rpartition(".")[0]
                owner = block.get_submodule(owner_name)
                if p.dim() < 2 or name.endswith("bias"):
                    excluded.setdefault(NORMS, []).append((prefix + name, p.numel()))
                elif id(p) in covered:
                    kind = kind_of(covered[id(p)])
                    total[kind] += p.numel()
                    pruned[kind] += p.numel()
                elif is_router(owner_name, owner):
                    excluded.setdefault(ROUTERS, []).append((prefix + name, p.numel()))
                else:
                    kind = kind_of(name)
                    total[kind] += p.numel()
                    unknown = is_fused_experts(owner) and not layout_known(owner)
                    unprunable.append(
                        Unprunable(
                            prefix + name,
                            i,
                            kind,
                            tuple(p.shape),
                            p.numel(),
                            p.numel() / n_block,
                            unknown,
                        )
                    )
        _outside(adapter.model, in_blocks, excluded)
        order = (EMBEDDINGS, LM_HEAD, NORMS, ROUTERS, OUTSIDE)
        return cls(
            kinds=tuple(KindCoverage(k, total[k], pruned[k]) for k in KINDS),
            unprunable=tuple(unprunable),
            excluded=tuple(
                Excluded(
                    w,
                    sum(n is not None for _, n in excluded[w]),
                    sum(n or 0 for _, n in excluded[w]),
                    _names(excluded[w]),
                )
                for w in order
                if w in excluded
            ),
            block_params=tuple(block_params),
        )

    # ------------------------------------------------------------------ totals
    @property
    def total(self) -> int:
        """The blocks' weights (routers excluded): pruned and unprunable."""
        return sum(k.total for k in self.kinds)

    @property
    def pruned(self) -> int:
        return sum(k.pruned for k in self.kinds)

    @property
    def fraction(self) -> float:
        """The fraction of the blocks' weights (routers excluded) that trimprune prunes."""
        return self.pruned / self.total if self.total else 0.0

    def kind(self, kind: str) -> KindCoverage:
        return next(k for k in self.kinds if k.kind == kind)

    def block_share(self, block: int) -> float:
        """The share of `block`'s parameters held by its unprunable weights."""
        n = sum(u.numel for u in self.unprunable if u.block == block)
        return n / self.block_params[block] if self.block_params[block] else 0.0

    def refused(self) -> list[Unprunable]:
        """The unprunable weights that stop a run without --allow-unpruned: those of a block where
        they are more than `THRESHOLD` of its parameters, and fused experts of an unknown
        layout."""
        over = {b for b in range(len(self.block_params)) if self.block_share(b) > THRESHOLD}
        return [u for u in self.unprunable if u.block in over or u.unknown_layout]

    def summary(self) -> str:
        """``pruned 100.0 % of block weights (attention 100 %, experts 100 %)`` (`summary_of`)."""
        return summary_of(self.to_dict())

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "pruned": self.pruned,
            "fraction": self.fraction,
            "kinds": {k.kind: k.to_dict() for k in self.kinds},
            "unprunable": [u.to_dict() for u in self.unprunable],
            "excluded_by_design": [e.to_dict() for e in self.excluded],
            "threshold": THRESHOLD,
        }


def summary_of(coverage: dict) -> str:
    """One phrase from a `Coverage.to_dict()` (as report.json holds it): the pruned fraction of the
    blocks' weights and of each kind present, and how many weights were left dense."""
    parts = ", ".join(
        f"{LABELS.get(k, k)} {100 * v['fraction']:.4g} %"
        for k, v in coverage["kinds"].items()
        if v["total"]
    )
    text = f"pruned {100 * coverage['fraction']:.1f} % of block weights ({parts})"
    left = coverage["unprunable"]
    if left:
        n = sum(u["params"] for u in left)
        text += (
            f"; {len(left)} weight{'s' * (len(left) > 1)} left dense ({n} parameters, listed in "
            "the report)"
        )
    return text


def check_coverage(coverage: Coverage, allow_unpruned: bool) -> None:
    """Refuse, in one line naming the weights (the first three and how many more) and their shares,
    a model whose blocks hold weights trimprune cannot prune above `THRESHOLD` of a block's
    parameters, or fused experts of an unknown layout; with `allow_unpruned` they are left dense
    (the report lists them)."""
    refused = coverage.refused()
    if not refused or allow_unpruned:
        return
    shown = ", ".join(u.describe() for u in refused[:3])
    more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
    blocks = {u.block for u in refused}
    why = []
    if any(coverage.block_share(b) > THRESHOLD for b in blocks):
        why.append(f"more than {100 * THRESHOLD:g} % of a block's parameters")
    if any(u.unknown_layout for u in refused):
        why.append("fused experts of an unknown layout")
    raise TrimpruneError(
        f"{len(refused)} weight{'s' * (len(refused) > 1)} in {len(blocks)} of "
        f"{len(coverage.block_params)} blocks that trimprune cannot prune ({' and '.join(why)}): "
        f"{shown}{more}; pass {{allow_unpruned}} to prune the rest and leave them dense (the "
        "report lists them)"
    )


# ------------------------------------------------------------------------------------ helpers
def _pruned_weights(adapter: ModelAdapter, block: int) -> dict[int, str]:
    """id(parameter) -> its linear's name inside the block, for every weight `linears` prunes (a
    fused experts parameter once, for all its `ExpertLinear` views)."""
    out: dict[int, str] = {}
    for name, mod in adapter.linears(block).items():
        if isinstance(mod, ExpertLinear):
            out.setdefault(id(getattr(mod.owner, mod.param)), name)
        else:
            out.setdefault(id(mod.weight), name)
    return out


def _outside(
    model: nn.Module, in_blocks: set[int], excluded: dict[str, list[tuple[str, int | None]]]
) -> None:
    """The parameters outside the decoder blocks, each tensor once (a tied ``lm_head`` is named
    as an alias of the embedding it shares)."""
    get_heads = getattr(model, "get_output_embeddings", None)
    heads = get_heads() if callable(get_heads) else None
    head_ids = {id(p) for p in heads.parameters()} if isinstance(heads, nn.Module) else set()
    embed_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            embed_ids |= {id(p) for p in m.parameters(recurse=False)}
    seen: dict[int, tuple[str, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in in_blocks:
            continue
        if id(p) in seen:  # a tied parameter: named once more, counted once
            what, first = seen[id(p)]
            excluded[what].append((f"{name} (= {first})", None))
            continue
        if id(p) in embed_ids:
            what = EMBEDDINGS
        elif id(p) in head_ids:
            what = LM_HEAD
        elif p.dim() < 2 or name.endswith("bias"):
            what = NORMS
        else:
            what = OUTSIDE
        seen[id(p)] = (what, name)
        excluded.setdefault(what, []).append((name, p.numel()))


def _names(entries: list[tuple[str, int | None]], limit: int = 8) -> tuple[str, ...]:
    """The first `limit` names, then how many more."""
    names = [n for n, _ in entries]
    if len(names) <= limit:
        return tuple(names)
    return (*names[:limit], f"... and {len(names) - limit} more")
