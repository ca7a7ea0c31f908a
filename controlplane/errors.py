"""The one exception tree of the control plane.

Domain code raises these; the API boundary (`controlplane.api`) maps them to gRPC status
codes through one table. Anything that is not a `GraylaneError` becomes INTERNAL there,
with the traceback logged and a generic message returned.
"""

from __future__ import annotations


class GraylaneError(Exception):
    """Base of every error the control plane raises on purpose."""


class InvalidArgument(GraylaneError):
    """Bad input. The message names the field and the reason: `batches[2].weight: ...`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(GraylaneError):
    pass


class OutOfScope(GraylaneError):
    """The caller's identity is scoped to other services or releases. Maps to PERMISSION_DENIED."""


class AlreadyExists(GraylaneError):
    pass


class FailedPrecondition(GraylaneError):
    """The object is not in a state that allows the change (an illegal phase transition)."""


class Conflict(GraylaneError):
    """A concurrent writer changed the object first (mod_revision guard). Maps to ABORTED."""


class Unavailable(GraylaneError):
    """etcd (or another dependency) cannot be reached, or cannot answer now (no quorum,
    a leader election, a request timed out inside etcd). Transient: retry later."""


class LeaseLost(Unavailable):
    """A write named an etcd lease that has expired (a stall longer than its TTL).

    The holder grants a new lease and writes its keys again; a caller that does not hold
    leases sees it as UNAVAILABLE (retrying meets the renewed lease)."""


class UnsupportedEtcd(GraylaneError):
    """The etcd cluster runs a version Graylane refuses to use."""
