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
from .kernels import kernel_available, pruned_cross

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


class _Batching:
    """Evaluators work on a leading batch of linears P and a candidate dimension L:
    W (P, rows, in); masks / weights (P, L, rows, in) -> statistics (P, L, rows). Unbatched inputs
    (W of shape (rows, in), candidates (L, rows, in) or (rows, in)) are accepted and squeezed back."""

    def _begin(self, W: torch.Tensor) -> torch.Tensor:
        self.batched = W.dim() == 3
        return W if self.batched else W.unsqueeze(0)

    def _lift(self, E: torch.Tensor):
        """-> (P, L, rows, in) and how to squeeze the results."""
        squeeze_l = False
        if not self.batched:
            E = E.unsqueeze(0)
        if E.dim() == 3:
            E = E.unsqueeze(1)
            squeeze_l = True
        return E, squeeze_l

    def _w_like(self, cand: torch.Tensor) -> torch.Tensor:
        """The prepared W, broadcastable against candidate masks / weights `cand`."""
        W = self.W if self.batched else self.W[0]
        return W.unsqueeze(-3) if cand.dim() == W.dim() + 1 else W

    def _drop(self, st: dict, squeeze_l: bool) -> dict:
        out = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                if squeeze_l:
                    v = v.squeeze(1)
                if not self.batched:
                    v = v.squeeze(0)
            out[k] = v
        return out


class _MaskCounts:
    def stats_from_counts(self, k: torch.Tensor, ranks: torch.Tensor) -> dict:
        """Statistics when row r of each candidate prunes its k[r] least important weights
        (k (P, L, rows), ranks (P, rows, in))."""
        return self.stats_from_mask(ranks.unsqueeze(-3) < k.unsqueeze(-1))


class GramEvaluator(_Batching, _MaskCounts):
    """Row statistics of W vs W' = W - E from G = X^T X over all N calibration tokens.

    For candidates given as per-row counts over a fixed importance order (`stats_from_counts`, the
    TRIM search), both terms that depend on the pruned set come from prefix tables built once per
    matrix: w G e^T (linear in e) and e G e^T = sum over the pruned a of w_a (w_a G_aa + 2 c_a)
    (kernels.py). Every candidate of every iteration then costs two gathers, not an (rows x in x in)
    product. `tables`: "on", "off" (form E and E G per candidate), or "auto" (on where the cross term
    has its Triton kernel: CUDA, float32 G; on a CPU the per-candidate products are cheaper)."""

    explicit = False

    def __init__(self, gram: torch.Tensor, n_tokens: int, precision: str = "fp32", tables: str = "auto"):
        self.G = gram                                 # (in, in) or (P, in, in)
        self.T = n_tokens
        self.precision = precision
        if tables not in ("auto", "on", "off"):
            raise ValueError(f"tables={tables!r}: use 'auto', 'on' or 'off'")
        self.tables = tables

    # "auto" builds the tables for matrices up to this many rows x in x in: building costs about as much
    # as ~100 tensor-core evaluations of E G, so large matrices (compute-bound, searched rate after rate)
    # are cheaper without them, small ones (where E G per candidate is launch- and memory-bound) with them
    TABLE_MAX_WORK = 2**31

    def counts_from_tables(self, rows: int | None = None) -> bool:
        """Whether `stats_from_counts` reads prefix tables (cheap per candidate) for matrices of `rows`
        rows (default: as prepared; unknown counts as small)."""
        if self.tables == "auto":
            if rows is None:
                rows = self.W.shape[-2] if getattr(self, "W", None) is not None else 0
            n = self.G.shape[-1]
            return kernel_available(self.G) and rows * n * n <= self.TABLE_MAX_WORK
        return self.tables == "on"

    def _mm(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """X (P, M, in) @ G (P, in, in) in float32 out, with the evaluator's matmul precision
        (bf16: half inputs with float32 accumulation and output)."""
        if self.precision == "bf16" and X.is_cuda:
            Xb = X if X.dtype == torch.bfloat16 else X.to(torch.bfloat16)
            Gb = G if G.dtype == torch.bfloat16 else G.to(torch.bfloat16)
            if mm_out_dtype_ok(X.device):
                return torch.bmm(Xb, Gb, out_dtype=torch.float32)
            return torch.bmm(Xb, Gb).float()
        with _matmul_precision(self.precision):
            return torch.matmul(X, G)

    def prepare(self, W: torch.Tensor) -> None:
        W3 = self._begin(W)
        G3 = self.G if self.G.dim() == 3 else self.G.unsqueeze(0)
        self.G3 = G3
        self.W = W3.to(G3.dtype)
        P, R, N = self.W.shape
        # w G: float32 (tf32 in the bf16 speed mode), the anchor of yy and <y, y'>
        with _matmul_precision("tf32" if self.precision == "bf16" else "fp32"):
            self.A = torch.matmul(self.W, G3.expand(P, N, N))                  # W G        (P, rows, in)
        self.AW = self.A * self.W
        self.yy = self.AW.sum(-1, dtype=torch.float64)                         # ||w_r X||^2 (P, rows)
        self._Gb = self._Wb = None
        # prefix sums of AW in the order of `_ranks`, and their flat row offsets (stats_from_counts)
        self._ranks = self._table = self._base = None

    def _eg(self, E: torch.Tensor) -> torch.Tensor:
        """E G for E (P, L, rows, in)."""
        P, L, R, N = E.shape
        if self.precision == "bf16" and E.is_cuda and self._Gb is None:
            self._Gb = self.G3.to(torch.bfloat16)
        G = self._Gb if self._Gb is not None and E.is_cuda else self.G3
        return self._mm(E.reshape(P, L * R, N), G.expand(P, N, N)).reshape(E.shape)

    def stats_from_error(self, E: torch.Tensor, wge: torch.Tensor | None = None) -> dict:
        """E = W - W' (the pruned-away part); `wge` = w G e^T when already known."""
        if E.dtype != torch.bfloat16:
            E = E.to(self.G3.dtype)
        E, sq = self._lift(E)
        prod = self._eg(E) * E
        # e G e^T; on a GPU E G is a tf32 / bf16 product, far less exact than a float32 row sum
        err = prod.sum(-1).double() if prod.is_cuda and prod.dtype == torch.float32 else \
            prod.sum(-1, dtype=torch.float64)
        if wge is None:
            wge = (self.A.unsqueeze(1) * E).sum(-1, dtype=torch.float64)     # w G e^T
        return self._drop(self._assemble(err, wge), sq)

    def _assemble(self, err: torch.Tensor, wge: torch.Tensor) -> dict:
        yy = self.yy.unsqueeze(1)
        return {"yy": yy, "c": yy - wge, "q": (yy - 2 * wge + err).clamp_min(0.0), "err": err.clamp_min(0.0),
                "T": self.T}

    def count_tables(self):
        """The prefix tables (2, P, rows, in + 1) of w G e^T and e G e^T, once `stats_from_counts` has
        built them with the quadratic table, else None."""
        t = getattr(self, "_table", None)
        return t if t is not None and t.shape[0] == 2 else None

    def stats_from_counts(self, k: torch.Tensor, ranks: torch.Tensor) -> dict:
        """Row r prunes its k[r] least important weights (k (P, L, rows), ranks (P, rows, in)).
        w G e^T — linear in the pruned set — comes from prefix sums of (w G) * w in importance order;
        e G e^T from the quadratic prefix table (class docstring) or, with tables off, from E (one
        fused select) and the product E G."""
        if not (self.batched and k.dim() == 3 and ranks.dim() == 3):
            return super().stats_from_counts(k, ranks)
        P, R, N = ranks.shape
        quad = self.counts_from_tables(R)
        if self._ranks is not ranks:
            order = torch.empty_like(ranks, dtype=torch.long)
            order.scatter_(-1, ranks.long(), torch.arange(N, device=ranks.device).expand(P, R, N))
            terms = self.AW.unsqueeze(0)
            if quad:
                G = self.G3.expand(P, N, N)
                cross = pruned_cross(self.W, ranks, G).to(self.W.dtype)
                diag = torch.diagonal(G, dim1=-2, dim2=-1).unsqueeze(-2)
                terms = torch.stack([self.AW, self.W * (self.W * diag + 2 * cross)])
            cum = torch.cumsum(torch.gather(terms, -1, order.expand_as(terms)).double(), -1)
            # (tables, P, rows, in + 1): prefix sums for k = 0..in of w G e^T (and e G e^T)
            self._table = torch.cat([cum.new_zeros(*cum.shape[:-1], 1), cum], -1).contiguous()
            self._base = None
            self._ranks = ranks
        kk = k.clamp(0, N)
        # table[p, r, kk[p, l, r]] by flat index (a gather on the expanded table would copy it per candidate)
        if self._base is None:
            self._base = (torch.arange(P * R, device=k.device) * (N + 1)).view(P, 1, R)
        flat = self._table.view(self._table.shape[0], -1)
        wge = flat[0][self._base + kk]
        if quad:
            return self._assemble(flat[1][self._base + kk], wge)
        Wsrc = self.W
        if self.precision == "bf16" and self.W.is_cuda:
            if self._Wb is None:
                self._Wb = self.W.to(torch.bfloat16)
            Wsrc = self._Wb
        E = torch.where(ranks.unsqueeze(1) < kk.to(ranks.dtype).unsqueeze(-1), Wsrc.unsqueeze(1), 0.0)
        return self.stats_from_error(E, wge)

    def stats_from_mask(self, mask: torch.Tensor) -> dict:
        W = self._w_like(mask)
        return self.stats_from_error(torch.where(mask, W, W.new_zeros(())))

    def stats_from_weight(self, Wp: torch.Tensor) -> dict:
        W = self._w_like(Wp)
        return self.stats_from_error(W - Wp.to(W.dtype))


class ExplicitEvaluator(_Batching, _MaskCounts):
    """Row statistics and outputs from explicit inputs X (in_features x T, or P of them)."""

    explicit = True

    def __init__(self, X: torch.Tensor):
        self.X = X
        self.T = X.shape[-1]

    def prepare(self, W: torch.Tensor) -> None:
        W3 = self._begin(W)
        X3 = self.X if self.X.dim() == 3 else self.X.unsqueeze(0)
        self.X3 = X3
        self.W = W3.to(X3.dtype)
        self.Y = torch.matmul(self.W, X3)
        self.Y64 = self.Y.double()

    def stats_from_weight(self, Wp: torch.Tensor) -> dict:
        Wp, sq = self._lift(Wp)
        P, L, R, N = Wp.shape
        Yp = torch.matmul(Wp.to(self.X3.dtype).reshape(P, L * R, N),
                          self.X3.expand(P, N, self.T)).reshape(P, L, R, self.T).double()
        Y = self.Y64.unsqueeze(1)
        st = {"yy": Y.square().sum(-1), "c": (Y * Yp).sum(-1), "q": Yp.square().sum(-1),
              "err": (Y - Yp).square().sum(-1), "T": self.T, "Y": Y, "Yp": Yp}
        return self._drop(st, sq)

    def stats_from_mask(self, mask: torch.Tensor) -> dict:
        W = self._w_like(mask)
        return self.stats_from_weight(torch.where(mask, W.new_zeros(()), W))


class ObsEvaluator:
    """Predicted statistics of SparseGPT-reconstructed weights, for TRIM's search with SparseGPT.

    With least-squares reconstruction the pruned output y' is the projection of y, so
    <y, y'> = ||y'||^2 and ||y||^2 = ||y'||^2 + err. OBS gives err for pruning the k least salient
    weights of a row as the prefix sum of the saliencies w_j^2 / [U]_jj^2 (Frantar & Alistarh 2023,
    Eq. 3-4). `table` (P, rows, in + 2) holds those prefix sums for k = 0..in and, last, yy_r = w_r G w_r^T:
    then c = q = yy - err(k) for any counts k, with no matrix products at all."""

    explicit = False

    def __init__(self, table: torch.Tensor, n_tokens: int):
        self.table = table if table.dim() == 3 else table.unsqueeze(0)
        self.T = n_tokens

    def prepare(self, W: torch.Tensor) -> None:
        pass

    @staticmethod
    def counts_from_tables(rows: int | None = None) -> bool:
        return True

    def stats_from_counts(self, k: torch.Tensor, ranks: torch.Tensor | None = None) -> dict:
        n1 = self.table.shape[-1] - 1
        yy = self.table[..., n1].unsqueeze(1)                                  # (P, 1, rows)
        cum = self.table[..., :n1].unsqueeze(1).expand(*k.shape, n1)
        err = torch.gather(cum, -1, k.clamp(0, n1 - 1).unsqueeze(-1)).squeeze(-1).clamp(min=0.0)
        err = torch.minimum(err, yy.expand_as(err))
        q = yy - err
        return {"yy": yy, "c": q, "q": q, "err": err, "T": self.T}

    @staticmethod
    def table_for(weight: torch.Tensor, saliency: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """Prefix sums of the sorted saliencies of each row, and the row's output energy."""
        srt = torch.sort(saliency.double(), dim=1, stable=True)[0]
        cum = torch.cat([torch.zeros_like(srt[:, :1]), torch.cumsum(srt, 1)], 1)      # (rows, in + 1)
        W = weight.to(gram.dtype)
        yy = ((W @ gram) * W).sum(-1, dtype=torch.float64)
        return torch.cat([cum, yy.unsqueeze(1)], 1)
