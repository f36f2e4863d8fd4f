"""Magnitude, Wanda and SparseGPT: exact sparsity, N:M validity, equality with brute force."""

import pytest
import torch

from tiny_models import calib, make
from trimprune import PruneConfig, prune
from trimprune.algo.masks import is_nm, matrix_mask, nm_mask, pack_mask, row_mask, unpack_mask
from trimprune.algo.scorers import Member, SparseGPT, Target, Wanda
from trimprune.algo.stats import InputStats, StatsNeeds
from trimprune.core.model import ModelAdapter, weight_2d
from trimprune.errors import NonFiniteError

FAMS = ["llama", "qwen2", "opt", "gpt2", "gemma", "gemma3", "gpt_neox", "phi3"]


def _run(family, **kw):
    model = make(family)
    cfg = PruneConfig.from_flat(dict(nsamples=8, seqlen=24, **kw))
    res = prune(model, None, cfg, calibration=calib(8, 24), progress=False)
    return model, res


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_wanda_exact_per_row_sparsity(family, sparsity):
    model, res = _run(family, scorer="wanda", sparsity=sparsity)
    for name, mod in ModelAdapter.from_model(model).all_linears().items():
        W = weight_2d(mod)
        k = round(sparsity * W.shape[1])
        zeros = (W == 0).sum(1)
        assert (zeros == k).all(), name
        assert torch.equal(res.mask(name), W == 0)


@pytest.mark.parametrize("scorer", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.8])
def test_matrix_level_exact_sparsity(scorer, sparsity):
    model, res = _run("llama", scorer=scorer, sparsity=sparsity)
    for name, mod in ModelAdapter.from_model(model).all_linears().items():
        m = res.mask(name)
        assert int(m.sum()) == round(sparsity * m.numel()), name
        assert bool((weight_2d(mod)[m] == 0).all())


@pytest.mark.parametrize("scorer", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_nm_patterns_are_valid(scorer, nm, family):
    n, m = map(int, nm.split(":"))
    model, res = _run(family, scorer=scorer, sparsity=0.5, mask_structure=nm)
    for name, mod in ModelAdapter.from_model(model).all_linears().items():
        mask = res.mask(name)
        assert is_nm(mask, n, m), name
        assert bool((weight_2d(mod)[mask] == 0).all())


def test_mask_helpers_and_bit_packing():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(13, 40, generator=g)
    assert (row_mask(s, 0.3).sum(1) == 12).all()
    assert int(matrix_mask(s, 0.3).sum()) == round(0.3 * 520)
    assert is_nm(nm_mask(s, 2, 4), 2, 4)
    m = torch.rand(7, 9, generator=g) > 0.5  # 63 bits: not a multiple of 8
    import numpy as np

    packed = pack_mask(m)
    assert torch.equal(packed, torch.from_numpy(np.packbits(m.numpy().ravel())))
    assert torch.equal(unpack_mask(packed, m.shape), m)


def _capture_linear_inputs(model, block, names):
    """Brute force: inputs of the named linears of `block` over a full-model forward."""
    got = {}
    hooks = [
        dict(block.named_modules())[n].register_forward_hook(
            lambda mod, a, o, n=n: got.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).clone())
        )
        for n in names
    ]
    return got, hooks


def test_wanda_equals_bruteforce_sequential_reference():
    """A direct, slow transcription of Wanda's sequential algorithm (dense forward of the model with the
    earlier blocks already pruned; per-row sort of |W| * ||X_j||) gives the same masks."""
    ids = calib(6, 20)
    model = make("llama", dtype=torch.float64)
    ref = make("llama", dtype=torch.float64)
    s = 0.6
    ad = ModelAdapter.from_model(ref)
    for i, block in enumerate(ad.blocks):
        names = list(ad.linears(i))
        got, hooks = _capture_linear_inputs(ref, block, names)
        with torch.no_grad():
            ref(input_ids=ids)
        for h in hooks:
            h.remove()
        for n in names:
            W = weight_2d(ad.linears(i)[n])
            norm = [sum(float(v) ** 2 for v in got[n][:, j]) ** 0.5 for j in range(W.shape[1])]
            k = round(s * W.shape[1])
            for r in range(W.shape[0]):
                order = sorted(range(W.shape[1]), key=lambda j: (abs(float(W[r, j])) * norm[j], j))
                for j in order[:k]:
                    W[r, j] = 0.0
    prune(
        model,
        None,
        PruneConfig.from_flat(
            dict(scorer="wanda", sparsity=s, nsamples=6, seqlen=20, batch_size=4)
        ),
        calibration=ids,
        progress=False,
    )
    for (n1, a), (_n2, b) in zip(
        ModelAdapter.from_model(model).all_linears().items(), ad.all_linears().items()
    ):
        assert torch.equal(weight_2d(a) == 0, weight_2d(b) == 0), n1


# ----------------------------------------------------------------------------- SparseGPT
def _gram_stats(X: torch.Tensor) -> InputStats:
    st = InputStats(X.shape[1], X.device, StatsNeeds(sqnorm=True, gram=True), dtype=X.dtype)
    st.add(X)
    return st


def _reference_fasterprune(W, H, sparsity, blocksize=128, percdamp=0.01):
    """Transcription of the SparseGPT reference loop (IST-DASLab `fasterprune`), with the block's
    mask taking exactly the k(b) smallest saliencies (k telescoping to round(s * numel))."""
    W = W.clone()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        mask1.view(-1)[torch.sort(tmp.flatten(), stable=True)[1][:k]] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_equals_reference_transcription():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 96, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3, 96, dtype=torch.float64
    )
    X[:, 5] = 0  # a dead input column
    W = torch.randn(40, 96, generator=g, dtype=torch.float64)
    st = _gram_stats(X)
    out = SparseGPT(blocksize=32).prune_group([Member("w", W, Target(0.6))], st)[0]
    ref = _reference_fasterprune(W, X.T @ X, 0.6, blocksize=32)
    torch.testing.assert_close(out.weight, ref, rtol=1e-9, atol=1e-9)
    assert int(out.mask.sum()) == round(0.6 * W.numel())


def _recon_error(W, Wp, X):
    return float(torch.linalg.matrix_norm((W - Wp) @ X.T))


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
def test_sparsegpt_reconstruction_beats_wanda_and_magnitude_on_a_layer(sparsity):
    """On a real layer of a tiny model (its calibration inputs), ||WX - W'X|| is strictly smallest for
    SparseGPT at the same sparsity."""
    errs = {}
    for scorer in ["magnitude", "wanda", "sparsegpt"]:
        model = make("llama")
        ad = ModelAdapter.from_model(model)
        lin = ad.linears(0)["mlp.down_proj"]
        W0 = weight_2d(lin).clone()
        got = {}
        h = lin.register_forward_hook(
            lambda m, a, o: got.__setitem__("x", a[0].reshape(-1, a[0].shape[-1]))
        )
        ids = calib(16, 32)
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        prune(
            model,
            None,
            PruneConfig.from_flat(dict(scorer=scorer, sparsity=sparsity, nsamples=16, seqlen=32)),
            calibration=ids,
            progress=False,
        )
        errs[scorer] = _recon_error(W0, weight_2d(lin), got["x"])
    assert errs["sparsegpt"] < errs["wanda"] and errs["sparsegpt"] < errs["magnitude"], errs


def test_sparsegpt_per_row_counts_are_exact():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 64, generator=g)
    W = torch.randn(24, 64, generator=g)
    counts = torch.randint(0, 60, (24,), generator=g)
    out = SparseGPT(blocksize=16).prune_group(
        [Member("w", W, Target(0.5, row_counts=counts))], _gram_stats(X)
    )[0]
    assert torch.equal(out.mask.sum(1), counts)
    assert bool((out.weight[out.mask] == 0).all())


def test_sparsegpt_survives_singular_and_non_pd_gram(caplog):
    g = torch.Generator().manual_seed(2)
    # rank-1 inputs, dead columns, tiny damping: the first Cholesky attempts fail in float32
    v = torch.randn(1, 48, generator=g)
    X = torch.randn(50, 1, generator=g) @ v
    X[:, :7] = 0
    W = torch.randn(16, 48, generator=g)
    sg = SparseGPT(blocksize=16, percdamp=1e-12)
    st = _gram_stats(X)
    st.gram[10, 11] = st.gram[11, 10] = 1e6  # make H indefinite
    out = sg.prune_group([Member("w", W, Target(0.5))], st)[0]
    assert torch.isfinite(out.weight).all()
    assert out.info.damp_retries >= 1 and out.info.percdamp_used > 1e-12
    assert int(out.mask.sum()) == round(0.5 * W.numel())
    assert out.info.dead_columns == 7
    # non-finite statistics are an error, never a silent fallback
    st = _gram_stats(X)
    st.gram[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="Gram matrix"):
        sg.prune_group([Member("w", W, Target(0.5))], st)


def test_shared_input_linears_share_one_statistic():
    model = make("llama")
    cfg = PruneConfig.from_flat(dict(scorer="sparsegpt", sparsity=0.5, nsamples=4, seqlen=16))
    res = prune(model, None, cfg, calibration=calib(4, 16), progress=False)
    groups = {r.group for r in res.layers.values() if r.block == 0}
    assert groups == {
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    }


def test_wanda_importance_is_weight_times_input_norm():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(100, 12, generator=g)
    W = torch.randn(5, 12, generator=g)
    st = _gram_stats(X)
    torch.testing.assert_close(Wanda().importance(W, st), W.abs() * X.norm(dim=0))


@pytest.mark.parametrize("values", ["few", "many", "continuous"])
def test_row_mask_by_kth_value_equals_the_stable_sort(values):
    """The k-th-value selection prunes exactly the first k of a stable ascending sort of every row, ties
    (few distinct values) broken by column order."""
    from trimprune.algo.masks import row_mask_by_sort

    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        r, c = torch.randint(1, 48, (2,), generator=g).tolist()
        s = (
            torch.randint(0, 3 if values == "few" else 40, (r, c), generator=g).float()
            if values != "continuous"
            else torch.randn(r, c, generator=g)
        )
        for sp in (0.0, 0.05, 0.5, 0.7, 0.99):
            assert torch.equal(row_mask(s, sp), row_mask_by_sort(s, sp))
