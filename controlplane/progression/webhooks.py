"""Release webhooks: the value that describes one, and the one call that runs it.

Owns: `WebhookKind`, `Webhook` and `check_webhook` (validated once at the edge:
`InvalidArgument` naming the field, e.g. `analysis.webhooks[0].url`), and `call_webhook`,
which POSTs a JSON payload and returns a `WebhookResult` to record in the release's history.

Semantics of a call:
- success is any 2xx, except for confirm-batch, which confirms only with exactly 200 (a
  202 "accepted, not decided" must not move a release);
- connection errors, timeouts and 5xx are retried `retries` times with exponential backoff
  (`backoff_s`, doubling, at most `max_backoff_s`); any other answer is final;
- redirects are not followed (the payload would not be re-posted): a 3xx is a failure;
- each attempt is bounded by `timeout_s` (`asyncio.timeout`); the result never raises for a
  failed call, it says what happened: attempts, last status, elapsed time, error text and
  the start of the response body.

Where a webhook may point (`WebhookPolicy`): http or https only, a URL of at most
`MAX_URL_BYTES`, and never an address of the machine itself (loopback), a link-local one
(169.254.0.0/16, fe80::/10: cloud metadata services live there) or a known metadata
service (`METADATA_HOSTS`, fd00:ec2::254, 100.100.100.200), unless the operator allowed it
(`--webhook-allow HOST|CIDR`; `allow_loopback` for a loopback try-out). It is checked
twice: on the URL as written when a release is applied (a literal address or a metadata
name is refused with INVALID_ARGUMENT), and on every address the name resolves to when
the call is made (`PolicyResolver`), so a name that points at a refused address later
(DNS rebinding) is refused too.

Concurrency: a coroutine on the caller's loop and `aiohttp.ClientSession` (the caller owns
the session and its connection pool). Must not import: etcd, grpc, graylane.xds, graylane.agent.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import math
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
from graylane.controlplane.errors import InvalidArgument

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_TIMEOUT_S = 300.0
MAX_RETRIES = 10
MAX_BODY_BYTES = 1024  # of a response, kept for the history
MAX_URL_BYTES = 2048
# Names of cloud metadata services, refused whatever they resolve to.
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "metadata.azure.com"}
)
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyRefused(Exception):
    """A webhook address the policy does not allow."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookPolicy:
    """Where webhooks may be sent (see the module). `allow_hosts` are host names allowed as
    they are; `allow_networks` are address ranges allowed even when refused by default."""

    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[Network, ...] = ()
    allow_loopback: bool = False

    @classmethod
    def parse(cls, allowed: Iterable[str], *, allow_loopback: bool = False) -> WebhookPolicy:
        """From `--webhook-allow` values: a CIDR or address, else a host name. ValueError if bad."""
        hosts: set[str] = set()
        networks: list[Network] = []
        for item in allowed:
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                if not _HOST.fullmatch(item):
                    raise ValueError(f"{item!r} is neither an address range (CIDR) nor a host name") from None
                hosts.add(item.lower().rstrip("."))
        return cls(allow_hosts=frozenset(hosts), allow_networks=tuple(networks), allow_loopback=allow_loopback)

    def refuses_address(self, address: str) -> str | None:
        """Why `address` (an IP literal) is refused, or None when it is allowed."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow_networks):
            return None
        if ip in _METADATA_ADDRESSES:
            return f"{ip} is a cloud metadata service"
        if ip.is_loopback:
            return None if self.allow_loopback else f"{ip} is a loopback address (this machine)"
        if ip.is_link_local:
            return f"{ip} is link-local (where metadata services live)"
        if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
            return f"{ip} is not a unicast address"
        return None

    def refuses_host(self, host: str) -> str | None:
        """Why the URL's host as written is refused (None: allowed so far; its addresses are
        checked again when the call resolves it)."""
        name = host.lower().rstrip(".")
        if name in self.allow_hosts:
            return None
        try:
            ipaddress.ip_address(name.split("%", 1)[0])
        except ValueError:
            if name in METADATA_HOSTS:
                return f"{host} is a cloud metadata service"
            if name in ("localhost", "ip6-localhost") or name.endswith(".localhost"):
                return None if self.allow_loopback else f"{host} is this machine"
            return None
        return self.refuses_address(name)

    def check_url(self, field_name: str, url: str) -> None:
        """InvalidArgument when the URL's host is refused."""
        host = urlsplit(url).hostname or ""
        if (why := self.refuses_host(host)) is not None:
            raise InvalidArgument(field_name, f"{why}: refused by the webhook policy (see --webhook-allow)")


_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


class PolicyResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the policy allows; a name left with
    none fails the connection (aiohttp does not call a resolver for an IP literal: those
    are checked before the call)."""

    def __init__(self, policy: WebhookPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        if host.lower().rstrip(".") in self._policy.allow_hosts:
            return list(await self._inner.resolve(host, port, family))
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if self._policy.refuses_address(str(r["host"])) is None]
        if not kept:
            reasons = "; ".join(filter(None, (self._policy.refuses_address(str(r["host"])) for r in found)))
            raise OSError(errno.EACCES, f"{host} resolves only to refused addresses ({reasons})")
        return kept

    async def close(self) -> None:
        await self._inner.close()


class WebhookKind(enum.Enum):
    PRE_ROLLOUT = "pre-rollout"  # before the first batch; a failure keeps the release from starting
    CONFIRM_BATCH = "confirm-batch"  # before each batch advances; only 200 confirms
    POST_ROLLOUT = "post-rollout"  # after success, informational
    ROLLBACK = "rollback"  # after a rollback, informational


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhook:
    name: str
    kind: WebhookKind
    url: str
    timeout_s: float = 5.0  # per attempt
    retries: int = 2  # extra attempts after the first, on connection errors, timeouts and 5xx


def check_webhook(hook: Webhook, *, where: str = "webhook") -> Webhook:
    """Validate `hook`; raise `InvalidArgument` naming the field under `where`."""
    if not hook.name:
        raise InvalidArgument(f"{where}.name", "is required")
    if not _NAME.fullmatch(hook.name):  # match() would let "name\n" through
        raise InvalidArgument(
            f"{where}.name", f"{hook.name!r} is not a valid name (lower-case letters, digits and '-', at most 63)"
        )
    if not isinstance(hook.kind, WebhookKind):
        options = ", ".join(k.value for k in WebhookKind)
        raise InvalidArgument(f"{where}.kind", f"{hook.kind!r} is not one of {options}")
    _check_url(f"{where}.url", hook.url)
    if not (math.isfinite(hook.timeout_s) and 0.0 < hook.timeout_s <= MAX_TIMEOUT_S):
        raise InvalidArgument(f"{where}.timeout", f"{hook.timeout_s!r} s is outside (0, {MAX_TIMEOUT_S:g}] s")
    if isinstance(hook.retries, bool) or not isinstance(hook.retries, int):
        raise InvalidArgument(f"{where}.retries", f"{hook.retries!r} is not a whole number")
    if not 0 <= hook.retries <= MAX_RETRIES:
        raise InvalidArgument(f"{where}.retries", f"{hook.retries} is outside [0, {MAX_RETRIES}]")
    return hook


def _check_url(field_name: str, url: str) -> None:
    if not url:
        raise InvalidArgument(field_name, "is required")
    if len(url.encode()) > MAX_URL_BYTES:
        raise InvalidArgument(field_name, f"is {len(url.encode())} bytes, above the limit of {MAX_URL_BYTES}")
    if any(c.isspace() for c in url):
        raise InvalidArgument(field_name, f"{url!r} contains whitespace")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsing the port is the check: a bad one raises ValueError
    except ValueError as exc:
        raise InvalidArgument(field_name, f"{url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(field_name, f"{url!r} is not an http or https URL")
    if not parts.hostname:
        raise InvalidArgument(field_name, f"{url!r} has no host")
    if parts.username is not None or parts.password is not None:
        # The URL is recorded in release history, where a credential must not end up.
        raise InvalidArgument(field_name, "must not carry credentials (the URL is recorded in history)")


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookResult:
    name: str
    kind: WebhookKind
    url: str
    ok: bool
    attempts: int
    status: int | None  # of the last attempt that got an answer, None if none did
    elapsed_s: float  # all attempts and backoff
    error: str  # "" when ok
    body: str  # the start of the last response body

    def details(self) -> dict[str, str]:
        """Flat, for an `Event`."""
        return {
            f"webhook.{self.name}.kind": self.kind.value,
            f"webhook.{self.name}.url": self.url,
            f"webhook.{self.name}.ok": "true" if self.ok else "false",
            f"webhook.{self.name}.attempts": str(self.attempts),
            f"webhook.{self.name}.status": str(self.status) if self.status is not None else "none",
            f"webhook.{self.name}.elapsed_s": f"{self.elapsed_s:.3f}",
            f"webhook.{self.name}.error": self.error,
        }


def _accepted(kind: WebhookKind, status: int) -> bool:
    if kind is WebhookKind.CONFIRM_BATCH:
        return status == 200
    return 200 <= status < 300


async def call_webhook(
    session: aiohttp.ClientSession,
    hook: Webhook,
    payload: Mapping[str, object],
    *,
    backoff_s: float = 0.2,
    max_backoff_s: float = 2.0,
    policy: WebhookPolicy | None = None,
) -> WebhookResult:
    """POST `payload` as JSON to `hook.url`; never raises for a failed call (see the module).

    With `policy`, a host it refuses is not called: the result says why (the session should
    also resolve through a `PolicyResolver` of the same policy)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    if policy is not None and (why := policy.refuses_host(urlsplit(hook.url).hostname or "")) is not None:
        return _result(hook, False, 0, None, 0.0, f"not called: {why} (refused by the webhook policy)", "")
    attempts = 0
    status: int | None = None
    body = ""
    error = ""
    for attempt in range(1, hook.retries + 2):
        attempts = attempt
        retryable = True
        try:
            async with asyncio.timeout(hook.timeout_s):
                async with session.post(hook.url, json=dict(payload), allow_redirects=False) as response:
                    status = response.status
                    body = await _read_start(response)
        except TimeoutError:
            error = f"no answer within {hook.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if _accepted(hook.kind, status):
                return _result(hook, True, attempts, status, loop.time() - started, "", body)
            retryable = status >= 500
            if hook.kind is WebhookKind.CONFIRM_BATCH and 200 <= status < 300:
                error = f"confirm-batch needs HTTP 200, got {status}"
            else:
                error = f"HTTP {status}" + (f": {body[:200]}" if body else "")
        if not retryable or attempt > hook.retries:
            break
        await asyncio.sleep(min(max_backoff_s, backoff_s * 2 ** (attempt - 1)))
    return _result(hook, False, attempts, status, loop.time() - started, error, body)


async def _read_start(response: aiohttp.ClientResponse) -> str:
    chunks: list[bytes] = []
    size = 0
    while size < MAX_BODY_BYTES:
        chunk = await response.content.read(MAX_BODY_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _result(
    hook: Webhook, ok: bool, attempts: int, status: int | None, elapsed: float, error: str, body: str
) -> WebhookResult:
    return WebhookResult(
        name=hook.name,
        kind=hook.kind,
        url=hook.url,
        ok=ok,
        attempts=attempts,
        status=status,
        elapsed_s=elapsed,
        error=error,
        body=body,
    )
