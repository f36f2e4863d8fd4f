"""Evaluators: the row statistics of TRIM's metrics (metrics.py) for candidate pruned weights.

The cosine and squared-error metrics only need, per output row r,
    yy_r = ||w_r X||^2 = w_r G w_r^T,   c_r = <w_r X, w'_r X> = w_r G w'_r^T,
    q_r = ||w'_r X||^2 = w'_r G w'_r^T, err_r = ||(w_r - w'_r) X||^2 = e_r G e_r^T
with G = X^T X. `GramEvaluator` computes them from G accumulated over ALL calibration tokens (cost
independent of the number of tokens); `ExplicitEvaluator` computes them, and the outputs the other
metrics need, from explicit inputs (last tokens or a subsample); `ObsEvaluator` predicts them for
SparseGPT-reconstructed weights. An `EvaluatorSpec` names an evaluator (it keys cached graphs) and
builds it for a source tensor.

For candidates given as per-row counts over a fixed importance order, e G e^T has an exact prefix
form: pruning the k least important weights of a row leaves e_k with

    e_k G e_k^T = sum_{rank(a) < k} w_a (w_a G_aa + 2 c_a),
    c_a = sum_{b: rank(b) < rank(a)} G_ab w_b,

so one pass over G per row (`pruned_cross`) gives e G e^T for EVERY k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trimprune.algo.trim.metrics import RowStats
from trimprune.core.linalg import mm_f32
from trimprune.core.runtime import EAGER, Executor


def pruned_cross(
    W: torch.Tensor, ranks: torch.Tensor, G: torch.Tensor, chunk_elems: int = 2**24
) -> torch.Tensor:
    """c[p, r, a] = sum_b G[p, a, b] W[p, r, b] [ranks[p, r, b] < ranks[p, r, a]] (module
    docstring), rows in chunks of at most `chunk_elems` (rows x in x in) intermediate elements.
    W (P, rows, in), ranks (P, rows, in), G (P, in, in) -> (P, rows, in) in G's dtype."""
    P, R, N = W.shape
    out = torch.empty(P, R, N, dtype=G.dtype, device=W.device)
    step = max(1, chunk_elems // (N * N))
    for p in range(P):
        Gp = G[p]
        for r0 in range(0, R, step):
            rk = ranks[p, r0 : r0 + step]
            below = rk.unsqueeze(1) < rk.unsqueeze(2)  # (rows, a, b): rank b < rank a
            Mg = torch.where(below, Gp, Gp.new_zeros(()))
            out[p, r0 : r0 + step] = torch.bmm(
                Mg, W[p, r0 : r0 + step].to(G.dtype).unsqueeze(-1)
            ).squeeze(-1)
    return out


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
    (W of shape (rows, in), candidates (L, rows, in) or (rows, in)) are accepted and squeezed
    back."""

    W: torch.Tensor
    batched: bool

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

    def _drop(self, st: RowStats, squeeze_l: bool) -> RowStats:
        def drop(v):
            if squeeze_l:
                v = v.squeeze(1)
            return v if self.batched else v.squeeze(0)

        return st.map(drop)


class _MaskCounts:
    stats_from_mask: Callable[[torch.Tensor], RowStats]  # provided by the evaluator

    def stats_from_counts(self, k: torch.Tensor, ranks: torch.Tensor) -> RowStats:
        """Statistics when row r of each candidate prunes its k[r] least important weights
        (k (P, L, rows), ranks (P, rows, in))."""
        return self.stats_from_mask(ranks.unsqueeze(-3) < k.unsqueeze(-1))


class GramEvaluator(_Batching, _MaskCounts):
    """Row statistics of W vs W' = W - E from G = X^T X over all N calibration tokens.

    For candidates given as per-row counts over a fixed importance order (`stats_from_counts`, the
    TRIM search), both terms that depend on the pruned set come from prefix tables built once per
    matrix: w G e^T (linear in e) and e G e^T (module docstring). Every candidate of every iteration
    then costs two gathers, not an (rows x in x in) product. `tables`: "on", "off" (form E and E G
    per candidate), or "auto" (on where the executor accelerates `pruned_cross`, e.g. a GPU kernel
    for float32 G; elsewhere the per-candidate products are cheaper)."""

    def __init__(
        self,
        gram: torch.Tensor,
        n_tokens: int,
        precision: str = "fp32",
        tables: str = "auto",
        ex: Executor = EAGER,
    ):
        self.G = gram  # (in, in) or (P, in, in)
        self.T = n_tokens
        self.precision = precision
        if tables not in ("auto", "on", "off"):
            raise ValueError(f"tables={tables!r}: use 'auto', 'on' or 'off'")
        self.tables = tables
        self.ex = ex

    # "auto" builds the tables for matrices up to this many rows x in x in: building costs about as
    # much as ~100 tensor-core evaluations of E G, so large matrices (compute-bound, searched rate
    # after rate) are cheaper without them, small ones (where E G per candidate is launch- and
    # memory-bound) with them
    TABLE_MAX_WORK = 2**31

    def counts_from_tables(self, rows: int | None = None) -> bool:
        """Whether `stats_from_counts` reads prefix tables (cheap per candidate) for matrices of
        `rows` rows (default: as prepared; unknown counts as small)."""
        if self.tables == "auto":
            if rows is None:
                rows = self.W.shape[-2] if getattr(self, "W", None) is not None else 0
            n = self.G.shape[-1]
            G3 = self.G if self.G.dim() == 3 else self.G.unsqueeze(0)
            return rows * n * n <= self.TABLE_MAX_WORK and self.ex.accelerates(pruned_cross, G=G3)
        return self.tables == "on"

    def _mm(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """X (P, M, in) @ G (P, in, in) in float32 out, with the evaluator's matmul precision
        (bf16: half inputs with float32 accumulation and output)."""
        if self.precision == "bf16" and X.is_cuda:
            Xb = X if X.dtype == torch.bfloat16 else X.to(torch.bfloat16)
            Gb = G if G.dtype == torch.bfloat16 else G.to(torch.bfloat16)
            return self.ex.call(mm_f32, Xb, Gb)
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
            self.A = torch.matmul(self.W, G3.expand(P, N, N))  # W G        (P, rows, in)
        self.AW = self.A * self.W
        self.yy = self.AW.sum(-1, dtype=torch.float64)  # ||w_r X||^2 (P, rows)
        self._Gb: torch.Tensor | None = None
        self._Wb: torch.Tensor | None = None
        # prefix sums of AW in the order of `_ranks`, and their flat row offsets (stats_from_counts)
        self._ranks: torch.Tensor | None = None
        self._table: torch.Tensor | None = None
        self._base: torch.Tensor | None = None

    def _eg(self, E: torch.Tensor) -> torch.Tensor:
        """E G for E (P, L, rows, in)."""
        P, L, R, N = E.shape
        if self.precision == "bf16" and E.is_cuda and self._Gb is None:
            self._Gb = self.G3.to(torch.bfloat16)
        G = self._Gb if self._Gb is not None and E.is_cuda else self.G3
        return self._mm(E.reshape(P, L * R, N), G.expand(P, N, N)).reshape(E.shape)

    def stats_from_error(self, E: torch.Tensor, wge: torch.Tensor | None = None) -> RowStats:
        """E = W - W' (the pruned-away part); `wge` = w G e^T when already known."""
        if E.dtype != torch.bfloat16:
            E = E.to(self.G3.dtype)
        E, sq = self._lift(E)
        prod = self._eg(E) * E
        # e G e^T; on a GPU E G is a tf32 / bf16 product, far less exact than a float32 row sum
        err = (
            prod.sum(-1).double()
            if prod.is_cuda and prod.dtype == torch.float32
            else prod.sum(-1, dtype=torch.float64)
        )
        if wge is None:
            wge = (self.A.unsqueeze(1) * E).sum(-1, dtype=torch.float64)  # w G e^T
        return self._drop(self._assemble(err, wge), sq)

    def _assemble(self, err: torch.Tensor, wge: torch.Tensor) -> RowStats:
        yy = self.yy.unsqueeze(1)
        return RowStats(
            yy=yy,
            c=yy - wge,
            q=(yy - 2 * wge + err).clamp_min(0.0),
            err=err.clamp_min(0.0),
            T=self.T,
        )

    def count_tables(self):
        """The prefix tables (2, P, rows, in + 1) of w G e^T and e G e^T, once `stats_from_counts`
        has built them with the quadratic table, else None."""
        t = getattr(self, "_table", None)
        return t if t is not None and t.shape[0] == 2 else None

    def stats_from_counts(self, k: torch.Tensor, ranks: torch.Tensor) -> RowStats:
        """Row r prunes its k[r] least important weights (k (P, L, rows), ranks (P, rows, in)).
        w G e^T — linear in the pruned set — comes from prefix sums of (w G) * w in importance
        order; e G e^T from the quadratic prefix table (class docstring) or, with tables off, from E
        (one fused select) and the product E G."""
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
                cross = self.ex.call(pruned_cross, self.W, ranks, G).to(self.W.dtype)
                diag = torch.diagonal(G, dim1=-2, dim2=-1).unsqueeze(-2)
                terms = torch.stack([self.AW, self.W * (self.W * diag + 2 * cross)])
            cum = torch.cumsum(torch.gather(terms, -1, order.expand_as(terms)).double(), -1)
            # (tables, P, rows, in + 1): prefix sums for k = 0..in of w G e^T (and e G e^T)
            self._table = torch.cat([cum.new_zeros(*cum.shape[:-1], 1), cum], -1).contiguous()
            self._base = None
            self._ranks = ranks
        kk = k.clamp(0, N)
        # table[p, r, kk[p, l, r]] by flat index (a gather on the expanded table would copy it per
        # candidate)
        if self._base is None:
            self._base = (torch.arange(P * R, device=k.device) * (N + 1)).view(P, 1, R)
        assert self._table is not None  # built above
        flat = self._table.view(self._table.shape[0], -1)
        wge = flat[0][self._base + kk]
        if quad:
            return self._assemble(flat[1][self._base + kk], wge)
        Wsrc = self.W
        if self.precision == "bf16" and self.W.is_cuda:
            if self._Wb is None:
                self._Wb = self.W.to(torch.bfloat16)
            Wsrc = self._Wb
        E = torch.where(
            ranks.unsqueeze(1) < kk.to(ranks.dtype).unsqueeze(-1), Wsrc.unsqueeze(1), 0.0
        )
        return self.stats_from_error(E, wge)

    def stats_from_mask(self, mask: torch.Tensor) -> RowStats:
        W = self._w_like(mask)
        return self.stats_from_error(torch.where(mask, W, W.new_zeros(())))

    def stats_from_weight(self, Wp: torch.Tensor) -> RowStats:
        W = self._w_like(Wp)
        return self.stats_from_error(W - Wp.to(W.dtype))


class ExplicitEvaluator(_Batching, _MaskCounts):
    """Row statistics and outputs from explicit inputs X (in_features x T, or P of them)."""

    def __init__(self, X: torch.Tensor):
        self.X = X
        self.T = X.shape[-1]

    @staticmethod
    def counts_from_tables(rows: int | None = None) -> bool:
        return False

    @staticmethod
    def count_tables():
        return None

    def prepare(self, W: torch.Tensor) -> None:
        W3 = self._begin(W)
        X3 = self.X if self.X.dim() == 3 else self.X.unsqueeze(0)
        self.X3 = X3
        self.W = W3.to(X3.dtype)
        self.Y = torch.matmul(self.W, X3)
        self.Y64 = self.Y.double()

    def stats_from_weight(self, Wp: torch.Tensor) -> RowStats:
        Wp, sq = self._lift(Wp)
        P, L, R, N = Wp.shape
        Yp = (
            torch.matmul(Wp.to(self.X3.dtype).reshape(P, L * R, N), self.X3.expand(P, N, self.T))
            .reshape(P, L, R, self.T)
            .double()
        )
        Y = self.Y64.unsqueeze(1)
        st = RowStats(
            yy=Y.square().sum(-1),
            c=(Y * Yp).sum(-1),
            q=Yp.square().sum(-1),
            err=(Y - Yp).square().sum(-1),
            T=self.T,
            Y=Y,
            Yp=Yp,
        )
        return self._drop(st, sq)

    def stats_from_mask(self, mask: torch.Tensor) -> RowStats:
        W = self._w_like(mask)
        return self.stats_from_weight(torch.where(mask, W.new_zeros(()), W))


class ObsEvaluator:
    """Predicted statistics of SparseGPT-reconstructed weights, for TRIM's search with SparseGPT.

    With least-squares reconstruction the pruned output y' is the projection of y, so
    <y, y'> = ||y'||^2 and ||y||^2 = ||y'||^2 + err. OBS gives err for pruning the k least salient
    weights of a row as the prefix sum of the saliencies w_j^2 / [U]_jj^2 (Frantar & Alistarh 2023,
    Eq. 3-4). `table` (P, rows, in + 2) holds those prefix sums for k = 0..in and, last, yy_r = w_r
    G w_r^T: then c = q = yy - err(k) for any counts k, with no matrix products at all."""

    def __init__(self, table: torch.Tensor, n_tokens: int):
        self.table = table if table.dim() == 3 else table.unsqueeze(0)
        self.T = n_tokens

    def prepare(self, W: torch.Tensor) -> None:
        pass

    @staticmethod
    def counts_from_tables(rows: int | None = None) -> bool:
        return True

    @staticmethod
    def count_tables():
        return (
            None  # its statistics are read from its own table, not from the e G e^T prefix tables
        )

    def stats_from_counts(self, k: torch.Tensor, ranks: torch.Tensor | None = None) -> RowStats:
        n1 = self.table.shape[-1] - 1
        yy = self.table[..., n1].unsqueeze(1)  # (P, 1, rows)
        cum = self.table[..., :n1].unsqueeze(1).expand(*k.shape, n1)
        err = torch.gather(cum, -1, k.clamp(0, n1 - 1).unsqueeze(-1)).squeeze(-1).clamp(min=0.0)
        err = torch.minimum(err, yy.expand_as(err))
        q = yy - err
        return RowStats(yy=yy, c=q, q=q, err=err, T=self.T)

    @staticmethod
    def table_for(weight: torch.Tensor, saliency: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """Prefix sums of the sorted saliencies of each row, and the row's output energy."""
        srt = torch.sort(saliency.double(), dim=1, stable=True)[0]
        cum = torch.cat([torch.zeros_like(srt[:, :1]), torch.cumsum(srt, 1)], 1)  # (rows, in + 1)
        W = weight.to(gram.dtype)
        yy = ((W @ gram) * W).sum(-1, dtype=torch.float64)
        return torch.cat([cum, yy.unsqueeze(1)], 1)


# ---------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class GramSpec:
    """`GramEvaluator` over `n_tokens` tokens (its source: the Gram matrix, or P of them)."""

    n_tokens: int
    precision: str = "fp32"
    tables: str = "auto"

    def build(self, src: torch.Tensor, ex: Executor = EAGER) -> GramEvaluator:
        return GramEvaluator(src, self.n_tokens, self.precision, self.tables, ex)


@dataclass(frozen=True)
class ExplicitSpec:
    """`ExplicitEvaluator` (its source: the inputs, in_features x T, or P of them)."""

    def build(self, src: torch.Tensor, ex: Executor = EAGER) -> ExplicitEvaluator:
        return ExplicitEvaluator(src)


@dataclass(frozen=True)
class ObsSpec:
    """`ObsEvaluator` over `n_tokens` tokens (its source: `ObsEvaluator.table_for` of each
    linear)."""

    n_tokens: int

    def build(self, src: torch.Tensor, ex: Executor = EAGER) -> ObsEvaluator:
        return ObsEvaluator(src, self.n_tokens)
