"""Helpers shared by the control plane's unit tests: one canary release built from values.

The tests import them (`from tests.unit.controlplane.conftest import ...`); nothing here
starts a process.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from graylane.controlplane.domain.model import values

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def canary_release(
    phase: values.Phase = values.Phase.PROGRESSING,
    batch: int = 1,
    *,
    weights: tuple[int, ...] = (10, 50, 100),
    created: datetime = NOW,
    **status: Any,
) -> values.Release:
    """Release "r": canary of checkout v1 -> v2 in lane "lane", no match rules, one batch a
    weight; `status` holds the ReleaseStatus fields besides phase and batch."""
    spec = values.ReleaseSpec(
        lane="lane",
        entry="checkout",
        services=(values.ServiceVersions("checkout", "v1", "v2"),),
        strategy=values.Strategy.CANARY,
        match=(),
        batches=tuple(values.Batch(w, None) for w in weights),
    )
    return values.Release("r", spec, values.ReleaseStatus(phase=phase, batch=batch, **status), created=created)
