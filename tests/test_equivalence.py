"""What `prune` decides is unchanged: the digests of masks and records of a fixed set of
configurations (tests/equivalence_cases.py) equal those recorded in tests/fixtures/equivalence.json:
masks, the non-float part of the records, trim_lrs and trim_kept exactly, the float records within
a relative tolerance of 1e-4 (see `equivalence_cases.REL_TOL` for why)."""

import copy
import json

import pytest

from aliases import need_alias
from equivalence_cases import (
    FIXTURE,
    compare,
    compare_recorded,
    digest,
    floats_close,
    run_case,
    smollm2_cases,
    tiny_cases,
)

RECORDED = json.loads(FIXTURE.read_text())
TINY = tiny_cases()
SMOLLM2 = smollm2_cases()


def _check(name, case, tmp_path):
    got = digest(run_case(case, str(tmp_path)))
    want = RECORDED[name]
    if "records_exact" not in want:  # only masks / trim_lrs / trim_kept recorded so far
        got = {k: got[k] for k in want if k != "alternatives"}
    bad = compare_recorded(got, want)
    assert not bad, (
        f"{name}: " + "; ".join(bad[:10]) + (f" (+{len(bad) - 10})" if len(bad) > 10 else "")
    )
    if "records_exact" not in RECORDED[name]:
        pytest.fail(f"{name}: records not recorded yet (equivalence_cases.py --write --smollm2)")


def test_every_case_has_a_recorded_digest():
    assert set(TINY) | set(SMOLLM2) == set(RECORDED)
    for name, want in RECORDED.items():
        full = {"masks", "records_exact", "floats", "trim_lrs", "trim_kept"}
        want = {k: v for k, v in want.items() if k != "alternatives"}
        # SmolLM2 cases may lack the records until re-recorded (the masks are never re-recorded)
        assert set(want) == full or (
            name in SMOLLM2 and set(want) == full - {"records_exact", "floats"}
        ), name


def test_floats_close_tolerates_last_bits_only():
    assert floats_close([1.0, -2.5, 0.0, 1e-9], [1.0 + 1e-7, -2.5 * (1 - 1e-6), 1e-8, 0.0]) == []
    assert floats_close([1.01], [1.0])  # 1e-2 relative
    assert floats_close([-3.0 * 1.01], [-3.0])
    assert floats_close([1.0], [1.0, 2.0])  # a record more or less
    assert floats_close([0.5], [0.5 * (1 + 2e-4)])  # beyond rel_tol 1e-4


def test_compare_flags_every_kind_of_change():
    name = max(TINY, key=lambda k: len(RECORDED[k]["floats"]))
    want = RECORDED[name]
    assert compare(copy.deepcopy(want), want) == []
    i = next(i for i, x in enumerate(want["floats"]) if abs(x) > 1e-3)
    for factor, differs in ((1.01, True), (0.99, True), (1 + 1e-7, False)):
        got = copy.deepcopy(want)
        got["floats"][i] *= factor
        assert bool(compare(got, want)) is differs, factor
    for key, value in (
        ("masks", "0" * 32),
        ("records_exact", "0" * 32),
        ("trim_lrs", want["trim_lrs"] + ["9.0"]),
        ("trim_kept", want["trim_kept"] + 1),
    ):
        got = dict(want, **{key: value})
        assert compare(got, want), key
    got = dict(want, floats=want["floats"][:-1])
    assert compare(got, want)


def test_an_alternative_is_accepted_only_when_it_matches_whole():
    name = max(TINY, key=lambda k: len(RECORDED[k]["floats"]))
    want = {k: v for k, v in RECORDED[name].items() if k != "alternatives"}
    other = dict(want, masks="1" * 32, trim_kept=want["trim_kept"] + 1)
    with_alt = dict(want, alternatives=[{"cpu": "AVX512", "digest": other}])
    assert compare_recorded(copy.deepcopy(want), with_alt) == []
    assert compare_recorded(copy.deepcopy(other), with_alt) == []
    mixed = dict(other, trim_kept=want["trim_kept"])  # the alternative's masks, the main's counts
    assert compare_recorded(mixed, with_alt)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_models_decide_as_recorded(name, tmp_path):
    _check(name, TINY[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOLLM2))
def test_smollm2_decides_as_recorded(name, tmp_path, with_data_env):
    need_alias("smollm2-135m")
    _check(name, SMOLLM2[name], tmp_path)
