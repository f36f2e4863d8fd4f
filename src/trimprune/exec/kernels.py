"""Triton kernels of exact all-token TRIM, registered as fast paths of the pure functions they
replace.

- `pruned_cross` (algo.trim.evaluators): the cross term c of the prefix table of e G e^T,
      c_a = sum_{b: rank(b) < rank(a)} G_ab w_b,
  one program per (tile of rows, tile of columns a, linear); G tiles are shared by a tile of rows
  and the rank comparison happens inside the reduction.
- `iterate` (algo.trim.search): every TRIM iteration of every (linear, learning rate) as one kernel,
  reading each candidate's statistics from the prefix tables.

The first failure (e.g. no C compiler for Triton's launcher) turns the kernels off with one warning;
the pure functions answer instead (`TRIMPRUNE_TRITON=0` turns them off from the start).
"""

from __future__ import annotations

import logging
import os

import torch

from trimprune.algo.masks import row_ranks
from trimprune.algo.trim.evaluators import GramSpec, pruned_cross
from trimprune.algo.trim.search import TrimSearch, TrimSettings, iterate
from trimprune.exec.fastpaths import FastPath, register, rel_close

try:  # a dependency of CUDA builds of torch; optional here
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

log = logging.getLogger("trimprune")


if triton is not None:

    @triton.jit
    def _cross_kernel(
        W,
        RK,
        G,
        C,
        R,
        N: tl.constexpr,
        s_wp,
        s_wr,
        s_kp,
        s_kr,
        s_gp,
        s_ga,
        s_cp,
        s_cr,
        BR: tl.constexpr,
        BA: tl.constexpr,
        BB: tl.constexpr,
    ):
        # one program: rows [r0, r0+BR) x columns a in [a0, a0+BA) of linear p; loops over b tiles
        p = tl.program_id(2).to(tl.int64)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols_a = tl.program_id(1) * BA + tl.arange(0, BA)
        ok_r = rows < R
        ok_a = cols_a < N
        ra = tl.load(
            RK + p * s_kp + rows[:, None] * s_kr + cols_a[None, :],
            mask=ok_r[:, None] & ok_a[None, :],
            other=-1,
        )  # (BR, BA)
        # products accumulate elementwise; one reduction at the end (a reduction per tile was 3x
        # slower)
        acc = tl.zeros((BR, BA, BB), dtype=tl.float32)
        for b0 in range(0, N, BB):
            cols_b = b0 + tl.arange(0, BB)
            ok_b = cols_b < N
            g = tl.load(
                G + p * s_gp + cols_a[:, None] * s_ga + cols_b[None, :],
                mask=ok_a[:, None] & ok_b[None, :],
                other=0.0,
            )  # (BA, BB)
            w = tl.load(
                W + p * s_wp + rows[:, None] * s_wr + cols_b[None, :],
                mask=ok_r[:, None] & ok_b[None, :],
                other=0.0,
            )  # (BR, BB)
            rb = tl.load(
                RK + p * s_kp + rows[:, None] * s_kr + cols_b[None, :],
                mask=ok_r[:, None] & ok_b[None, :],
                other=2147483647,
            )
            below = rb[:, None, :] < ra[:, :, None]  # (BR, BA, BB)
            acc += tl.where(below, g[None, :, :] * w[:, None, :], 0.0)
        tl.store(
            C + p * s_cp + rows[:, None] * s_cr + cols_a[None, :],
            tl.sum(acc, axis=2),
            mask=ok_r[:, None] & ok_a[None, :],
        )


FAILED: list[str] = []  # the first Triton failure: kernels off


def enabled() -> bool:
    return triton is not None and not FAILED and os.environ.get("TRIMPRUNE_TRITON", "1") != "0"


def disable(error: Exception) -> None:
    """Turn the kernels off after a failure (one warning)."""
    FAILED.append(repr(error))
    log.warning(
        "Triton kernels unavailable (%s); using the tensor code (slower)", repr(error)[:200]
    )


def pruned_cross_triton(
    W: torch.Tensor,
    ranks: torch.Tensor,
    G: torch.Tensor,
    chunk_elems: int = 0,
    BR: int = 4,
    BA: int = 64,
    BB: int = 16,
    num_warps: int = 4,
) -> torch.Tensor:
    """`pruned_cross` as one Triton kernel. W (P, rows, in), ranks (P, rows, in), G (P, in, in) (a
    stride-0 expansion of one G is fine) -> float32 (P, rows, in). (`chunk_elems` belongs to the
    pure function.)"""
    # tiles: best of 14 configurations on an H100 for the SmolLM2 shapes
    # (benchmarks/kernel_bench.py)
    P, R, N = W.shape
    W = W.float()
    if W.stride(-1) != 1:
        W = W.contiguous()
    ranks = ranks.to(torch.int32)
    if ranks.stride(-1) != 1:
        ranks = ranks.contiguous()
    if G.stride(-1) != 1:
        G = G.contiguous()
    C = torch.empty(P, R, N, dtype=torch.float32, device=W.device)
    grid = (triton.cdiv(R, BR), triton.cdiv(N, BA), P)
    _cross_kernel[grid](
        W,
        ranks,
        G,
        C,
        R,
        N,
        W.stride(0),
        W.stride(1),
        ranks.stride(0),
        ranks.stride(1),
        G.stride(0),
        G.stride(1),
        C.stride(0),
        C.stride(1),
        BR=BR,
        BA=BA,
        BB=BB,
        num_warps=num_warps,
    )
    return C


# ---------------------------------------------------------------------------- fused TRIM iterations
# layer metrics and dimension-wise metrics the fused kernel computes (others use the tensor code)
FUSED_LAYER = {"cosim_flat": 0, "cosim_dim": 1, "mse": 2, "mse_dim": 2}
FUSED_DIM = {"cosim": 0, "mse": 1}

if triton is not None:

    @triton.jit
    def _row_stats(
        TW, TE, YY, tab, p, offs, ok, x, R: tl.constexpr, N: tl.constexpr, KMAX: tl.constexpr
    ):
        """The statistics (c, q, err, cos) of rows `offs` of linear p pruned at row sparsities x
        (float32): counts round half to even, read from the prefix tables."""
        y = x.to(tl.float64) * N
        f = tl.floor(y)
        r = y - f
        odd = f - 2.0 * tl.floor(f * 0.5)
        k = tl.where(r > 0.5, f + 1.0, tl.where(r < 0.5, f, f + odd))
        k = tl.minimum(tl.maximum(k, 0.0), KMAX).to(tl.int64)
        at = tab + offs.to(tl.int64) * (N + 1) + k
        wge = tl.load(TW + at, mask=ok, other=0.0)
        err = tl.load(TE + at, mask=ok, other=0.0)
        yy = tl.load(YY + p * R + offs, mask=ok, other=0.0)
        c = yy - wge
        q = tl.maximum(yy - 2 * wge + err, 0.0)
        err = tl.maximum(err, 0.0)
        cos = tl.minimum(tl.maximum(c / ((tl.sqrt(yy) + 1e-8) * (tl.sqrt(q) + 1e-8)), -1.0), 1.0)
        return c, q, err, cos

    @triton.jit
    def _layer_value(
        c_acc, q_acc, e_acc, cos_acc, syy, R: tl.constexpr, NT: tl.constexpr, LAYER: tl.constexpr
    ):
        """The layer metric from the per-lane sums of the row statistics."""
        if LAYER == 0:
            m = tl.minimum(
                tl.maximum(
                    tl.sum(c_acc) / ((tl.sqrt(syy) + 1e-8) * (tl.sqrt(tl.sum(q_acc)) + 1e-8)),
                    -1.0,
                ),
                1.0,
            )
        elif LAYER == 1:
            m = tl.sum(cos_acc) / R
        else:
            m = -(tl.sum(e_acc) / (R * NT))
        return m

    @triton.jit
    def _trim_iterations_kernel(
        TW,
        TE,
        YY,
        S,
        LR,
        X,
        DQ,
        BX,
        BM,
        BIT,
        R: tl.constexpr,
        N: tl.constexpr,
        KMAX: tl.constexpr,
        L: tl.constexpr,
        ITERS: tl.constexpr,
        CAP: tl.constexpr,
        NT: tl.constexpr,
        LAYER: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # one program: linear p, learning rate l; rows in chunks of BLOCK; x, dq, best x in scratch
        # rows
        pid = tl.program_id(0)
        p = pid // L
        lr2 = tl.load(LR + pid % L) * 2
        s = tl.load(S + p)
        tab = p.to(tl.int64) * R * (N + 1)
        row = pid.to(tl.int64) * R
        best_it = tl.load(BIT + pid)
        yy_acc = tl.zeros([BLOCK], tl.float64)
        for c0 in range(0, R, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            yy_acc += tl.load(YY + p * R + offs, mask=offs < R, other=0.0)
        syy = tl.sum(yy_acc)
        # the pure function's rule: an iteration is kept when its metric is strictly above the best
        # so far, starting from the uniform allocation. The uniform allocation's metric is measured
        # here with the same arithmetic (summation order) as the iterations', so a candidate with
        # the uniform counts ties exactly and the uniform one stays, as in the pure function (the
        # given metric, summed in another order, may differ in the last bit). BM keeps the given
        # metric while no iteration beats it.
        c_acc = tl.zeros([BLOCK], tl.float64)
        q_acc = tl.zeros([BLOCK], tl.float64)
        e_acc = tl.zeros([BLOCK], tl.float64)
        cos_acc = tl.zeros([BLOCK], tl.float64)
        for c0 in range(0, R, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            ok = offs < R
            x = tl.load(X + row + offs, mask=ok, other=0.0)
            c, q, err, cos = _row_stats(TW, TE, YY, tab, p, offs, ok, x, R, N, KMAX)
            c_acc += tl.where(ok, c, 0.0)
            q_acc += tl.where(ok, q, 0.0)
            e_acc += tl.where(ok, err, 0.0)
            cos_acc += tl.where(ok, cos, 0.0)
        best = _layer_value(c_acc, q_acc, e_acc, cos_acc, syy, R, NT, LAYER)
        for it in range(ITERS):
            # step size from the dimension-wise quality:
            # d = 2 lr (q - min q) / (max q - min q + 1e-6)
            lo_v = tl.full([BLOCK], float("inf"), tl.float64)
            hi_v = tl.full([BLOCK], float("-inf"), tl.float64)
            for c0 in range(0, R, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                dq = tl.load(DQ + row + offs, mask=offs < R, other=0.0)
                lo_v = tl.minimum(lo_v, tl.where(offs < R, dq, float("inf")))
                hi_v = tl.maximum(hi_v, tl.where(offs < R, dq, float("-inf")))
            lo = tl.min(lo_v)
            den = tl.max(hi_v) - lo + 1e-6
            d_acc = tl.zeros([BLOCK], tl.float64)
            for c0 in range(0, R, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                dq = tl.load(DQ + row + offs, mask=offs < R, other=0.0)
                d_acc += tl.where(offs < R, (dq - lo) / den * lr2, 0.0)
            d_mean = tl.sum(d_acc) / R
            # x += d - mean(d) (float64 step on float32 x), clip to [0, cap]
            x_acc = tl.zeros([BLOCK], tl.float64)
            for c0 in range(0, R, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                ok = offs < R
                dq = tl.load(DQ + row + offs, mask=ok, other=0.0)
                x = tl.load(X + row + offs, mask=ok, other=0.0)
                x = (x.to(tl.float64) + ((dq - lo) / den * lr2 - d_mean)).to(tl.float32)
                x = tl.minimum(tl.maximum(x, 0.0), CAP)
                tl.store(X + row + offs, x, mask=ok)
                x_acc += tl.where(ok, x.to(tl.float64), 0.0)
            x_mean = (tl.sum(x_acc) / R).to(tl.float32)
            # re-centre on s, counts (round half to even), statistics from the prefix tables
            c_acc = tl.zeros([BLOCK], tl.float64)
            q_acc = tl.zeros([BLOCK], tl.float64)
            e_acc = tl.zeros([BLOCK], tl.float64)
            cos_acc = tl.zeros([BLOCK], tl.float64)
            for c0 in range(0, R, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                ok = offs < R
                x = tl.load(X + row + offs, mask=ok, other=0.0)
                x = (x - x_mean) + s
                tl.store(X + row + offs, x, mask=ok)
                c, q, err, cos = _row_stats(TW, TE, YY, tab, p, offs, ok, x, R, N, KMAX)
                if DIM == 0:
                    tl.store(DQ + row + offs, cos, mask=ok)
                else:
                    tl.store(DQ + row + offs, -(err / NT), mask=ok)
                c_acc += tl.where(ok, c, 0.0)
                q_acc += tl.where(ok, q, 0.0)
                e_acc += tl.where(ok, err, 0.0)
                cos_acc += tl.where(ok, cos, 0.0)
            m = _layer_value(c_acc, q_acc, e_acc, cos_acc, syy, R, NT, LAYER)
            better = m > best  # strict, as the pure function: the earliest of equal metrics stays
            if better:
                for c0 in range(0, R, BLOCK):
                    offs = c0 + tl.arange(0, BLOCK)
                    tl.store(
                        BX + row + offs,
                        tl.load(X + row + offs, mask=offs < R, other=0.0),
                        mask=offs < R,
                    )
                tl.store(BM + pid, m)
            best = tl.where(better, m, best)
            best_it = tl.where(better, it, best_it)
        tl.store(BIT + pid, best_it)


def trim_iterations(
    tables: torch.Tensor,
    yy: torch.Tensor,
    s3: torch.Tensor,
    base_m: torch.Tensor,
    base_dq: torch.Tensor,
    lrs: torch.Tensor,
    iterations: int,
    cap: float,
    kmax: int,
    n_tokens: int,
    layer_metric: str,
    dim_metric: str,
):
    """TrimSearch._iterate for every (linear, rate) as one Triton kernel, reading the statistics of
    each candidate from the prefix tables (2, P, rows, in + 1) of quality.GramEvaluator. yy (P,
    rows) float64, s3 (P,) float32, base_m (P,) and base_dq (P, rows) float64 at uniform, lrs (L,)
    float64. -> best x (P, L, rows) float32, its metric (P, L) float64, iteration (P, L) int64."""
    _, P, R, N1 = tables.shape
    L = lrs.shape[0]
    x = s3.view(P, 1, 1).expand(P, L, R).contiguous()
    bx = x.clone()
    dq = base_dq.view(P, 1, R).expand(P, L, R).contiguous()
    bm = base_m.view(P, 1).expand(P, L).contiguous()
    bit = torch.zeros(P, L, dtype=torch.int64, device=x.device)
    block = min(2048, triton.next_power_of_2(R))
    _trim_iterations_kernel[(P * L,)](
        tables[0],
        tables[1],
        yy.contiguous(),
        s3.contiguous(),
        lrs.contiguous(),
        x,
        dq,
        bx,
        bm,
        bit,
        R=R,
        N=N1 - 1,
        KMAX=kmax,
        L=L,
        ITERS=iterations,
        CAP=cap,
        NT=n_tokens,
        LAYER=FUSED_LAYER[layer_metric],
        DIM=FUSED_DIM[dim_metric],
        BLOCK=block,
        num_warps=8 if block >= 1024 else 4,
    )
    return bx, bm, bit


# ------------------------------------------------------------------------------ registration
def _cross_applies(W=None, ranks=None, G=None, **_) -> bool:
    return enabled() and G is not None and G.is_cuda and G.dtype == torch.float32


def _cross_examples(device):
    g = torch.Generator().manual_seed(0)
    for P, R, N, shared in [
        (1, 5, 7, False),
        (2, 37, 70, True),
        (3, 130, 333, False),
        (2, 1536, 576, True),
    ]:
        if device.type == "cpu" and R * N > 50_000:  # the interpreter is slow
            continue
        X = torch.randn(P, 3 * N, N, generator=g)
        G = X.transpose(1, 2) @ X
        if shared:
            G = G[:1].expand(P, N, N)
        W = torch.randn(P, R, N, generator=g)
        ranks = torch.stack([row_ranks(torch.randn(R, N, generator=g)) for _ in range(P)])
        yield (W.to(device), ranks.to(device), G.to(device)), {}


register(
    FastPath(
        "Triton cross term of the e G e^T prefix table",
        pruned_cross,
        pruned_cross_triton,
        _cross_applies,
        _cross_examples,
        rel_close(1e-5),
        "triton",
    )
)


def fused_iterate(ev, ranks, s3, base_lm, base_dq, lrs, settings: TrimSettings):
    """`iterate` as one Triton kernel over the evaluator's prefix tables."""
    P, _, n = ranks.shape
    kmax = int(settings.max_row_sparsity * n + 1e-9)
    return trim_iterations(
        ev.count_tables(),
        ev.yy,
        s3.view(P),
        base_lm[:, 0],
        base_dq[:, 0],
        lrs.to(torch.float64),
        settings.iterations,
        settings.max_row_sparsity,
        kmax,
        ev.T,
        settings.layer_metric,
        settings.dim_metric,
    )


def _iterate_applies(
    ev=None, ranks=None, s3=None, base_lm=None, base_dq=None, lrs=None, settings=None
) -> bool:
    return (
        enabled()
        and ranks is not None
        and ranks.is_cuda
        and ev.count_tables() is not None
        and settings.rounding == "exact"
        and settings.layer_metric in FUSED_LAYER
        and settings.dim_metric in FUSED_DIM
    )


def _iterate_examples(device):
    """Batches whose searches improve on uniform, for the four layer metrics and both dimension-wise
    ones (rates x20 in half of them: large steps that hit the bounds)."""
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        P, rows, n, T = 3, (50 if device.type == "cpu" else 300 + 97 * seed), 40, 200
        X = torch.randn(P, T, n, generator=g) * torch.rand(n, generator=g) * 3
        W = torch.randn(P, rows, n, generator=g)
        W[1, :5] *= 6
        ranks = torch.stack([row_ranks(W[p].abs() * X[p].norm(dim=0)) for p in range(P)]).to(device)
        settings = TrimSettings(
            layer_metric=["cosim_flat", "cosim_dim", "mse", "mse_dim"][seed % 4],
            dim_metric=["cosim", "mse"][seed % 2],
        )
        s = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64, device=device)
        ev, s3, base_lm, base_dq, _ = TrimSearch(settings)._start(
            GramSpec(T, tables="on"), W.to(device), (X.transpose(1, 2) @ X).to(device), ranks, s
        )
        lrs = torch.tensor(settings.all_lrs, dtype=torch.float64, device=device) * (
            1 if seed < 4 else 20
        )
        yield (ev, ranks, s3, base_lm, base_dq, lrs, settings), {}


def _same_search(got, want):
    (bx, bm, bit), (fx, fm, fit) = want, got
    dm = float((bm - fm).abs().max())
    same = torch.equal(bx, fx) and torch.equal(bit, fit)
    return (
        same and dm <= 1e-12,
        f"same x and iterations: {same}, metrics within {dm:.1e}, "
        f"best iteration up to {int(bit.max())}",
    )


register(
    FastPath(
        "fused TRIM iterations (one Triton kernel)",
        iterate,
        fused_iterate,
        _iterate_applies,
        _iterate_examples,
        _same_search,
        "triton",
    )
)
