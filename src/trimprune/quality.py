"""Output-quality metrics between dense outputs Y = W X and pruned outputs Y' = W' X.

Definitions follow the TRIM reference (flobk/TRIM lib/trim.py): rows of Y are output dimensions,
columns are tokens, metrics are computed in float64, "bigger is better" (errors are negated).

The cosine and squared-error metrics only need, per output row r,
    yy_r = ||w_r X||^2 = w_r G w_r^T,   c_r = <w_r X, w'_r X> = w_r G w'_r^T,
    q_r = ||w'_r X||^2 = w'_r G w'_r^T, err_r = ||(w_r - w'_r) X||^2 = e_r G e_r^T
with G = X^T X. `GramEvaluator` computes them from G accumulated over ALL calibration tokens (cost
independent of the number of tokens); `ExplicitEvaluator` computes them, and the metrics that need
the outputs themselves (mae, psnr_*, cosim_sample), from explicit inputs (last tokens or a subsample).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .graphs import mm_out_dtype_ok

EPS = 1e-8


# ---------------------------------------------------------------------------- formulas
def _cos(c, na, nb):
    """Reference cosine: sum(a/(|a|+1e-8) * b/(|b|+1e-8)) clamped to [-1, 1]."""
    return torch.clamp(c / ((na + EPS) * (nb + EPS)), -1.0, 1.0)


def layer_metric(name: str, st: dict) -> torch.Tensor:
    """Layer metric (shape = leading candidate dims) from row statistics `st`."""
    yy, c, q, err, T = st["yy"], st["c"], st["q"], st["err"], st["T"]
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
    if "Y" not in st:
        raise ValueError(f"metric {name} needs explicit outputs")
    Y, Yp = st["Y"], st["Yp"]
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


def dim_metric(name: str, st: dict) -> torch.Tensor:
    """Per-output-row quality (shape = candidate dims x rows)."""
    if name == "cosim":
        return _cos(st["c"], st["yy"].sqrt(), st["q"].sqrt())
    if name == "mse":
        return -(st["err"] / st["T"])
    if name == "psnr":
        Y, Yp = st["Y"], st["Yp"]
        peak = Y.square().amax(dim=-1)
        return 10 * torch.log10(peak / ((Y - Yp).square().mean(-1) + 1e-10))
    raise ValueError(f"unknown dimension-wise metric {name}")


# ---------------------------------------------------------------------------- evaluators
@contextlib.contextmanager
def _matmul_precision(precision: str):
    if precision != "tf32":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class GramEvaluator:
    """Row statistics of W vs W' = W - E from G = X^T X over all N calibration tokens."""

    explicit = False

    def __init__(self, gram: torch.Tensor, n_tokens: int, precision: str = "fp32"):
        self.G = gram
        self.T = n_tokens
        self.precision = precision
        self._Gb = None

    def prepare(self, W: torch.Tensor) -> None:
        self.W = W.to(self.G.dtype)
        self.A = self.W @ self.G                                   # (rows, in): W G
        self.yy = (self.A * self.W).sum(-1, dtype=torch.float64)   # ||w_r X||^2

    def _eg(self, E: torch.Tensor) -> torch.Tensor:
        if self.precision == "bf16" and E.is_cuda:
            if self._Gb is None:
                self._Gb = self.G.to(torch.bfloat16)
            Eb = E.to(torch.bfloat16)
            if mm_out_dtype_ok(E.device):
                return torch.mm(Eb.reshape(-1, Eb.shape[-1]), self._Gb, out_dtype=torch.float32).reshape(E.shape)
            return torch.matmul(Eb, self._Gb).float()
        with _matmul_precision(self.precision):
            return torch.matmul(E, self.G)

    def stats_from_error(self, E: torch.Tensor) -> dict:
        """E = W - W' (the pruned-away part), any leading candidate dims."""
        E = E.to(self.G.dtype)
        err = (self._eg(E) * E).sum(-1, dtype=torch.float64)       # e G e^T
        wge = (self.A * E).sum(-1, dtype=torch.float64)            # w G e^T
        c = self.yy - wge
        q = self.yy - 2 * wge + err
        return {"yy": self.yy, "c": c, "q": q.clamp_min(0.0), "err": err.clamp_min(0.0), "T": self.T}

    def stats_from_mask(self, mask: torch.Tensor) -> dict:
        return self.stats_from_error(self.W * mask)

    def stats_from_weight(self, Wp: torch.Tensor) -> dict:
        return self.stats_from_error(self.W - Wp.to(self.W.dtype))


class ExplicitEvaluator:
    """Row statistics and outputs from an explicit input matrix X (in_features x T)."""

    explicit = True

    def __init__(self, X: torch.Tensor):
        self.X = X
        self.T = X.shape[1]

    def prepare(self, W: torch.Tensor) -> None:
        self.W = W.to(self.X.dtype)
        self.Y = self.W @ self.X
        self.Y64 = self.Y.double()

    def stats_from_weight(self, Wp: torch.Tensor) -> dict:
        Yp = torch.matmul(Wp.to(self.X.dtype), self.X).double()
        Y = self.Y64
        return {"yy": Y.square().sum(-1), "c": (Y * Yp).sum(-1), "q": Yp.square().sum(-1),
                "err": (Y - Yp).square().sum(-1), "T": self.T, "Y": Y, "Yp": Yp}

    def stats_from_mask(self, mask: torch.Tensor) -> dict:
        return self.stats_from_weight(self.W * ~mask)
