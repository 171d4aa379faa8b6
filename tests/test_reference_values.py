"""Issue 14's guarantee: the redesign changed no statistic. Every mechanism's per-part
statistics, released update, noise, σ and ε on fixed seeds equal, bit for bit, the values
recorded on the code before the move (``tests/reference/mechanism_reference.json``, written by
``python -m tests.reference.record``). A deliberate change of a statistic re-records them, in its
own commit, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reference.scenarios import FIT_CASES, MECHANISM_CASES, fit_case, mechanism_case

REFERENCE = json.loads(
    (Path(__file__).parent / "reference" / "mechanism_reference.json").read_text())


@pytest.mark.parametrize("name", sorted(MECHANISM_CASES))
def test_mechanism_statistics_are_bit_identical(name):
    assert mechanism_case(name) == REFERENCE["mechanisms"][name]


@pytest.mark.parametrize("name", sorted(FIT_CASES))
def test_fit_updates_noise_and_epsilon_are_bit_identical(name, tmp_path):
    got = fit_case(name, tmp_path)
    assert got["steps"] == 4 and len(got["updates"]) == 4
    assert got == REFERENCE["fits"][name]


def test_the_reference_covers_every_mechanism():
    from lit_dpvae.privacy.mechanisms import mechanism_names

    names = {case["kw"].get("mechanism", "termwise") for case in FIT_CASES.values()}
    assert set(mechanism_names()) <= names
