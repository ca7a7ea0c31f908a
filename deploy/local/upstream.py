"""A small versioned HTTP/1.1 upstream for the demo and the tests, on asyncio streams.

Owns: answering every request with 200 and the service and version it plays (headers
`x-service`, `x-version`, and a JSON body that also echoes the lane headers it received),
keep-alive, and knobs to make it fail or slow down (for rollback demos and tests).
Binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

from graylane.controlplane.lifecycle import Lifecycle


class Upstream(Lifecycle):
    """`async with Upstream("checkout", "v2") as up:` serves on `up.port` inside the block."""

    def __init__(self, service: str, version: str, *, port: int = 0) -> None:
        self.service = service
        self.version = version
        self.port = port
        self.error_rate = 0.0  # share of requests answered 500
        self.delay = 0.0  # seconds added to every answer
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for w in list(self._conns):
            w.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        k = k.strip().lower()
                        # Repeated headers fold into one value, as HTTP allows for lists.
                        headers[k] = f"{headers[k]},{v.strip()}" if k in headers else v.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                status = 500 if self.error_rate and random.random() < self.error_rate else 200
                body = json.dumps(
                    {
                        "service": self.service,
                        "version": self.version,
                        "method": method,
                        "path": path,
                        "lane": headers.get("x-graylane", ""),
                        "baggage": headers.get("baggage", ""),
                    }
                ).encode()
                reason = "OK" if status == 200 else "Internal Server Error"
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                    f"x-service: {self.service}\r\nx-version: {self.version}\r\n"
                    f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()
