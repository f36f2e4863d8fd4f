"""Typed records of what the pruning decided: per linear, per TRIM search, per block safeguard.

`to_dict()` gives the JSON form written to report.json; `from_dict()` reads it back (the resume
state of an interrupted run keeps each finished block's records this way, so the round trip is
exact: floats are written with `repr`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class Kept(str, enum.Enum):
    """Which allocation a TRIM-searched linear ended with."""

    TRIM = "trim"
    SAFEGUARD = "scorer_alone (safeguard)"  # its layer metric was worse than the scorer alone
    BLOCK_SAFEGUARD = (
        "scorer_alone (block safeguard)"  # its block was closer to the dense model without TRIM
    )

    @classmethod
    def of(cls, linear_keeps_trim: bool, block_keeps_trim: bool) -> Kept:
        if not linear_keeps_trim:
            return cls.SAFEGUARD
        return cls.TRIM if block_keeps_trim else cls.BLOCK_SAFEGUARD


class BlockChoice(str, enum.Enum):
    """The block safeguard's choice for a block."""

    TRIM = "trim"
    SCORER_ALONE = "scorer_alone"


@dataclass(frozen=True)
class Reconstruction:
    """What SparseGPT's solver did for one linear."""

    percdamp_used: float
    damp_retries: int
    fallback: str | None
    dead_columns: int
    obs_loss: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Reconstruction:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class SearchSummary:
    """One TRIM search: the layer metric at uniform row sparsity (baseline), the best found, the
    metric of the final integer allocation, the learning rate and iteration kept (None / 0:
    uniform), the variance of the per-row cosines before / after, and the final row sparsities."""

    baseline_metric: float
    best_metric: float
    final_metric: float
    lr: float | None
    best_iter: int
    row_quality_var_before: float
    row_quality_var_after: float
    row_sparsity_min: float
    row_sparsity_mean: float
    row_sparsity_max: float
    lr_candidates: dict[float, float]  # learning rate -> best metric of that rate (rates evaluated)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_candidates"] = {str(k): v for k, v in self.lr_candidates.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchSummary:
        """From `to_dict()`'s form (extra keys, e.g. a `TrimRecord`'s, are ignored)."""
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls)}
        kw["lr_candidates"] = {float(k): v for k, v in d["lr_candidates"].items()}
        return cls(**kw)


@dataclass(frozen=True)
class TrimRecord:
    """A TRIM-searched linear: its search, the metric of TRIM's (reconstructed) weights, the scorer
    alone's metric when the safeguard compared them, and what was kept."""

    search: SearchSummary
    metric: str
    trim_weights_metric: float
    kept: Kept
    scorer_alone_metric: float | None = None

    def to_dict(self) -> dict:
        d = self.search.to_dict() | {
            "metric": self.metric,
            "trim_weights_metric": self.trim_weights_metric,
            "kept": self.kept.value,
        }
        if self.scorer_alone_metric is not None:
            d["scorer_alone_metric"] = self.scorer_alone_metric
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrimRecord:
        return cls(
            SearchSummary.from_dict(d),
            d["metric"],
            d["trim_weights_metric"],
            Kept(d["kept"]),
            d.get("scorer_alone_metric"),
        )


@dataclass(frozen=True)
class LinearRecord:
    """One pruned linear: where it is, its target, the achieved mask, and TRIM / solver details."""

    block: int
    name: str  # inside the block, e.g. self_attn.q_proj
    shape: tuple[int, int]  # (out_features, in_features)
    target_sparsity: float
    group: tuple[str, ...]  # the linears that read the same input
    zeros: int
    row_sparsity_min: float
    row_sparsity_max: float
    row_sparsity_std: float
    trim: TrimRecord | None = None
    scorer_info: Reconstruction | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel

    def to_dict(self) -> dict:
        d = {
            "block": self.block,
            "name": self.name,
            "shape": list(self.shape),
            "target_sparsity": self.target_sparsity,
            "group": list(self.group),
            "zeros": self.zeros,
            "numel": self.numel,
            "sparsity": self.sparsity,
            "row_sparsity_min": self.row_sparsity_min,
            "row_sparsity_max": self.row_sparsity_max,
            "row_sparsity_std": self.row_sparsity_std,
        }
        if self.trim is not None:
            d["trim"] = self.trim.to_dict()
        if self.scorer_info is not None:
            d["scorer_info"] = self.scorer_info.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LinearRecord:
        """From `to_dict()`'s form (`numel` and `sparsity` are derived, not read)."""
        return cls(
            d["block"],
            d["name"],
            tuple(d["shape"]),
            d["target_sparsity"],
            tuple(d["group"]),
            d["zeros"],
            d["row_sparsity_min"],
            d["row_sparsity_max"],
            d["row_sparsity_std"],
            TrimRecord.from_dict(d["trim"]) if d.get("trim") is not None else None,
            Reconstruction.from_dict(d["scorer_info"])
            if d.get("scorer_info") is not None
            else None,
        )


@dataclass(frozen=True)
class BlockSafeguardRecord:
    """The block safeguard of one block: squared distance to the dense model's block output on the
    safeguard's sequences with TRIM and with the scorer alone, the choice, and the linears concerned
    (those whose own safeguard kept TRIM)."""

    block: int
    err_trim: float
    err_scorer_alone: float
    kept: BlockChoice
    linears: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "block": self.block,
            "err_trim": self.err_trim,
            "err_scorer_alone": self.err_scorer_alone,
            "kept": self.kept.value,
            "linears": list(self.linears),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BlockSafeguardRecord:
        return cls(
            d["block"],
            d["err_trim"],
            d["err_scorer_alone"],
            BlockChoice(d["kept"]),
            tuple(d["linears"]),
        )
