"""A bounded HTTP/1.1 load loop for the demo, tests and benchmarks (loopback only).

Owns: sending requests through an Envoy listener with keep-alive connections from a few
concurrent workers, at a target rate, bounded both in count and in time, and counting
what came back: per status, per `x-version` answer, and failures (anything not a 200,
including connection errors). It never retries: a failed request is a failed request.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    failed_versions: Counter[str] = field(default_factory=Counter)  # x-version of answers other than 200
    errors: Counter[str] = field(default_factory=Counter)  # connection-level failures by kind
    bodies: list[bytes] = field(default_factory=list)
    version_of: dict[int, str] = field(default_factory=dict)  # request index -> x-version (keep_versions)
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    def share(self, version: str) -> float:
        total = sum(self.versions.values())
        return self.versions[version] / total if total else 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0


Headers = Mapping[str, str] | Callable[[int], Mapping[str, str]]


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, dict[str, str], bytes]:
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
    return status, headers, body


async def run_load(
    port: int,
    *,
    authority: str,
    count: int,
    max_seconds: float,
    rate: float = 0.0,
    concurrency: int = 8,
    path: str = "/",
    headers: Headers = {},  # noqa: B006 - read-only
    keep_bodies: bool = False,
    keep_versions: bool = False,
    stop: asyncio.Event | None = None,
    host: str = "127.0.0.1",
) -> LoadResult:
    """Send up to `count` requests within `max_seconds` (and until `stop` is set).

    `rate` (requests per second, 0 = as fast as possible) is spread over the workers.
    `headers` may be a function of the request index, e.g. to vary a user id.
    """
    result = LoadResult()
    start = time.monotonic()
    deadline = start + max_seconds
    next_index = 0
    interval = concurrency / rate if rate > 0 else 0.0

    def claim() -> int | None:
        nonlocal next_index
        if next_index >= count or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return None
        next_index += 1
        return next_index - 1

    async def worker(offset: float) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        due = time.monotonic() + offset
        try:
            while (i := claim()) is not None:
                if interval:
                    due += interval
                    if (pause := due - time.monotonic()) > 0:
                        await asyncio.sleep(pause)
                extra = headers(i) if callable(headers) else headers
                raw = (
                    f"GET {path} HTTP/1.1\r\nhost: {authority}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                    + "\r\n"
                ).encode()
                result.sent += 1
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                    status, resp_headers, body = await asyncio.wait_for(_request(*conn, raw), 10)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    result.errors[type(exc).__name__] += 1
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    continue
                result.statuses[status] += 1
                if status != 200:
                    result.failed_versions[resp_headers.get("x-version", "?")] += 1
                if status == 200:
                    result.versions[resp_headers.get("x-version", "?")] += 1
                    if keep_versions:
                        result.version_of[i] = resp_headers.get("x-version", "?")
                    if keep_bodies:
                        result.bodies.append(body)
                if resp_headers.get("connection", "").lower() == "close":
                    conn[1].close()
                    conn = None
        finally:
            if conn is not None:
                conn[1].close()

    await asyncio.gather(*(worker(i * interval / concurrency) for i in range(concurrency)))
    result.elapsed = time.monotonic() - start
    return result
