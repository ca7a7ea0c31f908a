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

Concurrency: a coroutine on the caller's loop and `aiohttp.ClientSession` (the caller owns
the session and its connection pool). Must not import: etcd, grpc, graylane.xds, graylane.agent.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from graylane.controlplane.errors import InvalidArgument

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_TIMEOUT_S = 300.0
MAX_RETRIES = 10
MAX_BODY_BYTES = 1024  # of a response, kept for the history


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
) -> WebhookResult:
    """POST `payload` as JSON to `hook.url`; never raises for a failed call (see the module)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
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
