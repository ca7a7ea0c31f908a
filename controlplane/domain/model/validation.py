"""The one place API messages become domain values: `spec_from_proto` and friends check
every field (names, limits, RE2 programs within Envoy's size limit) and raise
`InvalidArgument` naming the field. `stored=True` reads back what etcd holds: it passed
these checks when written, so size limits are skipped and out-of-range durations clamped.

Must not import: etcd, graylane.xds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence, Sized
from datetime import UTC, timedelta

import re2
from google.protobuf.duration_pb2 import Duration
from graylane.controlplane.domain.model.values import (
    Batch,
    Cohort,
    Condition,
    Endpoint,
    MatchKind,
    MatchOp,
    ReleaseSpec,
    Service,
    ServiceVersions,
    Strategy,
    Version,
)
from graylane.controlplane.errors import InvalidArgument
from graylane.controlplane.progression.analysis import AnalysisSpec, OnInconclusive, check_analysis_spec
from graylane.controlplane.progression.webhooks import MAX_TIMEOUT_S as WEBHOOK_MAX_TIMEOUT_S
from graylane.controlplane.progression.webhooks import Webhook, WebhookKind
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


def rules_from_proto(rules: Sequence[pb.MatchRule], *, stored: bool) -> tuple[tuple[Condition, ...], ...]:
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
    match = rules_from_proto(spec.match, stored=stored)
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


WEBHOOK_KINDS = {
    pb.PRE_ROLLOUT: WebhookKind.PRE_ROLLOUT,
    pb.CONFIRM_BATCH: WebhookKind.CONFIRM_BATCH,
    pb.POST_ROLLOUT: WebhookKind.POST_ROLLOUT,
    pb.ROLLBACK: WebhookKind.ROLLBACK,
}


def analysis_from_proto(a: pb.Analysis, *, where: str = "spec.analysis", stored: bool = False) -> AnalysisSpec:
    """Validate an Analysis message (defaults for what is unset) into an `AnalysisSpec`."""
    defaults = AnalysisSpec()
    if not stored:
        _check_count(f"{where}.webhooks", a.webhooks, MAX_WEBHOOKS, "webhooks")
    hooks = []
    for i, h in enumerate(a.webhooks):
        at = f"{where}.webhooks[{i}]"
        kind = WEBHOOK_KINDS.get(h.kind)
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


# Why an endpoint or gateway must be an IP literal: Graylane serves endpoints over EDS, and
# Envoy NACKs an EDS response that holds a host name ("malformed IP address"), the whole
# response: such an endpoint is never served, and each push that carries it is refused.
NOT_AN_IP = "is not an IP address (Envoy takes endpoints over EDS as IP literals only: resolve a host name first)"


def valid_address(address: str) -> bool:
    """An IPv4/IPv6 literal: what Envoy accepts as an EDS endpoint's address."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def endpoint_from_proto(where: str, e: pb.Endpoint, *, stored: bool = False) -> Endpoint:
    """Validate an endpoint; `stored` (read back from etcd) lets through an address an older
    Graylane accepted (a host name): refusing it on read would drop its whole record."""
    if not (valid_address(e.address) or (stored and e.address)):
        raise InvalidArgument(f"{where}.address", f"{e.address!r} {NOT_AN_IP}")
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
    endpoints = tuple(
        endpoint_from_proto(f"version.endpoints[{i}]", e, stored=stored) for i, e in enumerate(v.endpoints)
    )
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
