"""TRIM's output-quality metrics between dense outputs Y = W X and pruned outputs Y' = W' X.

Definitions follow the TRIM reference (flobk/TRIM lib/trim.py): rows of Y are output dimensions,
columns are tokens, metrics are computed in float64, "bigger is better" (errors are negated).
Every metric is a function of the row statistics an evaluator (`evaluators.py`) returns:
    yy_r = ||y_r||^2,  c_r = <y_r, y'_r>,  q_r = ||y'_r||^2,  err_r = ||y_r - y'_r||^2,  T tokens,
and, for the metrics that need them (mae, psnr_*, cosim_sample), the outputs Y, Y' themselves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass(frozen=True)
class RowStats:
    """Per-row statistics of dense vs pruned outputs (leading candidate dims x rows), over T tokens;
    Y, Y' (... x rows x T) only from explicit inputs."""

    yy: torch.Tensor
    c: torch.Tensor
    q: torch.Tensor
    err: torch.Tensor
    T: int
    Y: torch.Tensor | None = None
    Yp: torch.Tensor | None = None

    def map(self, fn) -> RowStats:
        """fn applied to every tensor field."""
        return dataclasses.replace(
            self,
            **{
                f.name: fn(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def _cos(c, na, nb):
    """Reference cosine: sum(a/(|a|+1e-8) * b/(|b|+1e-8)) clamped to [-1, 1]."""
    return torch.clamp(c / ((na + EPS) * (nb + EPS)), -1.0, 1.0)


def layer_metric(name: str, st: RowStats) -> torch.Tensor:
    """Layer metric (shape = leading candidate dims) from row statistics `st`."""
    yy, c, q, err, T = st.yy, st.c, st.q, st.err, st.T
    rows = yy.shape[-1]
    if name == "cosim_flat":
        return _cos(c.sum(-1), yy.sum(-1).sqrt(), q.sum(-1).sqrt())
    if name == "cosim_dim":
        return _cos(c, yy.sqrt(), q.sqrt()).mean(-1)
    if name in ("mse", "mse_dim"):
        return -(err.sum(-1) / (rows * T))
    if name == "snr":
        signal = yy.sum(-1).expand_as(err.sum(-1)) / (rows * T)
        noise = err.sum(-1) / (rows * T)
        out = 10 * torch.log10(signal / (noise + 1e-10))
        return torch.where(noise < 1e-10, torch.full_like(out, math.inf), out)
    if st.Y is None:
        raise ValueError(f"metric {name} needs explicit outputs")
    Y, Yp = st.Y, st.Yp
    assert Yp is not None  # set together with Y
    if name == "cosim_sample":
        na = torch.linalg.vector_norm(Y, dim=-2)
        nb = torch.linalg.vector_norm(Yp, dim=-2)
        return _cos((Y * Yp).sum(-2), na, nb).mean(-1)
    if name == "mae":
        return -(Y - Yp).abs().mean(dim=(-1, -2))
    d2 = (Y - Yp).square()
    if name == "psnr_flat":
        peak = Y.square().amax(dim=(-1, -2))
        return 10 * torch.log10(peak / (d2.mean(dim=(-1, -2)) + 1e-10))
    if name == "psnr_dim":
        return dim_metric("psnr", st).mean(-1)
    if name == "psnr_sample":
        peak = Y.square().amax(dim=-2)
        return (10 * torch.log10(peak / (d2.mean(dim=-2) + 1e-10))).mean(-1)
    raise ValueError(f"unknown layer metric {name}")


def dim_metric(name: str, st: RowStats) -> torch.Tensor:
    """Per-output-row quality (shape = candidate dims x rows)."""
    if name == "cosim":
        return _cos(st.c, st.yy.sqrt(), st.q.sqrt())
    if name == "mse":
        return -(st.err / st.T)
    if name == "psnr":
        Y, Yp = st.Y, st.Yp
        assert Y is not None and Yp is not None  # psnr needs explicit outputs
        peak = Y.square().amax(dim=-1)
        return 10 * torch.log10(peak / ((Y - Yp).square().mean(-1) + 1e-10))
    raise ValueError(f"unknown dimension-wise metric {name}")
