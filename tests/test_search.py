"""ATP, `--allocation search` (Optuna's TPE over rules and free profiles, held-out objective) and
`--trim-guard model`, on tiny models (CPU)."""

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import calib, make, make_llama
from trimprune import PruneConfig, TrimpruneError, prune
from trimprune.algo.allocation.atp import atp_allocation, atp_block_sparsities
from trimprune.algo.allocation.lua import lua_allocation
from trimprune.algo.allocation.search import (
    ALPHA_EPS,
    ATP_BETA,
    CHEB_RANGE,
    LUA_STRENGTH,
    N_CHEB,
    OWL_LAMBDA,
    OWL_M_GRID,
    UPPER,
    allocation_for,
    chebyshev_profile,
)
from trimprune.core.model import ModelAdapter

optuna = pytest.importorskip("optuna")
N, L = 8, 24


FAST_TRIM = dict(
    trim_iterations=3, trim_lrs=[0.04, 0.12], trim_neg_lrs=[-0.02]
)  # a cheaper TRIM search


def _cfg(**kw):
    base = dict(scorer="wanda", sparsity=0.6, nsamples=N, seqlen=L) | FAST_TRIM
    return PruneConfig.from_flat(base | kw)


def _mean(per: dict, numels: dict) -> float:
    return sum(per[k] * numels[k] for k in per) / sum(numels.values())


def _sizes(model):
    ad = ModelAdapter.from_model(model)
    numels = {
        ad.full_name(i, n): m.weight.numel()
        for i in range(ad.num_blocks)
        for n, m in ad.linears(i).items()
    }
    block_of = {ad.full_name(i, n): i for i in range(ad.num_blocks) for n in ad.linears(i)}
    return numels, block_of


# ------------------------------------------------------------------------------------------ ATP
def test_atp_is_the_centred_progression_monotone_with_exact_mean_and_bounds():
    got = atp_block_sparsities(5, 0.6, 0.2)
    assert got == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7], abs=1e-12)  # beta / (L - 1) per block
    assert atp_block_sparsities(1, 0.6, 0.5) == pytest.approx([0.6])
    for s, beta in [(0.5, 0.3), (0.9, 0.6), (0.05, 0.6), (0.95, 1.0), (0.0, 0.4)]:
        numels = [3, 5, 5, 5, 100, 7, 7, 1]
        sp = torch.tensor(atp_block_sparsities(8, s, beta, numels), dtype=torch.float64)
        w = torch.tensor(numels, dtype=torch.float64)
        assert float((sp * w).sum() / w.sum()) == pytest.approx(s, abs=1e-12)
        assert float(sp.min()) >= 0 and float(sp.max()) <= UPPER
        assert bool((sp[1:] >= sp[:-1]).all())  # never decreasing with depth
        if 0 < s < UPPER:
            assert float(sp[-1]) > float(sp[0])


@pytest.mark.parametrize("trim", [False, True])
def test_atp_prune_hits_every_target(trim):
    model = make("qwen2")
    res = prune(
        model,
        None,
        _cfg(sparsity=0.7, allocation="atp", atp_beta=0.3, trim=trim),
        calibration=calib(N, L),
        progress=False,
    )
    blocks = res.allocation.per_block()
    assert blocks[1] - blocks[0] == pytest.approx(0.3) and res.allocation.method == "atp"
    assert res.allocation.achieved == pytest.approx(0.7, abs=1e-12)
    for r in res.layers.values():
        assert r.zeros == round(r.target_sparsity * r.shape[1]) * r.shape[0]
    numels, block_of = _sizes(make("qwen2"))
    assert atp_allocation(0.3, 0.7, numels, block_of).per_linear == res.allocation.per_linear


# ------------------------------------------------------------------------------------------ pure search parts
class _FakeSources:
    def __init__(self, n_blocks, seed):
        g = torch.Generator().manual_seed(seed)
        self.ratios = {m: (torch.rand(n_blocks, generator=g) * 10).tolist() for m in OWL_M_GRID}
        self.names = None
        self.g = g

    def owl_ratios(self, m):
        return self.ratios[m]

    def alpha_metrics(self):
        return {
            k: {
                "alpha_peak": 2 + 4 * float(torch.rand(1, generator=self.g)),
                "alpha_mid": 2 + 4 * float(torch.rand(1, generator=self.g)),
            }
            for k in self.names
        }

    def layerif_scores(self):
        return {k: float(torch.rand(1, generator=self.g)) for k in self.names}

    def lua_thresholds(self):
        return {k: float(torch.rand(1, generator=self.g)) for k in self.names}


def _params(draw):
    fam = draw(st.sampled_from(["owl", "alphapruning", "atp", "layerif", "lua", "free"]))
    p = {"family": fam, "trim": False}
    f = st.floats
    if fam == "owl":
        p |= {"owl_m": draw(st.sampled_from(OWL_M_GRID)), "owl_lambda": draw(f(*OWL_LAMBDA))}
    elif fam == "alphapruning":
        p |= {
            "alpha_metric": draw(st.sampled_from(["alpha_peak", "alpha_mid"])),
            "alpha_eps": draw(f(*ALPHA_EPS)),
        }
    elif fam == "atp":
        p |= {"atp_beta": draw(f(*ATP_BETA))}
    elif fam == "layerif":
        p |= {"layerif_eps": draw(f(*ALPHA_EPS))}
    elif fam == "lua":
        p |= {"lua_strength": draw(f(*LUA_STRENGTH))}
    else:
        p |= {f"c{k}": draw(f(*CHEB_RANGE)) for k in range(1, N_CHEB + 1)}
    return p


@st.composite
def _cases(draw):
    n_blocks = draw(st.integers(1, 40))
    per_block = draw(st.integers(1, 4))
    numels, block_of = {}, {}
    for b in range(n_blocks):
        for j in range(per_block):
            k = f"model.layers.{b}.l{j}"
            numels[k] = draw(st.integers(1, 5000))
            block_of[k] = b
    return (
        _params(draw),
        draw(st.floats(0.0, 0.95)),
        numels,
        block_of,
        draw(st.integers(0, 2**16)),
        draw(st.sampled_from(["block_wise", "per_matrix"])),
    )


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_every_profile_of_the_space_maps_to_an_allocation_with_exact_mean_and_bounds(case):
    params, s, numels, block_of, seed, mapping = case
    src = _FakeSources(max(block_of.values()) + 1, seed)
    src.names = list(numels)
    a = allocation_for(params, s, numels, block_of, src, mapping)
    assert set(a.per_linear) == set(numels)
    assert abs(_mean(a.per_linear, numels) - s) <= 1e-9
    assert all(0.0 <= v <= UPPER for v in a.per_linear.values())
    assert a.method == "search" and a.details["family"] == params["family"]


def test_chebyshev_profile_is_the_polynomials_at_the_block_depths():
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    want = (
        0.1 * x
        + 0.2 * (2 * x**2 - 1)
        - 0.05 * (4 * x**3 - 3 * x)
        + 0.03 * (8 * x**4 - 8 * x**2 + 1)
    )
    assert chebyshev_profile([0.1, 0.2, -0.05, 0.03], 7) == pytest.approx(want.tolist(), abs=1e-12)
    assert chebyshev_profile([0.1, 0.2], 1) == pytest.approx([-0.2])


# ------------------------------------------------------------------------------------------ the search
def _search(tmp_path, trials=3, model=None, ids=None, **kw):
    flat = (
        dict(
            allocation="search",
            search_trials=trials,
            search_holdout=2,
            search_seed=7,
            alpha_cache_dir=str(tmp_path / "alpha"),
        )
        | kw
    )
    model = model if model is not None else make("llama")
    return model, prune(
        model,
        None,
        _cfg(**flat),
        calibration=ids if ids is not None else calib(N, L),
        progress=False,
    )


def _trials(res):
    return [(t["number"], t["state"], t["params"], t["value"]) for t in res.search["trials"]]


def test_same_seed_same_trials_and_allocation(tmp_path):
    m1, a = _search(tmp_path, trials=6, search_space="rules,free,trim")
    m2, b = _search(tmp_path, trials=6, search_space="rules,free,trim")
    assert _trials(a) == _trials(b) and len(a.search["trials"]) == 6
    assert a.allocation.per_linear == b.allocation.per_linear
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n
    _, c = _search(tmp_path, trials=6, search_space="rules,free,trim", search_seed=8)
    assert (
        _trials(c)[:4] == _trials(a)[:4] and _trials(c)[4:] != _trials(a)[4:]
    )  # the warm starts, then TPE


def test_offloaded_search_equals_the_resident_one(tmp_path):
    """Offload (on CPU: the walked blocks and the held-out objective's block walk) decides the same trials.
    With a GPU the offloaded model's blocks visit it (`session._compute_device`): the resident model is
    then on the GPU too, so that both do the same arithmetic."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m1, a = _search(tmp_path, trials=5, model=make("llama").to(dev), search_objective="nll")
    m2, b = _search(tmp_path, trials=5, search_objective="nll", offload=True)
    assert [t[:3] for t in _trials(a)] == [t[:3] for t in _trials(b)]
    assert [t[3] for t in _trials(a)] == pytest.approx([t[3] for t in _trials(b)], rel=1e-6)
    assert a.search["objective"] == "nll" and "kl" not in a.search["final"]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.cpu(), p2.cpu(), rtol=1e-6, atol=1e-7)


def test_every_trial_allocation_has_exact_mean_and_bounds_and_the_best_is_applied(tmp_path):
    model, res = _search(tmp_path, trials=6)
    numels, block_of = _sizes(make("llama"))
    blocks = [sum(n for k, n in numels.items() if block_of[k] == b) for b in range(2)]
    for t in res.search["trials"]:
        pb = t["per_block"]
        assert abs(sum(p * n for p, n in zip(pb, blocks)) / sum(blocks) - 0.6) <= 1e-9
        assert all(0 <= p <= UPPER for p in pb)
    best = min(
        (t for t in res.search["trials"] if t["state"] == "complete"), key=lambda t: t["value"]
    )
    assert res.search["best"]["number"] == best["number"]
    assert res.allocation.per_block() == pytest.approx(best["per_block"], abs=1e-15)
    assert res.allocation.method == "search" and res.allocation.details["trial"] == best["number"]
    assert res.search["selected"] == best["metrics"]  # the winner's held-out metrics
    # the final model: the winner's allocation replayed on every calibration sequence
    res.allocation.save(tmp_path / "allocation.json")
    ref = make("llama")
    flat = dict(allocation=f"file:{tmp_path / 'allocation.json'}", sparsity=0.6)
    prune(ref, None, _cfg(**flat, trim=res.config.trim.enabled), calibration=calib(N, L))
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    assert res.global_sparsity == pytest.approx(0.6, abs=0.01)
    prof = res.search["profiles"]
    assert set(prof) == {"uniform", "owl", "alphapruning", "atp", "search"}
    assert prof["search"] == res.allocation.per_block()
    # a new study starts from uniform and the rules with the config's parameters: the best is never worse
    first = res.search["trials"][:4]
    assert [t["params"]["family"] for t in first] == ["free", "owl", "alphapruning", "atp"]
    assert first[0]["per_block"] == pytest.approx(prof["uniform"], abs=1e-12)
    for t, name in zip(first[1:], ["owl", "alphapruning", "atp"]):
        assert t["per_block"] == pytest.approx(prof[name], abs=1e-12)
    assert res.search["best"]["value"] <= min(t["value"] for t in first)


def test_layerif_space_warm_starts_with_its_profile(tmp_path):
    """The `layerif` space: LayerIF's scores once per study, its epsilon per trial; its warm start
    is the `--allocation layerif` profile on the sequences the statistics see."""
    _, res = _search(tmp_path, trials=3, search_space="layerif", layerif_holdout=1)
    trials = res.search["trials"]
    assert [t["params"]["family"] for t in trials] == ["layerif"] * 3
    prof = res.search["profiles"]["layerif"]
    assert trials[0]["per_block"] == pytest.approx(prof, abs=1e-12)
    assert len(set(prof)) > 1
    alone = prune(
        make("llama"),
        None,
        _cfg(allocation="layerif", layerif_holdout=1, nsamples=N - 2),
        calibration=calib(N, L)[: N - 2],
        progress=False,
    )
    assert alone.allocation.per_block() == pytest.approx(prof, abs=1e-12)


def test_lua_space_trains_once_and_warm_starts_with_the_learned_profile(tmp_path):
    """The `lua` space: Lua-LLM's thresholds trained once per study, their strength per trial; the
    warm start (strength 1) is the `--allocation lua` profile on the sequences the statistics see,
    and strength 0 is uniform."""
    lua = dict(lua_steps=4, lua_lr=0.02)
    _, res = _search(tmp_path, trials=3, search_space="lua", **lua)
    trials = res.search["trials"]
    assert [t["params"]["family"] for t in trials] == ["lua"] * 3
    assert trials[0]["params"]["lua_strength"] == 1.0
    prof = res.search["profiles"]["lua"]
    assert trials[0]["per_block"] == pytest.approx(prof, abs=1e-12) and len(set(prof)) > 1
    alone = prune(
        make("llama"),
        None,
        _cfg(allocation="lua", nsamples=N - 2, **lua),
        calibration=calib(N, L)[: N - 2],
        progress=False,
    )
    assert alone.allocation.per_block() == pytest.approx(prof, abs=1e-12)
    numels, block_of = _sizes(make("llama"))
    thresholds = alone.allocation.per_linear
    flat = lua_allocation(thresholds, 0.6, numels, block_of, strength=0.0)
    assert list(flat.per_linear.values()) == pytest.approx([0.6] * len(numels), abs=1e-12)


def test_an_interrupted_study_resumes_from_its_sqlite_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _, first = _search(tmp_path, search_storage=url)
    _, second = _search(tmp_path, search_storage=url)
    assert len(first.search["trials"]) == 3 and len(second.search["trials"]) == 6
    assert _trials(second)[:3] == _trials(first)
    assert first.search["study"] == second.search["study"] and second.search["trials_run"] == 3
    # a named study in the same storage starts from scratch
    _, other = _search(tmp_path, search_storage=url, search_study="mine", search_trials=1)
    assert len(other.search["trials"]) == 1 and other.search["study"] == "mine"
    # the study name follows what decides the values: another sparsity is another study
    _, third = _search(tmp_path, search_storage=url, sparsity=0.5, search_trials=1)
    assert third.search["study"] != first.search["study"] and len(third.search["trials"]) == 1


def test_a_nan_or_failing_trial_is_pruned_and_the_search_goes_on(tmp_path, monkeypatch):
    import trimprune.search as search

    calls = {"n": 0}
    real = search.Holdout.measure

    def measure(self):
        calls["n"] += 1
        if calls["n"] == 2:
            return {"nll": math.nan, "kl": math.nan}
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(self)

    monkeypatch.setattr(search.Holdout, "measure", measure)
    _, res = _search(tmp_path, trials=4)
    states = [t["state"] for t in res.search["trials"]]
    assert states == ["complete", "pruned", "pruned", "complete"]
    assert (
        "nan" in res.search["trials"][1]["error"]
        and "injected failure" in res.search["trials"][2]["error"]
    )
    assert res.search["best"]["number"] in (0, 3) and math.isfinite(res.search["final_objective"])
    # no trial completes: a one-line error naming the first trial's
    monkeypatch.setattr(search.Holdout, "measure", lambda self: {"nll": math.inf, "kl": math.inf})
    with pytest.raises(
        TrimpruneError,
        match=r"no trial of the search completed \(2 failed .*the held-out kl is inf",
    ):
        _search(tmp_path, trials=2)


def test_held_out_sequences_never_reach_the_statistics(tmp_path, monkeypatch):
    import trimprune.search as search
    import trimprune.session as api

    seen = {}
    real_capture = api.capture

    def spy(model, adapter, batches, *a, **k):
        c = real_capture(model, adapter, batches, *a, **k)
        seen["n_tokens"] = c.n_tokens
        seen["ids"] = torch.cat(batches)
        seen.setdefault("first", seen["ids"])
        return c

    monkeypatch.setattr(api, "capture", spy)
    held = {}
    real_init = search.Holdout.__init__

    def init(self, model, ids, *a, **k):
        held["ids"] = ids.clone()
        real_init(self, model, ids, *a, **k)

    monkeypatch.setattr(search.Holdout, "__init__", init)
    ids = calib(N, L)
    _, res = _search(tmp_path, trials=1, ids=ids, search_holdout=3)
    assert torch.equal(seen["first"], ids[: N - 3])  # the trials' statistics
    assert seen["n_tokens"] == N * L and torch.equal(seen["ids"], ids)  # the final capture
    assert torch.equal(held["ids"], ids[N - 3 :])
    # the final prune: every sequence, the held-out ones joined back
    assert res.calibration_shape == (N, L) and res.search["final_sequences"] == N
    assert res.search["holdout_sequences"] == 3 and res.search["prune_sequences"] == N - 3
    # the default holdout: nsamples // 8, at least 1
    assert (
        _cfg(allocation="search").holdout == 1
        and _cfg(allocation="search", nsamples=64).holdout == 8
    )
    assert _cfg().holdout is None  # no search: every sequence is used


# ------------------------------------------------------------------------------ the model safeguard
def _kl(dense, model, held):
    with torch.no_grad():
        d = torch.log_softmax(dense(input_ids=held).logits[:, :-1].double(), -1)
        p = torch.log_softmax(model(input_ids=held).logits[:, :-1].double(), -1)
    return float((d.exp() * (d - p)).sum() / (held.shape[0] * (held.shape[1] - 1)))


def _guard_model(family: str):
    return make_llama(4) if family == "llama-4" else make(family)  # 4 blocks: OWL spreads them


@pytest.mark.parametrize(
    "scorer,sparsity,family,allocation",
    [("wanda", 0.7, "llama", "uniform"), ("sparsegpt", 0.6, "qwen2", "uniform")]
    + [
        ("wanda", 0.7, "llama-4", "owl")
    ],  # OWL's ratios: from the held-in, then from every sequence
)
def test_trim_guard_model_keeps_the_lower_held_out_objective(scorer, sparsity, family, allocation):
    ids = calib(N, L)
    cfg = _cfg(
        scorer=scorer,
        sparsity=sparsity,
        trim=True,
        trim_guard="model",
        search_holdout=2,
        allocation=allocation,
    )
    model = _guard_model(family)
    res = prune(model, None, cfg, calibration=ids, progress=False)
    g = res.trim_guard
    assert g["objective"] == "kl" and g["holdout_sequences"] == 2
    lower = "trim" if g["trim"]["kl"] <= g["scorer_alone"]["kl"] else "scorer_alone"
    assert g["kept"] == lower
    # the choice was made on models pruned without the held-out sequences: never worse than the
    # scorer alone there (the same allocation, the same statistics)
    chosen = dataclasses.replace(
        cfg, trim=dataclasses.replace(cfg.trim, enabled=lower == "trim", guard="block")
    )
    alone = _guard_model(family)
    alone_cfg = dataclasses.replace(
        cfg, trim=dataclasses.replace(cfg.trim, enabled=False, guard="block")
    )
    prune(alone, None, alone_cfg, calibration=ids[: N - 2], progress=False)
    assert (
        min(g["trim"]["kl"], g["scorer_alone"]["kl"])
        <= _kl(_guard_model(family), alone, ids[N - 2 :]) * (1 + 1e-4) + 1e-9
    )
    # the final model: the choice pruned on every sequence
    assert res.calibration_shape == (N, L) and g["final_sequences"] == N
    ref = _guard_model(family)
    prune(ref, None, chosen, calibration=ids, progress=False)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    assert g["final"]["kl"] == pytest.approx(
        _kl(_guard_model(family), model, ids[N - 2 :]), rel=1e-4
    )


def test_trim_guard_model_falls_back_to_the_scorer_alone(monkeypatch):
    import trimprune.search as search

    values = iter([{"kl": 1.0, "nll": 5.0}, {"kl": 2.0, "nll": 5.0}, {"kl": 1.5, "nll": 5.0}])
    monkeypatch.setattr(search.Holdout, "measure", lambda self: next(values))
    ids = calib(N, L)
    model = make("llama")
    res = prune(
        model,
        None,
        _cfg(sparsity=0.7, trim=True, trim_guard="model", search_holdout=2),
        calibration=ids,
        progress=False,
    )
    assert res.trim_guard["kept"] == "scorer_alone" and res.trim_guard["trim"]["kl"] == 2.0
    assert not res.config.trim.enabled and all(r.trim is None for r in res.layers.values())
    assert res.trim_guard["final"]["kl"] == 1.5  # measured once more, after the final prune
    ref = make("llama")  # the scorer alone, on every sequence
    prune(ref, None, _cfg(sparsity=0.7), calibration=ids, progress=False)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------ errors, CLI
@pytest.mark.parametrize(
    "flat,needle",
    [
        (dict(search_space="rules,foo"), "--search-space 'rules,foo' is unknown"),
        (dict(search_space="trim"), "needs rules or free too"),
        (
            dict(trim_guard="model"),
            "--trim-guard model compares TRIM with the scorer alone: add --trim",
        ),
        (
            dict(allocation="search", search_holdout=8),
            "--search-holdout 8 leaves no calibration sequence",
        ),
        (dict(search_storage="study.db"), "not a database URL"),
        (dict(search_trials=0), "--search-trials 0"),
        (dict(atp_beta=1.5), "--atp-beta 1.5 must be in [0, 1]"),
        (
            dict(allocation="atp", mask_structure="2:4", sparsity=0.5),
            "--allocation atp cannot be combined",
        ),
        (dict(search_objective="ppl"), "--search-objective 'ppl' is unknown"),
        (
            dict(allocation="search", checkpoint_dir="ck"),
            "--checkpoint-dir cannot be combined with --allocation search",
        ),
        (
            dict(trim=True, trim_guard="model", checkpoint_dir="ck"),
            "--checkpoint-dir cannot be combined with --trim-guard model",
        ),
    ],
)
def test_bad_search_settings_are_one_line_errors(flat, needle):
    with pytest.raises(TrimpruneError) as e:
        _cfg(**flat)
    # the command line names the flags; the Python API the fields (search.space, ...)
    assert needle in e.value.cli_message() and "\n" not in str(e.value), e.value.cli_message()
    assert "--" not in str(e.value) and e.value.fields, str(e.value)


def test_search_is_refused_under_torchrun_and_without_optuna(monkeypatch, tmp_path):
    import sys

    from trimprune.core.ranks import Ranks

    monkeypatch.setattr(Ranks, "current", classmethod(lambda cls: Ranks(0, 2)))
    with pytest.raises(TrimpruneError, match="not under torchrun") as e:
        _search(tmp_path)
    assert "allocation.method search" in str(e.value)
    assert "share one search.storage" in str(e.value)
    with pytest.raises(
        TrimpruneError, match="trim.guard model runs in one process, not under torchrun"
    ):
        prune(
            make("llama"),
            None,
            _cfg(trim=True, trim_guard="model", search_holdout=2),
            calibration=calib(N, L),
            progress=False,
        )
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(TrimpruneError, match=r"pip install 'trimprune\[search\]'"):
        _search(tmp_path)


def test_cli_refuses_a_search_under_torchrun_before_loading_the_model(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    from trimprune.cli import main
    from trimprune.core.ranks import Ranks

    monkeypatch.setattr(Ranks, "current", classmethod(lambda cls: Ranks(1, 2)))
    monkeypatch.setattr(
        "trimprune.io.models.load_model", lambda *a, **k: pytest.fail("the model was loaded")
    )
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_dir),
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--allocation",
            "search",
            "--output",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "--allocation search runs in one process, not under torchrun (2 processes)" in err
    ), err
    assert not (tmp_path / "o").exists()


def test_cli_search_writes_allocation_trials_and_plots(tiny_dir, tmp_path, capsys, with_data_env):
    from trimprune.cli import main

    out = tmp_path / "s"
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_dir),
            "--calib",
            "c4",
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--allocation",
            "search",
            "--search-trials",
            "3",
            "--search-space",
            "rules,free,trim",
            "--sparsity",
            "0.7",
            "--alpha-cache-dir",
            str(tmp_path / "a"),
            "--output",
            str(out),
            "--quiet",
            "--no-save-model",
            "--trim-iterations",
            "3",
            "--trim-lrs",
            "0.04",
            "0.12",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    alloc = json.loads((out / "allocation.json").read_text())
    r = json.loads((out / "report.json").read_text())
    assert alloc["method"] == "search" and alloc["achieved_sparsity"] == pytest.approx(
        0.7, abs=1e-12
    )
    sr = r["search"]
    assert len(sr["trials"]) == 3 and {"number", "params", "value", "seconds", "state"} <= set(
        sr["trials"][0]
    )
    assert sr["holdout_sequences"] == 1 and r["calibration"]["shape"] == [8, 32]
    assert math.isfinite(sr["final_objective"]) and sr["objective"] == "kl"
    assert "plots/search_trials.png" in r["plots"] and "plots/search_profile.png" in r["plots"]
    for p in ("search_trials.png", "search_profile.png"):
        assert (out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Allocation search" in (out / "report.md").read_text()
    capsys.readouterr()
    # the winner replays with --allocation file:
    rep = tmp_path / "replay"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--calib",
                "c4",
                "--nsamples",
                "7",
                "--seqlen",
                "32",
                "--sparsity",
                "0.7",
                "--allocation",
                f"file:{out / 'allocation.json'}",
                "--output",
                str(rep),
                "--quiet",
                "--no-save-model",
                "--trim-iterations",
                "3",
                "--trim-lrs",
                "0.04",
                "0.12",
            ]
            + (["--trim"] if sr["best"]["params"]["trim"] else [])
        )
        == 0
    )
    r2 = json.loads((rep / "report.json").read_text())
    assert r2["allocation"]["per_linear"] == alloc["per_linear"]
    assert r2["sparsity"]["per_block"] == r["sparsity"]["per_block"]


# ------------------------------------------------------------------------------------------ seeds
def test_search_seeds_run_one_study_per_seed_and_keep_the_best_of_all(tmp_path):
    """--search-seeds 3 equals three single-seed searches: each seed's best is that search's best,
    the winner is the lowest, and the final model is the winning seed's own final model."""
    space = dict(search_space="rules,free,trim")
    _, many = _search(tmp_path, trials=5, search_seeds=3, **space)
    singles = {s: _search(tmp_path, trials=5, search_seed=s, **space) for s in (7, 8, 9)}
    sr = many.search
    assert [r["seed"] for r in sr["seeds"]] == [7, 8, 9]
    for r in sr["seeds"]:
        one = singles[r["seed"]][1].search
        assert r["best"]["value"] == one["best"]["value"]
        assert r["best"]["number"] == one["best"]["number"]
        assert r["trials_run"] == 5 and len(r["values"]) == 5
        assert r["values"] == [t["value"] for t in one["trials"]]
        assert r["study"].endswith(f"-seed{r['seed']}")
    values = [r["best"]["value"] for r in sr["seeds"]]
    win = min(range(3), key=lambda i: (values[i], i))
    assert sr["seed"] == 7 + win and sr["best"]["value"] == min(values)
    assert sr["spread"] == {
        "seeds": 3,
        "min": min(values),
        "median": sorted(values)[1],
        "max": max(values),
    }
    winner_model, winner = singles[7 + win]
    assert _trials(many) == _trials(winner)  # the trials kept are the winning seed's
    assert many.allocation.per_linear == winner.allocation.per_linear
    assert many.allocation.details["seed"] == 7 + win
    model = _search(tmp_path, trials=5, search_seeds=3, **space)[0]
    for (n, p1), p2 in zip(model.named_parameters(), winner_model.parameters()):
        assert torch.equal(p1, p2), n


def test_search_seeds_in_the_report(tmp_path):
    from trimprune.io.report import build_report, markdown, summary_text

    _, res = _search(tmp_path, trials=3, search_seeds=2)
    rep = json.loads(json.dumps(build_report(res, {}, {"perplexity": {}}, res.timings)))
    sr = rep["search"]
    text, md = summary_text(rep), markdown(rep)
    line = next(s for s in text.splitlines() if s.startswith("search seeds:"))
    assert "2 studies (seeds 7..8)" in line and f"seed {sr['seed']} won" in line
    assert f"median {sr['spread']['median']:.6g}" in line
    assert "| seed | trials | best trial | family | objective |" in md
    for r in sr["seeds"]:
        assert f"| {r['seed']} | 3 | {r['best']['number']} |" in md
    _, one = _search(tmp_path, trials=3)
    rep1 = json.loads(json.dumps(build_report(one, {}, {"perplexity": {}}, one.timings)))
    assert "search seeds:" not in summary_text(rep1) and "| seed |" not in markdown(rep1)
    assert len(rep1["search"]["seeds"]) == 1 and rep1["search"]["study"].startswith("trimprune-")
    assert not rep1["search"]["study"].endswith("-seed7")  # one seed: the name of earlier releases


@pytest.mark.parametrize("k", [0, 65])
def test_search_seeds_out_of_range_is_a_one_line_error(k):
    with pytest.raises(TrimpruneError) as e:
        _cfg(allocation="search", search_seeds=k)
    assert f"--search-seeds {k} must be an integer in [1, 64]" in e.value.cli_message()


# ------------------------------------------------------------------------------ multi-fidelity stage
@pytest.mark.parametrize(
    "blocks,rung,want", [(2, 0.5, 0), (30, 0.5, 14), (30, 0.1, 2), (30, 0.99, 28), (1, 0.5, 0)]
)
def test_rung_block_is_the_last_of_the_first_fraction_of_blocks(blocks, rung, want):
    from trimprune.search import rung_block

    assert rung_block(blocks, rung) == want


def test_partial_objective_is_that_of_the_model_pruned_up_to_the_rung(tmp_path):
    """Trial 0 (uniform) at the rung: KL(dense || model) on the held-out sequences of the model
    pruned uniformly on the other sequences, with the blocks after the rung put back dense."""
    ids = calib(N, L)
    _, res = _search(tmp_path, trials=1, ids=ids, search_pruner="median", search_space="free")
    t0 = res.search["trials"][0]
    assert t0["params"]["family"] == "free" and t0["partial"]["block"] == 0
    from trimprune.search import Holdout

    dense, model = make("llama"), make("llama")
    held = Holdout(model, ids[N - 2 :], "kl", "cpu")  # the dense pass, as the search's
    prune(model, None, _cfg(nsamples=N - 2), calibration=ids[: N - 2], progress=False)
    with torch.no_grad():
        for p, q in zip(model.model.layers[1].parameters(), dense.model.layers[1].parameters()):
            p.copy_(q)
    got = t0["partial"]["metrics"]["kl"]
    assert got == pytest.approx(held.measure()["kl"], rel=1e-9)  # the same arithmetic
    assert got == pytest.approx(_kl(dense, model, ids[N - 2 :]), rel=1e-3)  # float32 vs float64
    assert t0["value"] > t0["partial"]["metrics"]["kl"] > 0  # both blocks pruned: further away


def test_median_pruner_stops_exactly_the_trials_worse_than_the_median_at_the_rung(tmp_path):
    """Brute-force reference of Optuna's MedianPruner on the recorded partial objectives: once 5
    trials completed, a trial stops iff its partial objective is above the median of the completed
    trials' partial objectives; a stopped trial has no value and is never the winner."""
    import statistics

    _, res = _search(tmp_path, trials=14, search_pruner="median")
    trials, done, stopped = res.search["trials"], [], 0
    for t in trials:
        assert "partial" in t, t["number"]
        p = t["partial"]["metrics"]["kl"]
        stop = len(done) >= 5 and p > statistics.median(done)
        assert t["state"] == ("stopped" if stop else "complete"), t["number"]
        if stop:
            stopped += 1
            assert t["value"] is None and "error" not in t
        else:
            done.append(p)
    assert stopped >= 1 and res.search["trials_stopped"] == stopped
    assert res.search["pruner"] == "median" and res.search["rung_block"] == 0
    assert res.search["best"]["value"] == min(t["value"] for t in trials if t["value"] is not None)
    from trimprune.io.report import build_report, markdown, summary_text

    rep = json.loads(json.dumps(build_report(res, {}, {"perplexity": {}}, res.timings)))
    assert f"{stopped} stopped" in summary_text(rep)
    md = markdown(rep)
    assert f"{stopped} trials stopped there" in md and "after block 0" in md
    one = next(t for t in trials if t["state"] == "stopped")
    assert f"| {one['number']} | stopped |" in md
    assert f"({one['partial']['metrics']['kl']:.6g})" in md
    _, plain = _search(tmp_path, trials=3)
    assert plain.search["pruner"] == "none" and "trials_stopped" not in plain.search
    assert all("partial" not in t for t in plain.search["trials"])


@pytest.mark.parametrize(
    "flat,needle",
    [
        (dict(search_pruner="median"), "--search-pruner median stops trials of the allocation"),
        (
            dict(allocation="search", search_pruner="median", offload=True),
            "--search-pruner median measures the model between two blocks",
        ),
        (dict(search_rung=1.0), "--search-rung 1.0 must be in (0, 1)"),
        (dict(search_rung=0), "--search-rung 0 must be in (0, 1)"),
        (dict(search_pruner="hyperband"), "--search-pruner 'hyperband' is unknown"),
    ],
)
def test_bad_pruner_settings_are_one_line_errors(flat, needle):
    with pytest.raises(TrimpruneError) as e:
        _cfg(**flat)
    assert needle in e.value.cli_message() and "\n" not in str(e.value), e.value.cli_message()
