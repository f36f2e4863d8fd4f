"""Layer-wise allocation: OWL and AlphaPruning equal direct recomputations; exact global mean; files."""

import json

import pytest
import torch

from tiny_models import calib, make
from trimprune import PruneConfig, prune
from trimprune.algo.allocation.alphapruning import alpha_metrics, alpha_sparsities, esd
from trimprune.algo.allocation.base import clip_to_mean
from trimprune.core.model import ModelAdapter, weight_2d


def _numel_mean(res):
    return sum(r.target_sparsity * r.numel for r in res.layers.values()) / sum(
        r.numel for r in res.layers.values()
    )


def test_owl_equals_direct_recomputation():
    ids = calib(8, 24)
    ref = make("llama", dtype=torch.float64)
    ad = ModelAdapter.from_model(ref)
    inputs = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, a, o, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]))
        )
        for n, m in ad.all_linears().items()
    ]
    with torch.no_grad():
        ref(input_ids=ids)
    for h in hooks:
        h.remove()
    M, lam, s = 5.0, 0.08, 0.6
    D = []
    for i in range(ad.num_blocks):
        scores = torch.cat(
            [
                (weight_2d(m).abs() * inputs[ad.full_name(i, n)].norm(dim=0)).flatten()
                for n, m in ad.linears(i).items()
            ]
        )
        D.append(float((scores > M * scores.mean()).sum()) / scores.numel() * 100)
    D = torch.tensor(D, dtype=torch.float64)
    dens = (D - D.min()) / (D.max() - D.min()) * lam * 2
    expected = 1 - (dens - dens.mean() + (1 - s))
    res = prune(
        make("llama", dtype=torch.float64),
        None,
        PruneConfig.from_flat(
            dict(scorer="wanda", sparsity=s, allocation="owl", nsamples=8, seqlen=24)
        ),
        calibration=ids,
        progress=False,
    )
    got = res.allocation.per_block()
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, rtol=0, atol=1e-12)
    assert res.allocation.details["outlier_ratio"] == pytest.approx(D.tolist(), abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam)


def _hill_ks_loop(e, i):
    """Plain loop versions of the formulas (no vectorisation)."""
    N = len(e)
    n = N - i
    a = 1 + n / (sum(torch.log(e[i:]).tolist()) - n * float(torch.log(e[i])))
    D = (
        max(abs(1 - float(e[j] / e[i]) ** (1 - a) - (j - i) / n) for j in range(i, N))
        if a > 1
        else 1.0
    )
    return a, D


def test_alpha_metrics_equal_direct_recomputation():
    torch.manual_seed(0)
    W = torch.randn(48, 80, dtype=torch.float64) @ torch.diag(
        torch.linspace(0.2, 3, 80, dtype=torch.float64) ** 2
    )
    e = torch.sort(torch.linalg.svdvals(W.float()).double() ** 2)[0]
    got = alpha_metrics(e)
    # alpha_mid: xmin at the middle eigenvalue
    assert got["alpha_mid"] == pytest.approx(_hill_ks_loop(e, len(e) // 2)[0], rel=1e-10)
    # alpha_peak: minimal KS distance among the candidates of the reference loop
    h = torch.log10(e.float())
    counts = torch.histc(h, 100, min=float(h.min()), max=float(h.max()))
    peak = 10 ** float(
        torch.linspace(float(h.min()), float(h.max()), 101)[int(torch.argmax(counts))]
    )
    best = (2.0, None)
    for i in range(len(e) - 1):
        if float(e[i]) < torch.log10(torch.tensor(0.95 * peak)).item():
            continue
        if float(e[i]) > 1.5 * peak:
            break
        a, D = _hill_ks_loop(e, i)
        if D < best[0]:
            best = (D, a)
    assert got["alpha_peak"] == pytest.approx(best[1], rel=1e-10)


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5, 5.0])
def test_hill_ks_recovers_power_law_exponent(alpha):
    g = torch.Generator().manual_seed(int(alpha * 10))
    u = torch.rand(3000, generator=g, dtype=torch.float64)
    x = torch.sort(0.7 * (1 - u) ** (-1 / (alpha - 1)))[0]  # Pareto, density ~ x^-alpha, xmin 0.7
    assert alpha_metrics(x)["alpha_peak"] == pytest.approx(alpha, rel=0.05)


def test_alphapruning_allocation_equals_direct_mapping(tmp_path):
    model = make("llama")
    s, eps = 0.5, 0.3
    cfg = PruneConfig.from_flat(
        dict(
            scorer="magnitude",
            sparsity=s,
            allocation="alphapruning",
            alpha_eps=eps,
            nsamples=4,
            seqlen=16,
            alpha_cache_dir=str(tmp_path),
            alpha_mapping="per_matrix",
        )
    )
    ad = ModelAdapter.from_model(model)
    names = list(ad.all_linears())
    metric = torch.tensor(
        [alpha_metrics(esd(weight_2d(m)))["alpha_peak"] for m in ad.all_linears().values()],
        dtype=torch.float64,
    )
    numel = torch.tensor(
        [weight_2d(m).numel() for m in ad.all_linears().values()], dtype=torch.float64
    )
    r = (metric - metric.min()) / (metric.max() - metric.min()) * (2 * eps) + (1 - eps)
    expected = r * (numel.sum() * s / (numel * r).sum())
    res = prune(model, None, cfg, calibration=calib(4, 16), progress=False)
    got = torch.tensor([res.allocation.per_linear[n] for n in names], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert res.allocation.details["from_cache"] is False
    # the metric is cached: a second run reads it back
    res2 = prune(make("llama"), None, cfg, calibration=calib(4, 16), progress=False)
    assert res2.allocation.details["from_cache"] is True
    assert res2.allocation.per_linear == res.allocation.per_linear


def test_alphapruning_block_wise_uses_block_means():
    m = [1.0, 2.0, 3.0, 10.0, 11.0, 12.0]
    sp = alpha_sparsities(m, [1] * 6, 0.5, 0.3, block_index=[0, 0, 0, 1, 1, 1])
    assert sp[0] == sp[1] == sp[2] and sp[3] == sp[4] == sp[5] and sp[0] < sp[3]
    assert sum(sp) / 6 == pytest.approx(0.5, abs=1e-12)


def test_alphapruning_never_exceeds_bounds_and_keeps_the_mean():
    """At eps 0.3 and 80 % the reference assigns ratios above 1; ours clips to 0.99 with the mean exact."""
    metrics = [10.0, 9.5, 10.0, 10.0] + [1.0] * 6  # small matrices are the least trained
    numels = [10, 10, 10, 10, 1000, 1000, 1000, 1000, 1000, 1000]
    ref_like = torch.tensor(metrics)
    r = (ref_like - ref_like.min()) / (ref_like.max() - ref_like.min()) * 0.6 + 0.7
    p = torch.tensor(numels, dtype=torch.float64)
    unclipped = r.double() * (p.sum() * 0.8 / (p * r).sum())
    assert float(unclipped.max()) > 0.99  # the reference mapping overflows
    sp = torch.tensor(alpha_sparsities(metrics, numels, 0.8, 0.3), dtype=torch.float64)
    assert float(sp.max()) <= 0.99 and float(sp.min()) >= 0
    assert float((sp * p).sum() / p.sum()) == pytest.approx(0.8, abs=1e-12)


def test_clip_to_mean_shift_and_scale():
    v = torch.tensor([0.2, 0.5, 1.3, -0.4])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for mode in ["shift", "scale"]:
        out = clip_to_mean(v, w, 0.45, 0.0, 0.99, mode)
        assert float(out.min()) >= 0 and float(out.max()) <= 0.99
        assert float((out * w).sum() / w.sum()) == pytest.approx(0.45, abs=1e-12)


@pytest.mark.parametrize("allocation", ["uniform", "owl", "alphapruning", "atp"])
@pytest.mark.parametrize("scorer", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("trim", [False, True])
def test_every_allocation_has_exact_global_mean_and_composes(allocation, scorer, trim, tmp_path):
    s = 0.7
    res = prune(
        make("qwen2"),
        None,
        PruneConfig.from_flat(
            dict(
                scorer=scorer,
                sparsity=s,
                allocation=allocation,
                trim=trim,
                nsamples=8,
                seqlen=24,
                alpha_cache_dir=str(tmp_path),
            )
        ),
        calibration=calib(8, 24),
        progress=False,
    )
    assert res.allocation.achieved == pytest.approx(s, abs=1e-12)
    assert _numel_mean(res) == pytest.approx(s, abs=1e-12)
    for r in res.layers.values():  # every linear hits its own target
        per = (
            round(r.target_sparsity * r.shape[1]) * r.shape[0]
            if scorer == "wanda"
            else round(r.target_sparsity * r.numel)
        )
        assert r.zeros == per
    if allocation != "uniform":
        assert len({round(r.target_sparsity, 9) for r in res.layers.values()}) > 1


def test_allocation_file_round_trip(tmp_path):
    ids = calib(8, 24)
    res = prune(
        make("llama"),
        None,
        PruneConfig.from_flat(
            dict(scorer="wanda", sparsity=0.6, allocation="owl", nsamples=8, seqlen=24)
        ),
        calibration=ids,
        progress=False,
    )
    path = tmp_path / "alloc.json"
    res.allocation.save(path)
    rep = prune(
        make("llama"),
        None,
        PruneConfig.from_flat(
            dict(scorer="wanda", sparsity=0.6, allocation=f"file:{path}", nsamples=8, seqlen=24)
        ),
        calibration=ids,
        progress=False,
    )
    assert rep.allocation.per_linear == res.allocation.per_linear
    for n in res.layers:
        assert torch.equal(rep.mask(n), res.mask(n))
    # per-block list and block-relative names are accepted too; YAML as well as JSON
    blocks = res.allocation.per_block()
    (tmp_path / "b.yaml").write_text("\n".join(f"- {b}" for b in blocks))
    rb = prune(
        make("llama"),
        None,
        PruneConfig.from_flat(
            dict(sparsity=0.6, allocation=f"file:{tmp_path / 'b.yaml'}", nsamples=8, seqlen=24)
        ),
        calibration=ids,
        progress=False,
    )
    assert rb.allocation.per_block() == pytest.approx(blocks)
    rel = {
        f"{res.layers[n].block}.{res.layers[n].name}": v
        for n, v in res.allocation.per_linear.items()
    }
    (tmp_path / "r.json").write_text(json.dumps(rel))
    rr = prune(
        make("llama"),
        None,
        PruneConfig.from_flat(
            dict(sparsity=0.6, allocation=f"file:{tmp_path / 'r.json'}", nsamples=8, seqlen=24)
        ),
        calibration=ids,
        progress=False,
    )
    assert rr.allocation.per_linear == res.allocation.per_linear
