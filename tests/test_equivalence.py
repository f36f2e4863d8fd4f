"""What `prune` decides is unchanged: the digests of masks and records of a fixed set of
configurations (tests/equivalence_cases.py) equal those recorded in tests/fixtures/equivalence.json."""

import json

import pytest

from aliases import need_alias
from equivalence_cases import FIXTURE, digest, run_case, smollm2_cases, tiny_cases

RECORDED = json.loads(FIXTURE.read_text())
TINY = tiny_cases()
SMOLLM2 = smollm2_cases()


def _check(name, case, tmp_path):
    got = digest(run_case(case, str(tmp_path)))
    assert got == RECORDED[name], f"{name}: {got} != recorded {RECORDED[name]}"


def test_every_case_has_a_recorded_digest():
    assert set(TINY) | set(SMOLLM2) == set(RECORDED)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_models_decide_as_recorded(name, tmp_path):
    _check(name, TINY[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOLLM2))
def test_smollm2_decides_as_recorded(name, tmp_path, with_data_env):
    need_alias("smollm2-135m")
    _check(name, SMOLLM2[name], tmp_path)
