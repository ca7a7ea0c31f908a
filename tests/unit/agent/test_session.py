"""Reconnect backoff of the agent's control-plane session (agent/session.py)."""

from __future__ import annotations

import random

import pytest
from graylane.agent.session import Backoff


def test_full_jitter_stays_within_the_exponential_ceiling_and_the_cap() -> None:
    backoff = Backoff(base=0.1, cap=5.0, rng=random.Random(7))
    ceilings = [min(5.0, 0.1 * 2**n) for n in range(12)]
    for ceiling in ceilings:
        samples = []
        for _ in range(200):
            backoff.reset()
            for _ in range(ceilings.index(ceiling)):
                backoff.next()
            samples.append(backoff.next())
        assert all(0.0 <= s <= ceiling for s in samples), ceiling
        # Full jitter: the draws spread over the whole interval, not near one point.
        assert max(samples) > 0.8 * ceiling and min(samples) < 0.2 * ceiling, ceiling


def test_the_ceiling_stops_growing_at_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=2.0, rng=random.Random(1))
    draws = [backoff.next() for _ in range(1000)]  # the exponent is clamped: no overflow
    assert max(draws) <= 2.0
    assert max(draws[3:]) > 1.5  # from the third attempt the ceiling is the cap
    assert backoff.longest() == 2.0


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(base=0.1, cap=5.0, rng=random.Random(3))
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.next() <= 0.1
    assert backoff.next() <= 0.2


@pytest.mark.parametrize("seed", range(5))
def test_first_retry_is_quick(seed: int) -> None:
    assert Backoff(base=0.1, cap=5.0, rng=random.Random(seed)).next() <= 0.1
