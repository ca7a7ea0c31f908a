"""Release domain values, and the one place API messages become them.

Owns: the frozen values the control plane works on (`ReleaseSpec`, `ReleaseStatus`,
`Release`, `Event`, `Service`, `Version`), their validation (`spec_from_proto` and
friends raise `InvalidArgument` naming the field) and their conversion back to protos.
Inside the control plane these values are trusted; nothing else reads raw requests.

Must not import: etcd (that is `controlplane.store`), graylane.xds.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import re2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from graylane.controlplane.analysis import AnalysisSpec, OnInconclusive, check_analysis_spec
from graylane.controlplane.errors import InvalidArgument
from graylane.controlplane.webhooks import MAX_TIMEOUT_S as WEBHOOK_MAX_TIMEOUT_S
from graylane.controlplane.webhooks import Webhook, WebhookKind
from graylane.v1 import agent_pb2 as apb
from graylane.v1 import release_pb2 as pb

# Every pattern below is applied with `fullmatch`: `re.match` with `$` would accept a
# value ending in a newline ("evil\n"), which Envoy then rejects in every later update.
# DNS-label-like names keep every name usable as an HTTP authority, an Envoy cluster
# name part and an etcd key segment.
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
# A lane travels as an HTTP header value and a W3C baggage value: keep it a plain token.
_LANE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
# HTTP header field names (RFC 9110 token), lower-cased as Envoy compares them.
_HEADER = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,256}")
_COOKIE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}")
# Query parameter names as they appear in a URL (RFC 3986 query characters, percent
# escapes included), without the separators "&", "=" and "#".
_QUERY = re.compile(r"[A-Za-z0-9._~!$'()*+,;:@/?%\[\]-]{1,256}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Envoy rejects regexes whose RE2 program is larger than this by default.
RE2_MAX_PROGRAM_SIZE = 100

# Limits on what the API accepts (README "Limits"). Far above what a real release needs;
# they keep one request from stalling the event loop or bloating etcd. Checked when a
# request comes in; values read back from etcd are not refused for them (see `stored`).
MAX_SPEC_BYTES = 256 * 1024  # a ReleaseSpec, encoded
MAX_SERVICES = 100  # per release
MAX_RULES = 64  # match rules per release
MAX_CONDITIONS = 16  # conditions per rule
MAX_VALUE_BYTES = 4096  # a condition's value
MAX_BATCHES = 100
MAX_GRAY_CLUSTERS = 100
MAX_WEBHOOKS = 16
MAX_URL_BYTES = 2048
MAX_TEXT_BYTES = 4096  # reasons, descriptions, change summaries
MAX_LABEL_BYTES = 256  # actors, authors, agent ids and versions
MAX_IMAGE_BYTES = 1024
MAX_VERSION_ENDPOINTS = 1024  # statically registered per version
MAX_PAUSE = timedelta(days=30)
MAX_ANALYSIS_INTERVAL = timedelta(days=1)

# The shapes `graylane.xds.render` wraps cookie conditions and lanes in (kept in step with
# it by a test): Envoy compiles the wrapped regex, so its program size is what counts.
_OWS = "[ \t]*"
_COOKIE_BEFORE = "(?:.*[;,])?" + _OWS
_BAGGAGE_BEFORE = "(?:.*,)?" + _OWS
_REST = "(?:[;,].*)?"


class Phase(enum.Enum):
    PENDING = pb.PENDING
    PROGRESSING = pb.PROGRESSING
    PAUSED = pb.PAUSED
    SUCCEEDED = pb.SUCCEEDED
    ROLLED_BACK = pb.ROLLED_BACK
    FAILED = pb.FAILED

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.FAILED)

    @property
    def routes_lane(self) -> bool:
        """Whether a release in this phase has a live lane in the routing view."""
        return self in (Phase.PROGRESSING, Phase.PAUSED)


class Strategy(enum.Enum):
    CANARY = pb.CANARY
    BLUE_GREEN = pb.BLUE_GREEN
    AB = pb.AB


class MatchKind(enum.Enum):
    HEADER = pb.HEADER
    COOKIE = pb.COOKIE
    QUERY = pb.QUERY
    PATH = pb.PATH


class MatchOp(enum.Enum):
    EXACT = pb.EXACT
    PREFIX = pb.PREFIX
    REGEX = pb.REGEX
    PRESENT = pb.PRESENT


@dataclass(frozen=True, slots=True)
class Condition:
    kind: MatchKind
    name: str
    op: MatchOp
    value: str


@dataclass(frozen=True, slots=True)
class Batch:
    weight: int
    pause: timedelta | None  # None: wait for a manual `next`


@dataclass(frozen=True, slots=True)
class ServiceVersions:
    service: str
    base_version: str
    gray_version: str


@dataclass(frozen=True, slots=True)
class Cohort:
    """The key whose consistent hash makes the batch decision sticky (HEADER or COOKIE)."""

    kind: MatchKind
    name: str


@dataclass(frozen=True, slots=True)
class ReleaseSpec:
    lane: str
    entry: str
    services: tuple[ServiceVersions, ...]
    strategy: Strategy
    match: tuple[tuple[Condition, ...], ...]
    batches: tuple[Batch, ...]
    gray_clusters: tuple[str, ...] = ()
    cohort: Cohort | None = None
    analysis: AnalysisSpec | None = None


@dataclass(frozen=True, slots=True)
class Nack:
    node: str
    type_url: str
    version: str
    message: str
    at: datetime
    stream: str = ""  # the xDS stream (one proxy) that sent it
    cluster: str = ""  # the proxy's Envoy cluster


@dataclass(frozen=True, slots=True)
class HeldLane:
    """A release's lane as proxies accepted it (kept while a NACK holds the release, so a
    rejected edit of the spec falls back to it rather than to no lane)."""

    entry: str
    weight: int
    match: tuple[tuple[Condition, ...], ...]
    versions: tuple[tuple[str, str], ...]  # (service, gray version), sorted


@dataclass(frozen=True, slots=True)
class ReleaseStatus:
    phase: Phase = Phase.PENDING
    batch: int = -1
    reason: str = ""
    reached: bool = False
    proxies: int = 0
    converged: int = 0
    target_version: str = ""  # digest of this release's own target (not a global version)
    last_nack: Nack | None = None
    batch_started: datetime | None = None
    batch_reached: datetime | None = None
    events: int = 0
    generation: int = 1
    lagging: tuple[str, ...] = ()  # first few proxies not carrying the target, with why
    gone: int = 0  # proxies declared gone by the stale-proxy rule (not in `proxies`)
    gone_names: tuple[str, ...] = ()
    # While a NACK holds the release (PAUSED with last_nack): the batch its proxies keep
    # being served, -1 for none (no lane). Meaningless otherwise.
    held_batch: int | None = None
    # While held: the lane its proxies accepted (None: none, or held before this was kept).
    held_lane: HeldLane | None = None


@dataclass(frozen=True, slots=True)
class Release:
    name: str
    spec: ReleaseSpec
    status: ReleaseStatus
    created: datetime
    revision: int = 0  # etcd mod_revision it was read at; 0 for a value not yet stored

    def weight(self) -> int:
        """The gray share the current phase and batch ask for."""
        return weight_of(self.spec, self.status)


def weight_of(spec: ReleaseSpec, status: ReleaseStatus) -> int:
    if status.phase is Phase.SUCCEEDED:
        return 100
    if not status.phase.routes_lane or status.batch < 0:
        return 0
    return spec.batches[status.batch].weight


def held(status: ReleaseStatus) -> bool:
    """A NACK holds the release at what its proxies last accepted (until resumed)."""
    return status.phase is Phase.PAUSED and status.last_nack is not None and status.held_batch is not None


def draining(status: ReleaseStatus) -> bool:
    """A rolled-back (or failed) release whose proxies do not all carry that yet.

    Its lane stays in the routing view, admitting nothing (weight 0, no rules), so a request
    the entry admitted before it stopped keeps its lane on the later hops instead of
    falling to base half-way (Envoys of one chain apply a change at different instants).
    The lane goes once every proxy carries the drained lane (`reached`). A rollback that
    follows a NACK drains nothing: the lane goes at once, as the rejecting proxy has it.
    """
    return status.phase in (Phase.ROLLED_BACK, Phase.FAILED) and not status.reached and status.last_nack is None


def served_weight_of(spec: ReleaseSpec, status: ReleaseStatus) -> int:
    """The weight proxies are served: the asked weight, or the held lane's under a NACK."""
    if held(status):
        if status.held_lane is not None:
            return status.held_lane.weight
        batch = status.held_batch if status.held_batch is not None else -1
        return spec.batches[batch].weight if 0 <= batch < len(spec.batches) else 0
    return weight_of(spec, status)


@dataclass(frozen=True, slots=True)
class Event:
    release: str
    sequence: int
    at: datetime
    action: str
    actor: str
    reason: str
    from_phase: Phase
    to_phase: Phase
    from_batch: int
    to_batch: int
    weight: int
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    stable_version: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    cluster: str = ""


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """A cluster as its agent announced it: where other clusters reach its services."""

    name: str
    gateway_host: str
    gateway_port: int
    agent_id: str
    agent_version: str = ""


@dataclass(frozen=True, slots=True)
class ClusterEndpoints:
    """The endpoints one agent reports for one version in its cluster."""

    service: str
    version: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Version:
    service: str
    name: str
    image: str = ""
    author: str = ""
    created: datetime | None = None
    change_summary: str = ""
    endpoints: tuple[Endpoint, ...] = ()


# --------------------------------------------------------------------------- validation


def check_name(field_name: str, value: str, *, pattern: re.Pattern[str] = _NAME) -> str:
    if not value:
        raise InvalidArgument(field_name, "is required")
    if not pattern.fullmatch(value):
        raise InvalidArgument(
            field_name,
            f"{value!r} is not a valid name (lower-case letters, digits and '-', at most 63)",
        )
    return value


def check_version_name(field_name: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field_name, "is required")
    if not _VERSION.fullmatch(value):
        raise InvalidArgument(field_name, f"{value!r} is not a valid version (letters, digits, '.', '_', '-')")
    return value


def check_text(field_name: str, value: str, *, limit: int = MAX_TEXT_BYTES) -> str:
    """Free text (a reason, a description) of at most `limit` UTF-8 bytes."""
    size = len(value.encode())
    if size > limit:
        raise InvalidArgument(field_name, f"is {size} bytes, above the limit of {limit}")
    return value


def _check_count(field_name: str, items: Sized, limit: int, what: str) -> None:
    if len(items) > limit:
        raise InvalidArgument(field_name, f"{len(items)} {what} is above the limit of {limit}")


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def check_duration(field_name: str, d: Duration, *, maximum: timedelta, stored: bool = False) -> timedelta:
    """A Duration message as a timedelta of at most `maximum` (positivity is the caller's).

    A value above `maximum` is refused; read back from etcd (`stored`), where an older
    version may have let it in, it is clamped instead, so no reader ever overflows on it.
    """
    seconds, nanos = d.seconds, d.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidArgument(field_name, f"seconds={seconds} nanos={nanos} is not a valid duration")
    total_ns = seconds * 1_000_000_000 + nanos
    limit_ns = (maximum // timedelta(microseconds=1)) * 1000
    if total_ns > limit_ns:
        if stored:
            return maximum
        raise InvalidArgument(
            field_name, f"{_human(total_ns / 1e9)} is above the maximum of {_human(maximum.total_seconds())}"
        )
    return timedelta(microseconds=int(total_ns / 1000))


def _check_program_size(field_name: str, regex: str, what: str) -> None:
    try:
        size = re2.compile(regex).programsize
    except re2.error as exc:
        raise InvalidArgument(field_name, f"{what} is not a valid RE2 regex: {exc}") from exc
    if size > RE2_MAX_PROGRAM_SIZE:
        raise InvalidArgument(
            field_name, f"{what} compiles to RE2 program size {size}, above Envoy's limit of {RE2_MAX_PROGRAM_SIZE}"
        )


def _check_regex(field_name: str, value: str) -> None:
    try:
        compiled = re2.compile(value)
    except re2.error as exc:
        raise InvalidArgument(field_name, f"{value!r} is not a valid RE2 regex: {exc}") from exc
    size = compiled.programsize
    if size > RE2_MAX_PROGRAM_SIZE:
        raise InvalidArgument(
            field_name,
            f"regex program size {size} is above Envoy's limit of {RE2_MAX_PROGRAM_SIZE}",
        )


def _literal(text: str) -> str:
    escaped: str = re2.escape(text)
    return escaped


def cookie_regex(name: str, op: MatchOp, value: str) -> str:
    """The regex Envoy gets for a cookie condition (`graylane.xds.render` builds the same)."""
    head = _COOKIE_BEFORE + _literal(name) + "="
    if op is MatchOp.EXACT:
        return head + _literal(value) + _OWS + _REST
    if op is MatchOp.PREFIX:
        return head + _literal(value) + "[^;,]*" + _REST
    if op is MatchOp.REGEX:
        return head + "(?:" + value + ")" + _OWS + _REST
    return head + ".*"


def lane_regex(lane: str) -> str:
    """The regex Envoy gets to find a lane in W3C baggage (as `graylane.xds.render` builds it)."""
    return _BAGGAGE_BEFORE + _literal("graylane") + _OWS + "=" + _OWS + _literal(lane) + _OWS + _REST


_MATCH_KINDS = frozenset(k.value for k in MatchKind)
_MATCH_OPS = frozenset(o.value for o in MatchOp)


def _condition_from_proto(where: str, c: pb.Condition, *, stored: bool) -> Condition:
    if c.kind == pb.MATCH_KIND_UNSPECIFIED:
        raise InvalidArgument(f"{where}.kind", "is required (header, cookie, query or path)")
    if c.kind not in _MATCH_KINDS:
        raise InvalidArgument(f"{where}.kind", f"unknown match kind {c.kind} (header, cookie, query or path)")
    if c.op == pb.MATCH_OP_UNSPECIFIED:
        raise InvalidArgument(f"{where}.op", "is required (exact, prefix, regex or present)")
    if c.op not in _MATCH_OPS:
        raise InvalidArgument(f"{where}.op", f"unknown match op {c.op} (exact, prefix, regex or present)")
    if not stored:
        check_text(f"{where}.value", c.value, limit=MAX_VALUE_BYTES)
    kind, op = MatchKind(c.kind), MatchOp(c.op)
    name = c.name
    if kind is MatchKind.PATH:
        if name:
            raise InvalidArgument(f"{where}.name", "must be empty for a path condition")
        if op is MatchOp.PRESENT:
            raise InvalidArgument(f"{where}.op", "present does not apply to a path")
        if op is not MatchOp.REGEX and not c.value.startswith("/"):
            raise InvalidArgument(f"{where}.value", f"path {c.value!r} must start with '/'")
    elif kind is MatchKind.HEADER:
        name = name.lower()
        if not name or not _HEADER.fullmatch(name):
            raise InvalidArgument(f"{where}.name", f"{c.name!r} is not a valid header name")
    elif kind is MatchKind.COOKIE:
        if not name or not _COOKIE.fullmatch(name):
            raise InvalidArgument(f"{where}.name", f"{c.name!r} is not a valid cookie name")
    elif not name:
        raise InvalidArgument(f"{where}.name", "query parameter name is required")
    elif not _QUERY.fullmatch(name):
        raise InvalidArgument(
            f"{where}.name",
            f"{c.name!r} is not a valid query parameter name (URL query characters without '&', '=' and '#', "
            "at most 256)",
        )
    if op is MatchOp.PRESENT:
        if c.value:
            raise InvalidArgument(f"{where}.value", "must be empty for a present condition")
    elif op is MatchOp.REGEX and not stored:
        # Compiled when it was accepted; a stored regex is trusted (no RE2 compile per read).
        _check_regex(f"{where}.value", c.value)
    elif not c.value:
        raise InvalidArgument(f"{where}.value", "is required")
    if any(ch in c.value for ch in "\r\n\0"):
        raise InvalidArgument(f"{where}.value", "must not contain control characters")
    if kind is MatchKind.COOKIE and not stored:
        # Envoy matches a cookie inside the whole Cookie header: the name and value are
        # wrapped in a larger regex, and that one has to fit Envoy's program size.
        _check_program_size(
            f"{where}.name" if op is MatchOp.PRESENT else f"{where}.value",
            cookie_regex(name, op, c.value),
            f"cookie {name!r} (matched inside the Cookie header)",
        )
    return Condition(kind=kind, name=name, op=op, value=c.value)


def _rules_from_proto(rules: Sequence[pb.MatchRule], *, stored: bool) -> tuple[tuple[Condition, ...], ...]:
    if not stored:
        _check_count("spec.match", rules, MAX_RULES, "rules")
    out = []
    for i, rule in enumerate(rules):
        where = f"spec.match[{i}]"
        if not rule.conditions:
            raise InvalidArgument(f"{where}.conditions", "a rule needs at least one condition")
        if not stored:
            _check_count(f"{where}.conditions", rule.conditions, MAX_CONDITIONS, "conditions")
        conditions = tuple(
            _condition_from_proto(f"{where}.conditions[{j}]", c, stored=stored) for j, c in enumerate(rule.conditions)
        )
        if sum(1 for c in conditions if c.kind is MatchKind.PATH) > 1:
            raise InvalidArgument(f"{where}.conditions", "at most one path condition per rule")
        out.append(conditions)
    return tuple(out)


def _batches_from_proto(spec: pb.ReleaseSpec, strategy: Strategy, *, stored: bool) -> tuple[Batch, ...]:
    if not stored:
        _check_count("spec.batches", spec.batches, MAX_BATCHES, "batches")
    out: list[Batch] = []
    previous = -1
    for i, b in enumerate(spec.batches):
        where = f"spec.batches[{i}]"
        if b.weight > 100:
            raise InvalidArgument(f"{where}.weight", f"{b.weight} is above 100")
        if strategy is Strategy.BLUE_GREEN and b.weight not in (0, 100):
            raise InvalidArgument(f"{where}.weight", f"{b.weight}: blue-green weights are 0 or 100")
        if strategy is Strategy.AB and b.weight != 0:
            raise InvalidArgument(f"{where}.weight", f"{b.weight}: an AB release routes by rules only")
        if strategy is Strategy.CANARY and b.weight < previous:
            raise InvalidArgument(f"{where}.weight", f"{b.weight} is below the previous batch's {previous}")
        previous = b.weight
        pause: timedelta | None = None
        which = b.pause.WhichOneof("kind")
        if which == "duration":
            pause = check_duration(f"{where}.pause.duration", b.pause.duration, maximum=MAX_PAUSE, stored=stored)
            if pause <= timedelta(0):
                raise InvalidArgument(f"{where}.pause.duration", "must be positive")
        elif which == "manual" and not b.pause.manual:
            raise InvalidArgument(f"{where}.pause.manual", "set it to true, or give a duration")
        out.append(Batch(weight=b.weight, pause=pause))
    if not out:
        # Every strategy has a sensible single step when none is given.
        default = {Strategy.CANARY: None, Strategy.BLUE_GREEN: 100, Strategy.AB: 0}[strategy]
        if default is None:
            raise InvalidArgument("spec.batches", "a canary release needs at least one batch")
        out.append(Batch(weight=default, pause=None))
    return tuple(out)


def spec_from_proto(spec: pb.ReleaseSpec, *, stored: bool = False) -> ReleaseSpec:
    """Validate a ReleaseSpec message and turn it into a trusted domain value.

    `stored`: the spec is read back from etcd. It passed validation when it was written,
    perhaps by an older version with looser limits, so the size limits are not applied
    and an out-of-range duration is clamped: reading must never fail on a value the
    store already holds.
    """
    if not stored:
        size = spec.ByteSize()
        if size > MAX_SPEC_BYTES:
            raise InvalidArgument("spec", f"is {size} bytes encoded, above the limit of {MAX_SPEC_BYTES}")
    if not spec.lane:
        raise InvalidArgument("spec.lane", "is required")
    if not _LANE.fullmatch(spec.lane):
        raise InvalidArgument(
            "spec.lane",
            f"{spec.lane!r} is not a valid lane: it travels as an HTTP header value and a W3C baggage "
            "value (lower-case letters, digits, '.', '_' and '-', at most 63)",
        )
    lane = spec.lane
    if not stored:
        _check_program_size("spec.lane", lane_regex(lane), f"lane {lane!r} (matched inside the baggage header)")
    strategy_value = spec.strategy or pb.CANARY
    if strategy_value not in (pb.CANARY, pb.BLUE_GREEN, pb.AB):
        raise InvalidArgument("spec.strategy", f"unknown strategy {strategy_value}")
    strategy = Strategy(strategy_value)
    if not spec.services:
        raise InvalidArgument("spec.services", "at least one service is required")
    if not stored:
        _check_count("spec.services", spec.services, MAX_SERVICES, "services")
        _check_count("spec.placement.gray_clusters", spec.placement.gray_clusters, MAX_GRAY_CLUSTERS, "clusters")
    services: list[ServiceVersions] = []
    seen: set[str] = set()
    for i, s in enumerate(spec.services):
        where = f"spec.services[{i}]"
        name = check_name(f"{where}.service", s.service)
        if name in seen:
            raise InvalidArgument(f"{where}.service", f"{name!r} is listed twice")
        seen.add(name)
        base = check_version_name(f"{where}.base_version", s.base_version)
        gray = check_version_name(f"{where}.gray_version", s.gray_version)
        if base == gray:
            raise InvalidArgument(f"{where}.gray_version", f"{gray!r} equals the base version")
        services.append(ServiceVersions(service=name, base_version=base, gray_version=gray))
    entry = spec.entry or (services[0].service if len(services) == 1 else "")
    check_name("spec.entry", entry)
    if entry not in seen:
        raise InvalidArgument(
            "spec.entry", f"{entry!r} is not one of the release's services ({', '.join(sorted(seen))})"
        )
    match = _rules_from_proto(spec.match, stored=stored)
    if strategy is Strategy.AB and not match:
        raise InvalidArgument("spec.match", "an AB release needs at least one rule")
    clusters = tuple(
        check_name(f"spec.placement.gray_clusters[{i}]", c) for i, c in enumerate(spec.placement.gray_clusters)
    )
    return ReleaseSpec(
        lane=lane,
        entry=entry,
        services=tuple(services),
        strategy=strategy,
        match=match,
        batches=_batches_from_proto(spec, strategy, stored=stored),
        gray_clusters=clusters,
        cohort=_cohort_from_proto(spec) if spec.HasField("cohort") else None,
        analysis=analysis_from_proto(spec.analysis, stored=stored) if spec.HasField("analysis") else None,
    )


_WEBHOOK_KINDS = {
    pb.PRE_ROLLOUT: WebhookKind.PRE_ROLLOUT,
    pb.CONFIRM_BATCH: WebhookKind.CONFIRM_BATCH,
    pb.POST_ROLLOUT: WebhookKind.POST_ROLLOUT,
    pb.ROLLBACK: WebhookKind.ROLLBACK,
}
_WEBHOOK_KIND_VALUES = {v: k for k, v in _WEBHOOK_KINDS.items()}


def analysis_from_proto(a: pb.Analysis, *, where: str = "spec.analysis", stored: bool = False) -> AnalysisSpec:
    """Validate an Analysis message (defaults for what is unset) into an `AnalysisSpec`."""
    defaults = AnalysisSpec()
    if not stored:
        _check_count(f"{where}.webhooks", a.webhooks, MAX_WEBHOOKS, "webhooks")
    hooks = []
    for i, h in enumerate(a.webhooks):
        at = f"{where}.webhooks[{i}]"
        kind = _WEBHOOK_KINDS.get(h.kind)
        if kind is None:
            raise InvalidArgument(f"{at}.kind", "is required (PRE_ROLLOUT, CONFIRM_BATCH, ...)")
        if not stored:
            check_text(f"{at}.url", h.url, limit=MAX_URL_BYTES)
        timeout_s = 5.0
        if h.HasField("timeout"):
            limit = timedelta(seconds=WEBHOOK_MAX_TIMEOUT_S)
            timeout_s = check_duration(f"{at}.timeout", h.timeout, maximum=limit, stored=stored).total_seconds()
        hooks.append(
            Webhook(
                name=h.name,
                kind=kind,
                url=h.url,
                timeout_s=timeout_s,
                retries=h.retries if h.HasField("retries") else 2,
            )
        )
    if a.on_inconclusive and a.on_inconclusive not in {o.value for o in OnInconclusive}:
        raise InvalidArgument(f"{where}.on_inconclusive", f"{a.on_inconclusive!r} is not pause or fail")
    if a.HasField("interval"):
        interval = check_duration(
            f"{where}.interval", a.interval, maximum=MAX_ANALYSIS_INTERVAL, stored=stored
        ).total_seconds()
    else:
        interval = defaults.interval_s
    spec = AnalysisSpec(
        interval_s=interval,
        min_requests=a.min_requests if a.HasField("min_requests") else defaults.min_requests,
        max_error_rate=a.max_error_rate if a.HasField("max_error_rate") else None,
        max_p99_ms=a.max_p99_ms if a.HasField("max_p99_ms") else None,
        baseline=a.baseline,
        alpha=a.alpha if a.HasField("alpha") else defaults.alpha,
        min_effect=a.min_effect if a.HasField("min_effect") else defaults.min_effect,
        error_rate_margin=a.error_rate_margin if a.HasField("error_rate_margin") else defaults.error_rate_margin,
        failure_limit=a.failure_limit if a.failure_limit else defaults.failure_limit,
        inconclusive_limit=a.inconclusive_limit if a.inconclusive_limit else defaults.inconclusive_limit,
        on_inconclusive=OnInconclusive(a.on_inconclusive) if a.on_inconclusive else defaults.on_inconclusive,
        passes_to_advance=a.passes_to_advance if a.passes_to_advance else defaults.passes_to_advance,
        webhooks=tuple(hooks),
    )
    return check_analysis_spec(spec, where=where)


def analysis_to_proto(a: AnalysisSpec | None) -> pb.Analysis | None:
    if a is None:
        return None
    message = pb.Analysis(
        min_requests=a.min_requests,
        baseline=a.baseline,
        alpha=a.alpha,
        min_effect=a.min_effect,
        error_rate_margin=a.error_rate_margin,
        failure_limit=a.failure_limit,
        inconclusive_limit=a.inconclusive_limit,
        on_inconclusive=a.on_inconclusive.value,
        passes_to_advance=a.passes_to_advance,
    )
    message.interval.FromTimedelta(timedelta(seconds=a.interval_s))
    if a.max_error_rate is not None:
        message.max_error_rate = a.max_error_rate
    if a.max_p99_ms is not None:
        message.max_p99_ms = a.max_p99_ms
    for h in a.webhooks:
        hook = message.webhooks.add(name=h.name, kind=_WEBHOOK_KIND_VALUES[h.kind], url=h.url, retries=h.retries)
        hook.timeout.FromTimedelta(timedelta(seconds=h.timeout_s))
    return message


def _cohort_from_proto(spec: pb.ReleaseSpec) -> Cohort:
    c = spec.cohort
    if c.header and c.cookie:
        raise InvalidArgument("spec.cohort", "set header or cookie, not both")
    if c.header:
        if not _HEADER.fullmatch(c.header):
            raise InvalidArgument("spec.cohort.header", f"{c.header!r} is not a valid lower-case header name")
        return Cohort(kind=MatchKind.HEADER, name=c.header)
    if c.cookie:
        if not _COOKIE.fullmatch(c.cookie):
            raise InvalidArgument("spec.cohort.cookie", f"{c.cookie!r} is not a valid cookie name")
        return Cohort(kind=MatchKind.COOKIE, name=c.cookie)
    raise InvalidArgument("spec.cohort", "set header or cookie (or leave the cohort out)")


def service_from_proto(s: pb.Service, *, stored: bool = False) -> Service:
    """Validate a Service message; `stored` (read back from etcd) skips the size limits."""
    if not stored:
        check_text("service.description", s.description)
    return Service(
        name=check_name("service.name", s.name),
        stable_version=check_version_name("service.stable_version", s.stable_version),
        description=s.description,
    )


def valid_address(address: str) -> bool:
    """An IPv4/IPv6 literal or a DNS host name (what Envoy can connect to)."""
    if not address:
        return False
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        pass
    if address.replace(".", "").isdigit():
        return False  # looks like an IPv4 literal but is not one (999.1.1.1)
    return len(address) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in address.split("."))


def _endpoint_from_proto(where: str, e: pb.Endpoint) -> Endpoint:
    if not valid_address(e.address):
        raise InvalidArgument(f"{where}.address", f"{e.address!r} is not an IP address or host name")
    if not 0 < e.port < 65536:
        raise InvalidArgument(f"{where}.port", f"{e.port} is not a valid port (1..65535)")
    cluster = check_name(f"{where}.cluster", e.cluster) if e.cluster else ""
    return Endpoint(address=e.address, port=e.port, cluster=cluster)


# The range a Timestamp may hold (0001-01-01 to 9999-12-31), as datetime can.
_MIN_TIMESTAMP_S = -62_135_596_800
_MAX_TIMESTAMP_S = 253_402_300_799


def version_from_proto(v: pb.Version, *, stored: bool = False) -> Version:
    """Validate a Version message; `stored` (read back from etcd) skips the size limits."""
    md = v.metadata
    if not stored:
        _check_count("version.endpoints", v.endpoints, MAX_VERSION_ENDPOINTS, "endpoints")
        check_text("version.metadata.image", md.image, limit=MAX_IMAGE_BYTES)
        check_text("version.metadata.author", md.author, limit=MAX_LABEL_BYTES)
        check_text("version.metadata.change_summary", md.change_summary)
    if md.HasField("created") and not (
        _MIN_TIMESTAMP_S <= md.created.seconds <= _MAX_TIMESTAMP_S and 0 <= md.created.nanos < 1_000_000_000
    ):
        raise InvalidArgument("version.metadata.created", "is not a valid time (years 1 to 9999)")
    endpoints = tuple(_endpoint_from_proto(f"version.endpoints[{i}]", e) for i, e in enumerate(v.endpoints))
    if len(set(endpoints)) != len(endpoints):
        raise InvalidArgument("version.endpoints", "an endpoint is listed twice")
    return Version(
        service=check_name("version.service", v.service),
        name=check_version_name("version.name", v.name),
        image=md.image,
        author=md.author,
        created=md.created.ToDatetime(tzinfo=UTC) if md.HasField("created") else None,
        change_summary=md.change_summary,
        endpoints=endpoints,
    )


# ------------------------------------------------------------------------ to protos


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _dt(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


def spec_to_proto(spec: ReleaseSpec) -> pb.ReleaseSpec:
    batches = []
    for b in spec.batches:
        if b.pause is None:
            pause = pb.Pause(manual=True)
        else:
            d = Duration()
            d.FromTimedelta(b.pause)
            pause = pb.Pause(duration=d)
        batches.append(pb.Batch(weight=b.weight, pause=pause))
    return pb.ReleaseSpec(
        lane=spec.lane,
        entry=spec.entry,
        services=[
            pb.ServiceVersions(service=s.service, base_version=s.base_version, gray_version=s.gray_version)
            for s in spec.services
        ],
        strategy=spec.strategy.value,
        match=_rules_to_proto(spec.match),
        batches=batches,
        placement=pb.Placement(gray_clusters=list(spec.gray_clusters)),
        cohort=_cohort_to_proto(spec.cohort),
        analysis=analysis_to_proto(spec.analysis),
    )


def _cohort_to_proto(cohort: Cohort | None) -> pb.Cohort | None:
    if cohort is None:
        return None
    if cohort.kind is MatchKind.HEADER:
        return pb.Cohort(header=cohort.name)
    return pb.Cohort(cookie=cohort.name)


def status_to_proto(release: Release) -> pb.ReleaseStatus:
    st = release.status
    nack = None
    if st.last_nack is not None:
        n = st.last_nack
        nack = pb.Nack(
            node=n.node,
            type_url=n.type_url,
            version=n.version,
            message=n.message,
            at=_ts(n.at),
            stream=n.stream,
            cluster=n.cluster,
        )
    return pb.ReleaseStatus(
        phase=st.phase.value,
        batch=st.batch,
        weight=release.weight(),
        reached=st.reached,
        reason=st.reason,
        convergence=pb.ProxyConvergence(
            proxies=st.proxies,
            converged=st.converged,
            target_version=st.target_version,
            lagging=st.lagging,
            gone=st.gone,
            gone_names=st.gone_names,
        ),
        last_nack=nack,
        batch_started=_ts(st.batch_started),
        batch_reached=_ts(st.batch_reached),
        events=st.events,
        generation=st.generation,
        served_weight=served_weight_of(release.spec, st),
        held_batch=st.held_batch,
        held_lane=_held_lane_to_proto(st.held_lane) if held(st) else None,
    )


def _rules_to_proto(match: tuple[tuple[Condition, ...], ...]) -> list[pb.MatchRule]:
    return [
        pb.MatchRule(
            conditions=[pb.Condition(kind=c.kind.value, name=c.name, op=c.op.value, value=c.value) for c in rule]
        )
        for rule in match
    ]


def _held_lane_to_proto(lane: HeldLane | None) -> pb.HeldLane | None:
    if lane is None:
        return None
    return pb.HeldLane(
        entry=lane.entry,
        weight=lane.weight,
        match=_rules_to_proto(lane.match),
        services=[pb.ServiceVersions(service=s, gray_version=v) for s, v in lane.versions],
    )


def _held_lane_from_proto(msg: pb.HeldLane) -> HeldLane:
    return HeldLane(
        entry=msg.entry,
        weight=msg.weight,
        match=_rules_from_proto(msg.match, stored=True),
        versions=tuple(sorted((s.service, s.gray_version) for s in msg.services)),
    )


def release_to_proto(release: Release) -> pb.Release:
    return pb.Release(
        name=release.name,
        spec=spec_to_proto(release.spec),
        status=status_to_proto(release),
        revision=release.revision,
        created=_ts(release.created),
    )


def release_from_proto(msg: pb.Release, *, revision: int) -> Release:
    """Rebuild a stored release. Stored specs were validated on the way in."""
    st = msg.status
    nack = None
    if st.HasField("last_nack"):
        n = st.last_nack
        nack = Nack(
            node=n.node,
            type_url=n.type_url,
            version=n.version,
            message=n.message,
            at=n.at.ToDatetime(tzinfo=UTC),
            stream=n.stream,
            cluster=n.cluster,
        )
    status = ReleaseStatus(
        phase=Phase(st.phase),
        batch=st.batch,
        reason=st.reason,
        reached=st.reached,
        proxies=st.convergence.proxies,
        converged=st.convergence.converged,
        target_version=st.convergence.target_version,
        last_nack=nack,
        batch_started=_dt(st.batch_started, st.HasField("batch_started")),
        batch_reached=_dt(st.batch_reached, st.HasField("batch_reached")),
        events=st.events,
        generation=st.generation,
        lagging=tuple(st.convergence.lagging),
        gone=st.convergence.gone,
        gone_names=tuple(st.convergence.gone_names),
        held_batch=st.held_batch if st.HasField("held_batch") else None,
        held_lane=_held_lane_from_proto(st.held_lane) if st.HasField("held_lane") else None,
    )
    return Release(
        name=msg.name,
        spec=spec_from_proto(msg.spec, stored=True),
        status=status,
        created=msg.created.ToDatetime(tzinfo=UTC),
        revision=revision,
    )


def event_to_proto(e: Event) -> pb.Event:
    return pb.Event(
        release=e.release,
        sequence=e.sequence,
        at=_ts(e.at),
        action=e.action,
        actor=e.actor,
        reason=e.reason,
        from_phase=e.from_phase.value,
        to_phase=e.to_phase.value,
        from_batch=e.from_batch,
        to_batch=e.to_batch,
        weight=e.weight,
        details=dict(e.details),
    )


def service_to_proto(s: Service) -> pb.Service:
    return pb.Service(name=s.name, stable_version=s.stable_version, description=s.description)


def version_to_proto(v: Version) -> pb.Version:
    return pb.Version(
        service=v.service,
        name=v.name,
        metadata=pb.VersionMetadata(
            image=v.image,
            author=v.author,
            created=_ts(v.created),
            change_summary=v.change_summary,
        ),
        endpoints=[pb.Endpoint(address=e.address, port=e.port, cluster=e.cluster) for e in v.endpoints],
    )


# ------------------------------------------------------------------------ agents


def split_host_port(field_name: str, value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[addr]:port`) into its parts, or InvalidArgument naming the field."""
    host, sep, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port_text.isdigit() or not valid_address(host):
        raise InvalidArgument(field_name, f"{value!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidArgument(field_name, f"{port} is not a valid port (1..65535)")
    return host, port


def hello_from_proto(hello: apb.AgentHello) -> ClusterInfo:
    host, port = split_host_port("hello.gateway_address", hello.gateway_address)
    if not hello.agent_id:
        raise InvalidArgument("hello.agent_id", "is required")
    return ClusterInfo(
        name=check_name("hello.cluster", hello.cluster),
        gateway_host=host,
        gateway_port=port,
        agent_id=hello.agent_id,
        agent_version=hello.agent_version,
    )


def cluster_endpoints_from_proto(cluster: str, snapshot: apb.EndpointSnapshot) -> tuple[ClusterEndpoints, ...]:
    """Validate an agent's endpoint snapshot; every endpoint is tagged with `cluster`."""
    out: list[ClusterEndpoints] = []
    seen: set[tuple[str, str]] = set()
    for i, v in enumerate(snapshot.versions):
        where = f"endpoints.versions[{i}]"
        key = (check_name(f"{where}.service", v.service), check_version_name(f"{where}.version", v.version))
        if key in seen:
            raise InvalidArgument(f"{where}.version", f"{key[0]} {key[1]} is listed twice")
        seen.add(key)
        endpoints = []
        for j, e in enumerate(v.endpoints):
            checked = _endpoint_from_proto(f"{where}.endpoints[{j}]", e)
            endpoints.append(Endpoint(address=checked.address, port=checked.port, cluster=cluster))
        out.append(ClusterEndpoints(service=key[0], version=key[1], endpoints=tuple(dict.fromkeys(endpoints))))
    return tuple(out)


def cluster_to_proto(c: ClusterInfo) -> apb.AgentHello:
    host = f"[{c.gateway_host}]" if ":" in c.gateway_host else c.gateway_host
    return apb.AgentHello(
        cluster=c.name, gateway_address=f"{host}:{c.gateway_port}", agent_id=c.agent_id, agent_version=c.agent_version
    )


def cluster_endpoints_to_proto(items: Sequence[ClusterEndpoints]) -> apb.EndpointSnapshot:
    return apb.EndpointSnapshot(
        versions=[
            apb.VersionEndpoints(
                service=i.service,
                version=i.version,
                endpoints=[pb.Endpoint(address=e.address, port=e.port) for e in i.endpoints],
            )
            for i in items
        ]
    )
