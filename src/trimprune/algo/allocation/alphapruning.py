"""AlphaPruning (Lu et al. 2024): heavy-tailed self-regularisation metrics decide layer sparsity.

For each weight matrix W the empirical spectral density of W^T W (eigenvalues = squared singular
values, computed on the compute device) is fitted with a power law p(lambda) ~ lambda^-alpha for
lambda >= xmin. For a candidate xmin = lambda_i (eigenvalues ascending, n = N - i of them in the
tail):

    Hill / MLE:  alpha_i = 1 + n / (sum_{j>=i} ln lambda_j - n ln lambda_i)
    KS distance: D_i = max_{j>=i} | 1 - (lambda_j / lambda_i)^(1 - alpha_i) - (j - i) / n |

`alpha_peak` takes the alpha of minimal D over candidates up to 1.5x the peak of the histogram of
log10 eigenvalues (100 bins), `alpha_mid` fixes xmin at the median eigenvalue — as the reference
`net_esd_estimator` (xmin_peak / xmin_mid) does, without the weightwatcher dependency.

Mapping (reference `ww_sparsity`): metrics (block means for `block_wise`) are mapped linearly onto
[1 - eps, 1 + eps] (smaller alpha, i.e. better trained -> fewer pruned), then scaled so the
parameter-weighted mean is the target. Unlike the reference we keep every sparsity in [0, 0.99]
(re-solving the scale with clipping, so the mean stays exact).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trimprune.algo.allocation.base import Allocation, clip_to_mean
from trimprune.config import AllocationConfig
from trimprune.core.finite import WEIGHTS_FIX
from trimprune.core.model import weight_2d
from trimprune.core.progress import Progress
from trimprune.core.runtime import Executor
from trimprune.errors import NonFiniteError

UPPER = 0.99


@dataclass(frozen=True)
class BlockVisit:
    """Offloaded blocks: `ex.resident` holds each one on `device` while its weights are read."""

    ex: Executor
    device: torch.device


def esd(weight: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of W^T W (squared singular values), float32 SVD as the reference."""
    return torch.sort(torch.linalg.svdvals(weight.float()).square())[0]


def hill_ks(eigs: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_i and D_i for candidate xmin indices i in [start, stop) (eigs ascending, float64)."""
    e = eigs.double()
    N = e.numel()
    loge = e.log()
    suffix = torch.flip(torch.cumsum(torch.flip(loge, [0]), 0), [0])  # sum_{j>=i} ln e_j
    idx = torch.arange(start, stop, device=e.device)
    n = (N - idx).double()
    alpha = 1 + n / (suffix[idx] - n * loge[idx])
    D = torch.ones_like(alpha)
    j = torch.arange(N, device=e.device)
    chunk = max(1, (1 << 24) // max(N, 1))
    for c0 in range(0, idx.numel(), chunk):
        ii = idx[c0 : c0 + chunk]
        a = alpha[c0 : c0 + chunk]
        rel = j.unsqueeze(0) - ii.unsqueeze(1)  # j - i
        valid = rel >= 0
        ratio = (e.unsqueeze(0) / e[ii].unsqueeze(1)).clamp_min(1e-300)
        cdf = 1 - ratio.pow(1 - a.unsqueeze(1))
        dev = (cdf - rel.double() / n[c0 : c0 + chunk].unsqueeze(1)).abs()
        dev = torch.where(valid, dev, torch.zeros_like(dev))
        d = dev.amax(1)
        D[c0 : c0 + chunk] = torch.where(a > 1, d, torch.ones_like(d))
    return alpha, D


def alpha_metrics(eigs: torch.Tensor, bins: int = 100) -> dict[str, float]:
    """{'alpha_peak': ..., 'alpha_mid': ...} of one ascending spectrum."""
    e = eigs.double()
    N = e.numel()
    # alpha_mid: xmin at index N // 2
    i = int(N / 2)
    a_mid, _ = hill_ks(e, i, i + 1)
    # alpha_peak: KS-optimal xmin among candidates below 1.5 x the histogram peak. The reference
    # also compares xmin with log10(0.95 * peak) as a lower bound (a log-scale number against a
    # linear eigenvalue); we keep that comparison so alpha_peak matches the published code.
    h = torch.log10(e.float())
    lo, hi = float(h.min()), float(h.max())
    counts = torch.histc(h, bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    peak = 10 ** float(edges[int(torch.argmax(counts))])
    xmin_min = math.log10(0.95 * peak)
    xmin_max = 1.5 * peak
    cand = torch.arange(N - 1, device=e.device)
    above = (e[:-1] > xmin_max).nonzero()
    stop = int(above[0]) if above.numel() else N - 1  # the reference breaks here
    ok = (e[:-1] >= xmin_min) & (cand < stop)  # ... and skips xmin < xmin_min
    alphas = torch.zeros(N - 1, dtype=torch.float64, device=e.device)
    Ds = torch.ones(N - 1, dtype=torch.float64, device=e.device)
    sel = cand[ok]
    if sel.numel():
        a, d = hill_ks(e, int(sel.min()), int(sel.max()) + 1)
        keep = ok[int(sel.min()) : int(sel.max()) + 1]
        alphas[int(sel.min()) : int(sel.max()) + 1] = torch.where(
            keep, a, alphas[int(sel.min()) : int(sel.max()) + 1]
        )
        Ds[int(sel.min()) : int(sel.max()) + 1] = torch.where(
            keep, d, Ds[int(sel.min()) : int(sel.max()) + 1]
        )
    k = int(torch.argmin(Ds))  # first minimum, as torch.argmin
    return {"alpha_peak": float(alphas[k]), "alpha_mid": float(a_mid[0])}


def _blocks(adapter, visit: BlockVisit | None):
    """The block indices in order; with `visit` (offload) each block is held by the executor while
    its linears are read."""
    for i in range(adapter.num_blocks):
        with (
            visit.ex.resident(adapter.blocks, i, visit.device)
            if visit is not None
            else contextlib.nullcontext()
        ):
            yield i


def model_fingerprint(adapter, visit: BlockVisit | None = None) -> str:
    """Identity of the weights: names, shapes and per-matrix sums (computed on their device). A sum
    that is not finite stops here (`NonFiniteError`): the SVD of a NaN / Inf matrix would fail."""
    h = hashlib.sha256()
    for i in _blocks(adapter, visit):
        for n, mod in adapter.linears(i).items():
            w = weight_2d(mod)
            s = torch.stack([w.double().sum(), w.double().square().sum()]).tolist()
            if not all(map(math.isfinite, s)):
                raise NonFiniteError(
                    f"non-finite weights: {adapter.full_name(i, n)} holds NaN/Inf: {WEIGHTS_FIX}"
                )
            h.update(f"{i}.{n}:{tuple(w.shape)}:{s[0]:.10e}:{s[1]:.10e};".encode())
    return h.hexdigest()[:24]


def cache_dir(config: AllocationConfig) -> Path:
    if config.alpha_cache_dir:
        return Path(config.alpha_cache_dir)
    base = os.environ.get("TRIMPRUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "trimprune"
    )
    return Path(base) / "alpha"


@torch.no_grad()
def layer_metrics(
    adapter,
    device,
    config: AllocationConfig | None = None,
    progress=False,
    visit: BlockVisit | None = None,
) -> tuple[dict[str, dict], bool]:
    """Per-linear alpha metrics, cached by model fingerprint (JSON). Returns (metrics, from_cache).
    `visit`: the blocks are offloaded; each is read while the executor holds it."""
    path = None
    if config is not None:
        fp = model_fingerprint(adapter, visit)
        path = cache_dir(config) / f"{fp}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text()), True
            except (OSError, json.JSONDecodeError):
                pass
    out = {}
    bar = Progress.of(progress).bar(
        total=sum(len(adapter.linears(i)) for i in range(adapter.num_blocks)), desc="ESD"
    )
    for i in _blocks(adapter, visit):
        for n, mod in adapter.linears(i).items():
            w = weight_2d(mod).to(device)
            out[adapter.full_name(i, n)] = alpha_metrics(esd(w))
            bar.update(1)
    bar.close()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(out))
            os.replace(tmp, path)
        except OSError:
            pass
    return out, False


def alpha_sparsities(
    metrics: list[float],
    numels: list[int],
    sparsity: float,
    eps: float,
    block_index: list[int] | None = None,
    upper: float = UPPER,
) -> list[float]:
    """Reference mapping to [s(1-eps), s(1+eps)] (scaled to the exact mean), clipped to [0,
    upper]."""
    m = torch.tensor(metrics, dtype=torch.float64)
    if block_index is not None:
        b = torch.tensor(block_index)
        means = torch.zeros(int(b.max()) + 1, dtype=torch.float64).index_add_(0, b, m)
        cnt = torch.zeros_like(means).index_add_(0, b, torch.ones_like(m))
        m = (means / cnt)[b]
    p = torch.tensor(numels, dtype=torch.float64)
    s1, s2 = 1.0 - eps, 1.0 + eps
    span = m.max() - m.min()
    ratios = ((m - m.min()) / span * (s2 - s1) + s1) if span > 0 else torch.ones_like(m)
    scaler = p.sum() * sparsity / (p * ratios).sum()
    return clip_to_mean(ratios * scaler, p, sparsity, 0.0, upper, mode="scale").tolist()


def alpha_from_metrics(
    metrics: dict[str, dict],
    metric: str,
    eps: float,
    mapping: str,
    sparsity: float,
    numels,
    block_of,
    cached: bool = False,
) -> Allocation:
    """The AlphaPruning allocation from per-linear metrics (`layer_metrics`)."""
    names = list(numels)
    vals = [metrics[k][metric] for k in names]
    bad = [k for k, v in zip(names, vals) if not math.isfinite(v)]
    if bad:
        # no power-law candidate (degenerate spectrum): use the mean metric for that matrix
        finite = [v for v in vals if math.isfinite(v)]
        fill = sum(finite) / len(finite) if finite else 1.0
        vals = [v if math.isfinite(v) else fill for v in vals]
    blocks = [block_of[k] for k in names] if mapping == "block_wise" else None
    sp = alpha_sparsities(vals, [numels[k] for k in names], sparsity, eps, blocks)
    return Allocation(
        "alphapruning",
        sparsity,
        dict(zip(names, sp)),
        numels,
        block_of,
        details={
            "metric": metric,
            "eps": eps,
            "mapping": mapping,
            "metric_values": dict(zip(names, vals)),
            "from_cache": cached,
            "non_finite_metric": bad,
        },
    )


def alpha_allocation(
    config: AllocationConfig,
    sparsity: float,
    adapter,
    numels,
    block_of,
    device,
    progress=False,
    visit: BlockVisit | None = None,
) -> Allocation:
    metrics, cached = layer_metrics(adapter, device, config, progress, visit)
    return alpha_from_metrics(
        metrics,
        config.alpha_metric,
        config.alpha_eps,
        config.alpha_mapping,
        sparsity,
        numels,
        block_of,
        cached,
    )
