"""The TRIM search's parameters, as the search reads them (`TrimConfig` holds them for users)."""

from __future__ import annotations

from dataclasses import dataclass

from trimprune.config import TrimConfig


@dataclass(frozen=True)
class TrimSettings:
    """The search's parameters (`TrimConfig` holds them for users; this is what the search
    reads)."""

    iterations: int = 10
    layer_metric: str = "cosim_flat"
    dim_metric: str = "cosim"
    lrs: tuple = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
    neg_lrs: tuple = (-0.01, -0.02, -0.04)
    forbid_neg_lr: bool = False
    max_row_sparsity: float = 0.95
    # how a sparsity vector becomes per-row counts inside the search:
    #   "floor": floor(in * x_r) as the reference (non-uniform vectors then prune fewer weights);
    #   "exact": round half to even, clamped (unbiased: candidates compare at the same sparsity).
    rounding: str = "exact"
    lr_search: str = "auto"  # parallel | sequential | auto (parallel where the batch is cheap)

    @classmethod
    def from_config(cls, cfg: TrimConfig) -> TrimSettings:
        return cls(
            iterations=cfg.iterations,
            layer_metric=cfg.metric,
            dim_metric=cfg.dim_metric,
            lrs=tuple(cfg.lrs),
            neg_lrs=tuple(cfg.neg_lrs),
            forbid_neg_lr=cfg.forbid_neg_lr,
            max_row_sparsity=cfg.max_row_sparsity,
            rounding="floor" if cfg.input_mode.mode == "last-token" else "exact",
            lr_search=cfg.lr_search,
        )

    @property
    def all_lrs(self) -> tuple:
        """The positive rates, then the negative ones (tried only when no positive rate beats
        uniform)."""
        return tuple(self.lrs) + (() if self.forbid_neg_lr else tuple(self.neg_lrs))
