"""Response streams end when the server closes: `until_set` over real async generators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from graylane.controlplane.api.closing import until_set


async def test_items_pass_through_until_the_stream_ends() -> None:
    async def three() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    assert [i async for i in until_set(three(), asyncio.Event())] == [0, 1, 2]


async def test_a_stream_waiting_for_its_next_item_ends_when_the_event_is_set() -> None:
    stop = asyncio.Event()
    cleaned = asyncio.Event()
    blocked = asyncio.Event()

    async def forever() -> AsyncIterator[int]:
        try:
            yield 1
            blocked.set()
            await asyncio.Event().wait()  # like a watch with nothing new to say
            yield 2
        finally:
            cleaned.set()

    seen: list[int] = []

    async def consume() -> None:
        async for i in until_set(forever(), stop):
            seen.append(i)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await blocked.wait()
        stop.set()
        await task
    assert seen == [1]
    assert cleaned.is_set()  # the stream's own clean-up ran


async def test_an_event_already_set_yields_nothing() -> None:
    stop = asyncio.Event()
    stop.set()

    async def one() -> AsyncIterator[int]:
        yield 1

    assert [i async for i in until_set(one(), stop)] == []


async def test_cancelling_the_consumer_closes_the_stream() -> None:
    cleaned = asyncio.Event()
    started = asyncio.Event()

    async def forever() -> AsyncIterator[int]:
        try:
            started.set()
            await asyncio.Event().wait()
            yield 1
        finally:
            cleaned.set()

    async def consume() -> None:
        async for _ in until_set(forever(), asyncio.Event()):
            pass

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert cleaned.is_set()
