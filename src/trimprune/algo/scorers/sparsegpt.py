"""SparseGPT (Frantar & Alistarh 2023): mask selection and OBS weight reconstruction.

With H = X^T X (the Gram matrix; the paper's 2 X^T X / n differs by a scale that changes neither
the mask nor the update), columns are processed left to right in blocks of `blocksize`. At the
start of a block the mask is chosen by the saliency w_ij^2 / [U]_jj^2, where U is the upper
Cholesky factor of H^-1 (Algorithm 1); each pruned weight's error is then spread over the
remaining columns of its row: W[:, j:] -= (w_ij / U_jj) * U[j, j:] (the OBS update).

Rows of linears that read the same input (q/k/v, gate/up) share H, so they are solved together.
Groups of the same shapes (the experts of a mixture-of-experts block) are solved as one batch
(`SparseGPT.prune_groups`): the same arithmetic, item by item, with every step stacked over them.

Failures: a non-finite H is an error (`NonFiniteError`; the walk's statistics check names the
linears before it gets here). Dead inputs (H_jj = 0) get H_jj = 1 and their weights are zeroed, as
in the reference. A failed Cholesky factorisation is retried with 10x the damping (`percdamp_used`,
`damp_retries`). Should the reconstruction of a linear still come out non-finite (finite inputs make
this a numerical failure, not bad data), that linear keeps its mask without the update and its
`Reconstruction.fallback` says so (`prune` lists it in the result's notes).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import cast

import torch

from trimprune.algo.masks import row_ranks
from trimprune.algo.scorers.base import Member, Outcome, Scorer, Target
from trimprune.algo.stats import InputStats
from trimprune.core.records import Reconstruction
from trimprune.core.runtime import EAGER, Executor
from trimprune.errors import NonFiniteError

log = logging.getLogger("trimprune")

# A batch of groups (`SparseGPT.prune_groups`) holds at most this many elements in its stacked Gram
# matrices (and in each temporary of their factorisation) ...
BATCH_GRAM_ELEMENTS = 2**27
# ... and in one column block of its weights: the batched OBS block stays graph-captured on CUDA
# (`exec.graphs.MAX_ELEMENTS`, 64 MiB of float32)
BATCH_BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True)
class InverseFactor:
    """U, the upper Cholesky factor of (H + lambda I)^-1, the dead input columns, and how it was
    reached."""

    U: torch.Tensor
    dead: torch.Tensor
    percdamp_used: float
    damp_retries: int
    fallback: str | None
    dead_columns: int


def _round(x: float) -> int:
    return int(round(x))  # half to even, like torch.round


class _ObsBlock:
    """Algorithm 1's inner loop over the columns of one block: prune column i by its mask, spread
    the error over the block's later columns (W1[:, i:] -= err_i * U1[i, i:]). For N:M the mask of
    every M columns is chosen when their first column is reached, from the updated weights."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m

    def __call__(self, W1: torch.Tensor, U1: torch.Tensor, mask1: torch.Tensor):
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        for i in range(W1.shape[1]):
            if self.m and i % self.m == 0:
                tmp = W1[:, i : i + self.m].square() / d[i : i + self.m].square().unsqueeze(0)
                mask1.scatter_(1, i + torch.topk(tmp, self.n, dim=1, largest=False)[1], True)
            err = W1[:, i] * mask1[:, i] / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # column i becomes q (pruned entries ~0)
            Err1[:, i] = err
        W1.masked_fill_(mask1, 0.0)
        return W1, Err1, mask1


class _ObsBlocks:
    """`_ObsBlock` on a stack of independent problems (one per group of a batch): W1 (B, rows, bs),
    U1 (B, bs, bs), mask1 (B, rows, bs). Item by item the same arithmetic (Algorithm 1's inner
    loop): prune column i, W1[b, :, i:] -= err_b,i * U1[b, i, i:]; for N:M the mask of every M
    columns is chosen when their first column is reached."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m

    def __call__(self, W1: torch.Tensor, U1: torch.Tensor, mask1: torch.Tensor):
        d = torch.diagonal(U1, dim1=1, dim2=2)  # (B, bs)
        Err1 = torch.zeros_like(W1)
        for i in range(W1.shape[2]):
            if self.m and i % self.m == 0:
                tmp = W1[:, :, i : i + self.m].square() / d[:, i : i + self.m].square().unsqueeze(1)
                top = torch.topk(tmp, self.n, dim=2, largest=False)[1]
                mask1.scatter_(2, i + top, True)
            err = W1[:, :, i] * mask1[:, :, i] / d[:, i : i + 1]
            W1[:, :, i:].addcmul_(err.unsqueeze(2), U1[:, i : i + 1, i:], value=-1.0)
            Err1[:, :, i] = err
        W1.masked_fill_(mask1, 0.0)
        return W1, Err1, mask1


def _smallest(t: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For each item b of t (B, rows, bs): the counts[b] smallest entries of the whole block t[b]
    (one stable sort: ties in row-major order), as `SparseGPT._select_block` selects a matrix."""
    flat = t.reshape(t.shape[0], -1)
    order = torch.sort(flat, dim=1, stable=True)[1]
    take = torch.arange(flat.shape[1], device=t.device) < counts.unsqueeze(1)
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, take).view_as(t)


def _identity(value):
    return value


def _non_finite_gram() -> NonFiniteError:
    return NonFiniteError(
        "SparseGPT: the Gram matrix X^T X of a linear's inputs holds NaN/Inf: "
        "the calibration activations are not finite "
        "(an overflow: try --dtype bfloat16 or --dtype float32)"
    )


class SparseGPT(Scorer):
    name = "sparsegpt"
    needs_gram = True
    reconstructs = True
    selects_by_row_ranks = False  # blockwise selection on updated weights
    alone_is_uniform_rows = False

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> int:
        return int(round(sparsity * rows * cols))  # one count per matrix

    def __init__(
        self,
        blocksize: int = 128,
        percdamp: float = 0.01,
        max_damp_retries: int = 8,
        ex: Executor = EAGER,
    ):
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.max_damp_retries = max_damp_retries
        self.ex = ex

    # ------------------------------------------------------------------ H^-1 factor
    def inverse_factor(self, stats: InputStats, device: torch.device) -> InverseFactor:
        """Upper Cholesky factor U of (H + lambda I)^-1 with dead columns handled as in the paper
        (H_jj = 0 -> H_jj = 1, w_:j = 0). On a failed factorisation the damping grows x10. Computed
        once per statistics (q/k/v share it)."""
        return stats.derived(
            self._factor_key(device),
            lambda: self._inverse_factor(cast(torch.Tensor, stats.gram), device),
        )

    def _factor_key(self, device: torch.device) -> tuple:
        return ("sparsegpt inverse factor", device, self.percdamp, self.max_damp_retries)

    def _inverse_factor(self, gram: torch.Tensor, device: torch.device) -> InverseFactor:
        H = gram.to(device=device).clone()
        fallback = None
        if not torch.isfinite(H).all():
            raise _non_finite_gram()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        mean_diag = torch.mean(torch.diag(H))
        percdamp = self.percdamp
        retries = 0
        U = None
        while True:
            Hd = H.clone()
            idx = torch.arange(H.shape[0], device=device)
            Hd[idx, idx] += percdamp * mean_diag
            L, info = torch.linalg.cholesky_ex(Hd)
            if int(info) == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if int(info) == 0 and torch.isfinite(U).all():
                    break
            retries += 1
            if retries > self.max_damp_retries:
                fallback = (
                    f"Cholesky failed up to percdamp {percdamp:g}; used H = I "
                    "(magnitude selection, no update)"
                )
                U = torch.eye(H.shape[0], device=device, dtype=H.dtype)
                break
            percdamp *= 10.0
            log.warning("SparseGPT: Cholesky failed, retrying with percdamp=%g", percdamp)
        if fallback:
            log.warning("SparseGPT: %s", fallback)
        return InverseFactor(
            U=U,
            dead=dead,
            percdamp_used=percdamp,
            damp_retries=retries,
            fallback=fallback,
            dead_columns=int(dead.sum()),
        )

    def importance(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """The saliency w^2 / [U]_jj^2 on the unmodified weights (the cheap proxy TRIM searches
        with)."""
        assert stats is not None  # SparseGPT always collects the Gram matrix
        f = self.inverse_factor(stats, weight.device)
        w = weight.masked_fill(f.dead.unsqueeze(0), 0.0)
        return w.square() / torch.diag(f.U).square().unsqueeze(0)

    # ------------------------------------------------------------------ solver
    def _select_block(
        self, tmp: torch.Tensor, seg_rows: slice, target: Target, i1: int, i2: int, cols: int
    ) -> torch.Tensor:
        """Mask for columns [i1, i2) of one linear's rows. The counts per block telescope, so the
        whole matrix (or each row) ends with exactly the target number of pruned weights."""
        t = tmp[seg_rows]
        if target.row_counts is not None:
            P = target.row_counts.to(t.device, torch.float64)
            k = (torch.round(P * i2 / cols) - torch.round(P * i1 / cols)).long()
            return row_ranks(t) < k.unsqueeze(1)
        # reference semantics: one selection over the whole block of this matrix
        if target.row_scale is not None:  # TRIM's steering: each row's saliency weighted
            t = t * target.row_scale.to(t.device, t.dtype).unsqueeze(1)
        mask = torch.zeros_like(t, dtype=torch.bool)
        s = target.sparsity
        count = _round(s * t.shape[0] * i2) - _round(s * t.shape[0] * i1)
        if count > 0:
            idx = torch.sort(t.flatten(), stable=True)[1][:count]
            mask.view(-1)[idx] = True
        return mask

    @torch.no_grad()
    def prune_group(self, members: list[Member], stats: InputStats | None) -> list[Outcome]:
        assert stats is not None  # SparseGPT always collects the Gram matrix
        dev = members[0].weight.device
        f = self.inverse_factor(stats, dev)
        U, dead = f.U, f.dead
        W = torch.cat([m.weight for m in members], 0).clone()
        W[:, dead] = 0.0
        rows, cols = W.shape
        segs, r0 = [], 0
        for m in members:
            segs.append(slice(r0, r0 + m.weight.shape[0]))
            r0 += m.weight.shape[0]
        nm = members[0].target.nm
        mask = torch.zeros_like(W, dtype=torch.bool)
        losses = torch.zeros(rows, device=dev, dtype=W.dtype)
        bs = self.blocksize
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2].contiguous()
            d = torch.diag(U1)
            if nm is None:
                tmp = W1.square() / d.square().unsqueeze(0)
                mask1 = torch.cat(
                    [
                        self._select_block(tmp, sg, m.target, i1, i2, cols)
                        for sg, m in zip(segs, members)
                    ],
                    0,
                )
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            n, mm = nm if nm is not None else (0, 0)
            W1, Err1, mask1 = self.ex.run(
                ("obs", tuple(W1.shape), W1.dtype, n, mm),
                _ObsBlock(n, mm),
                {"W1": W1, "U1": U1, "mask1": mask1},
                size=W1.numel() * 4,
            )
            losses += Err1.square().sum(1) / 2
            W[:, i1:i2] = W1
            mask[:, i1:i2] = mask1
            if i2 < cols:
                W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
        # never return NaN / Inf: a linear whose reconstruction is not finite keeps its mask without
        # the update
        finite = torch.stack([torch.isfinite(W[sg]).all() for sg in segs]).tolist()
        out = []
        for sg, m, ok in zip(segs, members, finite):
            fallback = f.fallback
            if not ok:
                log.warning(
                    "SparseGPT: the reconstruction of %s is not finite; "
                    "kept its mask without the update",
                    m.name,
                )
                W[sg] = m.weight.masked_fill(mask[sg], 0.0)
                fallback = "non-finite reconstruction; mask applied without update"
            out.append(
                Outcome(
                    weight=W[sg],
                    mask=mask[sg],
                    info=Reconstruction(
                        percdamp_used=f.percdamp_used,
                        damp_retries=f.damp_retries,
                        fallback=fallback,
                        dead_columns=f.dead_columns,
                        obs_loss=float(losses[sg].sum()),
                    ),
                )
            )
        return out

    # ------------------------------------------------------------------ batched solver
    @torch.no_grad()
    def prune_groups(
        self, groups: list[tuple[list[Member], InputStats | None]]
    ) -> list[list[Outcome]]:
        """`prune_group` of each group, with the groups of the same shapes (member shapes, N:M,
        TRIM row counts or not; the experts of a MoE block) solved as one batch (`_prune_batch`),
        in chunks bounded by `BATCH_GRAM_ELEMENTS` and `BATCH_BLOCK_ELEMENTS`. A group alone in its
        shape goes through `prune_group`, so a dense model's solve is unchanged."""
        out: list[list[Outcome]] = [[] for _ in groups]
        buckets: dict[tuple, list[int]] = {}
        for j, (ms, st) in enumerate(groups):
            if ms:
                assert st is not None  # SparseGPT always collects the Gram matrix
                buckets.setdefault(self._batch_key(ms, st), []).append(j)
        for js in buckets.values():
            ms = groups[js[0]][0]
            rows, cols = sum(m.weight.shape[0] for m in ms), ms[0].weight.shape[1]
            step = max(
                1,
                min(
                    BATCH_GRAM_ELEMENTS // (cols * cols),
                    BATCH_BLOCK_ELEMENTS // (rows * min(self.blocksize, cols)),
                ),
            )
            k = -(-len(js) // step)  # chunks of balanced sizes
            for c in range(k):
                chunk = js[c * len(js) // k : (c + 1) * len(js) // k]
                if len(chunk) == 1:
                    out[chunk[0]] = self.prune_group(*groups[chunk[0]])
                    continue
                for j, o in zip(chunk, self._prune_batch([groups[j] for j in chunk])):
                    out[j] = o
        return out

    def prepare(self, stats: list[InputStats], device: torch.device) -> None:
        """The inverse factors of many statistics (those of TRIM's searched linears), in batches of
        one size (`_inverse_factors`), before `importance` asks for them one by one."""
        key = self._factor_key(device)
        sizes: dict[tuple, dict[int, InputStats]] = {}
        for st in stats:
            if not st.has_derived(key):
                gram = cast(torch.Tensor, st.gram)
                sizes.setdefault((gram.shape[0], gram.dtype), {})[id(st)] = st
        for (n, _), same in sizes.items():
            todo = list(same.values())
            k = -(-len(todo) // max(1, BATCH_GRAM_ELEMENTS // (n * n)))
            for c in range(k):
                self._inverse_factors(todo[c * len(todo) // k : (c + 1) * len(todo) // k], device)

    @staticmethod
    def _batch_key(members: list[Member], stats: InputStats) -> tuple:
        """Groups with equal keys are solved in one batch."""
        gram = cast(torch.Tensor, stats.gram)
        shapes = tuple(
            (
                tuple(m.weight.shape),
                m.target.nm,
                m.target.row_counts is not None,
                m.target.row_scale is not None,
            )
            for m in members
        )
        w = members[0].weight
        return (shapes, w.dtype, w.device, gram.shape[0], gram.dtype)

    def _inverse_factors(
        self, stats: list[InputStats], device: torch.device
    ) -> list[InverseFactor]:
        """`inverse_factor` of each statistics. Those not computed yet are factorised in one
        batch, each item as `_inverse_factor`'s first attempt (dead columns, damping, Cholesky of
        H, its inverse, the upper Cholesky factor of that); an item whose attempt fails is redone
        by `_inverse_factor` itself, with its damping retries. One synchronisation."""
        key = self._factor_key(device)
        todo = list({id(st): st for st in stats if not st.has_derived(key)}.values())
        if len(todo) > 1:
            H = torch.stack([cast(torch.Tensor, st.gram).to(device) for st in todo])
            finite = torch.isfinite(H).flatten(1).all(1)
            diag = torch.diagonal(H, dim1=1, dim2=2)
            dead = diag == 0
            diag.masked_fill_(dead, 1.0)
            diag.add_((self.percdamp * diag.mean(1)).unsqueeze(1))  # H + lambda I, in place
            L, info = torch.linalg.cholesky_ex(H)
            del H
            ok = info == 0
            L.masked_fill_(~ok[:, None, None], 0.0)  # a failed item: factor I, redone below
            torch.diagonal(L, dim1=1, dim2=2).masked_fill_(~ok[:, None], 1.0)
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            ok &= (info == 0) & torch.isfinite(U).flatten(1).all(1)
            flags = torch.cat([finite.long(), ok.long(), dead.sum(1)]).tolist()
            n = len(todo)
            if not all(flags[:n]):
                raise _non_finite_gram()
            for b, st in enumerate(todo):
                if flags[n + b]:
                    f = InverseFactor(U[b], dead[b], self.percdamp, 0, None, int(flags[2 * n + b]))
                    st.derived(key, functools.partial(_identity, f))
        return [self.inverse_factor(st, device) for st in stats]

    def _prune_batch(
        self, groups: list[tuple[list[Member], InputStats | None]]
    ) -> list[list[Outcome]]:
        """`prune_group` for B groups of the same shapes, stacked: W (B, rows, cols), U (B, cols,
        cols). Algorithm 1 with each step batched over the groups: the mask of a column block per
        matrix (`_select_blocks`), the block's columns (`_ObsBlocks`), the update of the later
        columns W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]; then the non-finite fallback and the OBS
        loss per linear (`_batch_outcomes`)."""
        members = [ms for ms, _ in groups]
        dev = members[0][0].weight.device
        fs = self._inverse_factors([cast(InputStats, st) for _, st in groups], dev)
        U = torch.stack([f.U for f in fs])
        W = torch.stack([torch.cat([m.weight for m in ms], 0) for ms in members])
        W.masked_fill_(torch.stack([f.dead for f in fs]).unsqueeze(1), 0.0)
        B, rows, cols = W.shape
        segs, r0 = [], 0
        for m in members[0]:
            segs.append(slice(r0, r0 + m.weight.shape[0]))
            r0 += m.weight.shape[0]
        nm = members[0][0].target.nm
        blocks = [(i1, min(i1 + self.blocksize, cols)) for i1 in range(0, cols, self.blocksize)]
        sel = self._batch_counts(members, segs, blocks, dev)
        scales = [
            None
            if ms0.target.row_scale is None
            else torch.stack([cast(torch.Tensor, ms[k].target.row_scale) for ms in members])
            .to(dev, W.dtype)
            .unsqueeze(2)
            for k, ms0 in enumerate(members[0])
        ]
        mask = torch.zeros_like(W, dtype=torch.bool)
        losses = torch.zeros(B, rows, device=dev, dtype=W.dtype)
        for j, (i1, i2) in enumerate(blocks):
            W1 = W[:, :, i1:i2].clone()
            U1 = U[:, i1:i2, i1:i2].contiguous()
            if nm is None:
                d = torch.diagonal(U1, dim1=1, dim2=2)
                tmp = W1.square() / d.square().unsqueeze(1)
                mask1 = self._select_blocks(tmp, segs, members[0], sel, scales, j, i1, i2, cols)
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            n, mm = nm if nm is not None else (0, 0)
            W1, Err1, mask1 = self.ex.run(
                ("obs batched", tuple(W1.shape), W1.dtype, n, mm),
                _ObsBlocks(n, mm),
                {"W1": W1, "U1": U1, "mask1": mask1},
                size=W1.numel() * 4,
            )
            losses += Err1.square().sum(2) / 2
            W[:, :, i1:i2] = W1
            mask[:, :, i1:i2] = mask1
            if i2 < cols:
                W[:, :, i2:].baddbmm_(Err1, U[:, i1:i2, i2:], alpha=-1.0)
        return self._batch_outcomes(members, fs, W, mask, losses, segs)

    def _batch_counts(
        self,
        members: list[list[Member]],
        segs: list[slice],
        blocks: list[tuple[int, int]],
        dev: torch.device,
    ) -> list[torch.Tensor]:
        """Per member position: its TRIM row counts (B, rows) as float64, or the pruned weights of
        each column block of each matrix (blocks, B), which telescope to round(sparsity * numel)
        (`_select_block`)."""
        sel = []
        for k, sg in enumerate(segs):
            ts = [ms[k].target for ms in members]
            if ts[0].row_counts is not None:
                rc = [cast(torch.Tensor, t.row_counts).to(dev, torch.float64) for t in ts]
                sel.append(torch.stack(rc))
            else:
                r = sg.stop - sg.start
                counts = [
                    [_round(t.sparsity * r * i2) - _round(t.sparsity * r * i1) for t in ts]
                    for i1, i2 in blocks
                ]
                sel.append(self.ex.to_device(counts, torch.long, dev))
        return sel

    @staticmethod
    def _select_blocks(
        tmp: torch.Tensor,
        segs: list[slice],
        members: list[Member],
        sel: list[torch.Tensor],
        scales: list[torch.Tensor | None],
        j: int,
        i1: int,
        i2: int,
        cols: int,
    ) -> torch.Tensor:
        """`_select_block` of each member position over the batch: the mask of columns [i1, i2)
        (block j) from the saliencies tmp (B, rows, i2 - i1); `scales`: each position's row scales
        (B, rows, 1), or None."""
        parts = []
        for sg, m, sk, sc in zip(segs, members, sel, scales):
            t = tmp[:, sg] if sc is None else tmp[:, sg] * sc
            if m.target.row_counts is not None:
                k = (torch.round(sk * i2 / cols) - torch.round(sk * i1 / cols)).long()
                ranks = row_ranks(t.reshape(-1, t.shape[2])).view(t.shape)
                parts.append(ranks < k.unsqueeze(2))
            else:
                parts.append(_smallest(t, sk[j]))
        return torch.cat(parts, 1)

    @staticmethod
    def _batch_outcomes(
        members: list[list[Member]],
        fs: list[InverseFactor],
        W: torch.Tensor,
        mask: torch.Tensor,
        losses: torch.Tensor,
        segs: list[slice],
    ) -> list[list[Outcome]]:
        """Each linear's outcome; one that is not finite keeps its mask without the update (as in
        `prune_group`). One synchronisation."""
        finite = torch.stack([torch.isfinite(W[:, sg]).flatten(1).all(1) for sg in segs], 1)
        loss = torch.stack([losses[:, sg].sum(1) for sg in segs], 1)
        finite_l, loss_l = finite.tolist(), loss.tolist()
        out = []
        for b, (ms, f) in enumerate(zip(members, fs)):
            outs = []
            for k, (sg, m) in enumerate(zip(segs, ms)):
                fallback = f.fallback
                if not finite_l[b][k]:
                    log.warning(
                        "SparseGPT: the reconstruction of %s is not finite; "
                        "kept its mask without the update",
                        m.name,
                    )
                    W[b, sg] = m.weight.masked_fill(mask[b, sg], 0.0)
                    fallback = "non-finite reconstruction; mask applied without update"
                info = Reconstruction(
                    percdamp_used=f.percdamp_used,
                    damp_retries=f.damp_retries,
                    fallback=fallback,
                    dead_columns=f.dead_columns,
                    obs_loss=loss_l[b][k],
                )
                outs.append(Outcome(weight=W[b, sg], mask=mask[b, sg], info=info))
            out.append(outs)
        return out
