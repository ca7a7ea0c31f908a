"""The demo's report under a slow machine: a timeout is said as a timeout, not a failure."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from graylane.deploy.demo import run_chain as demo
from graylane.deploy.demo.chain import get_once


async def test_a_request_without_an_answer_in_time_is_a_timeout_not_an_error() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(text="late")

    async def refused(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/refused", refused)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            late = await get_once(session, f"http://127.0.0.1:{port}/slow", {}, timeout=0.2)
            down = await get_once(session, f"http://127.0.0.1:{port}/refused", {}, timeout=2)
    finally:
        await runner.cleanup()
    assert (late.status, late.timed_out, late.error) == (0, True, "no answer within 0.2s")
    assert (down.status, down.timed_out) == (503, False)


def test_the_slow_machine_note_names_the_load_and_the_count() -> None:
    note = demo.slow_machine_note(7, 20)
    assert note.startswith("7 requests got no answer in time") and "load average" in note and "routing" in note
    assert 2 <= demo.CONCURRENCY <= 16
