"""`Lifecycle`: the small async lifecycle of what Graylane starts and stops — a child
process (Envoy, etcd), a group of them, an HTTP server. A subclass writes `start()` and
`stop()`; `async with` starts it on entry and stops it on exit, whatever ended the block.
`cancel_and_wait`: the stop of what runs as an asyncio task.

Must not import: etcd, graylane.xds, graylane.agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self


class Lifecycle:
    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel `task` and return once it has ended: its own CancelledError is the expected
    end, not an error (any other exception it ends with is raised)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
