"""call_webhook against a real aiohttp server on 127.0.0.1 (an in-process socket, no child process)."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from graylane.controlplane.errors import InvalidArgument
from graylane.controlplane.progression.webhooks import Webhook, WebhookKind, WebhookPolicy, call_webhook, check_webhook

BACKOFF = 0.01  # keeps retries fast; the schedule itself is not what these tests measure


@dataclass
class Server:
    base: str
    calls: Counter[str] = field(default_factory=Counter)
    received: list[object] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    release = asyncio.Event()  # lets the hanging handler finish before the server stops
    state = Server(base="")

    async def ok(request: web.Request) -> web.Response:
        state.calls["ok"] += 1
        state.received.append(await request.json())
        return web.Response(text="fine")

    async def accepted(request: web.Request) -> web.Response:
        state.calls["accepted"] += 1
        return web.Response(status=202)

    async def flaky(request: web.Request) -> web.Response:
        state.calls["flaky"] += 1
        return web.Response(status=500 if state.calls["flaky"] == 1 else 200)

    async def broken(request: web.Request) -> web.Response:
        state.calls["broken"] += 1
        return web.Response(status=503, text="down")

    async def forbidden(request: web.Request) -> web.Response:
        state.calls["forbidden"] += 1
        return web.Response(status=403, text="nope")

    async def moved(request: web.Request) -> web.Response:
        state.calls["moved"] += 1
        raise web.HTTPFound("/ok")

    async def hang(request: web.Request) -> web.Response:
        state.calls["hang"] += 1
        await release.wait()
        return web.Response()

    app = web.Application()
    for path, handler in (
        ("/ok", ok),
        ("/accepted", accepted),
        ("/flaky", flaky),
        ("/broken", broken),
        ("/forbidden", forbidden),
        ("/moved", moved),
        ("/hang", hang),
    ):
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    try:
        yield state
    finally:
        release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def hook(url: str, *, kind: WebhookKind = WebhookKind.PRE_ROLLOUT, timeout_s: float = 2.0, retries: int = 2) -> Webhook:
    return check_webhook(Webhook(name="gate", kind=kind, url=url, timeout_s=timeout_s, retries=retries))


PAYLOAD = {"release": "checkout", "batch": 1, "weight": 20}


async def test_200_succeeds_at_once_and_posts_the_payload(server: Server, session: aiohttp.ClientSession) -> None:
    r = await call_webhook(session, hook(server.url("/ok")), PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status, r.error, r.body) == (True, 1, 200, "", "fine")
    assert server.received == [PAYLOAD]
    assert r.elapsed_s >= 0.0


async def test_500_then_200_is_retried_to_success(server: Server, session: aiohttp.ClientSession) -> None:
    r = await call_webhook(session, hook(server.url("/flaky")), PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status) == (True, 2, 200)
    assert server.calls["flaky"] == 2


async def test_lasting_5xx_uses_every_retry_then_fails(server: Server, session: aiohttp.ClientSession) -> None:
    r = await call_webhook(session, hook(server.url("/broken"), retries=2), PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status) == (False, 3, 503)
    assert r.error == "HTTP 503: down"
    assert server.calls["broken"] == 3


async def test_403_is_final_and_not_retried(server: Server, session: aiohttp.ClientSession) -> None:
    r = await call_webhook(session, hook(server.url("/forbidden")), PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status) == (False, 1, 403)
    assert r.error == "HTTP 403: nope"
    assert server.calls["forbidden"] == 1


async def test_a_hanging_hook_times_out_on_every_attempt(server: Server, session: aiohttp.ClientSession) -> None:
    r = await call_webhook(session, hook(server.url("/hang"), timeout_s=0.2, retries=1), PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status) == (False, 2, None)
    assert r.error == "no answer within 0.2 s"
    assert r.elapsed_s >= 0.4
    assert server.calls["hang"] == 2


async def test_confirm_batch_needs_exactly_200(server: Server, session: aiohttp.ClientSession) -> None:
    confirm = hook(server.url("/accepted"), kind=WebhookKind.CONFIRM_BATCH)
    r = await call_webhook(session, confirm, PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status) == (False, 1, 202)
    assert r.error == "confirm-batch needs HTTP 200, got 202"
    ok = await call_webhook(session, hook(server.url("/ok"), kind=WebhookKind.CONFIRM_BATCH), PAYLOAD)
    assert ok.ok
    other = await call_webhook(session, hook(server.url("/accepted"), kind=WebhookKind.POST_ROLLOUT), PAYLOAD)
    assert (other.ok, other.status) == (True, 202)


async def test_redirects_are_not_followed(server: Server, session: aiohttp.ClientSession) -> None:
    r = await call_webhook(session, hook(server.url("/moved")), PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status) == (False, 1, 302)
    assert server.calls["ok"] == 0


async def test_connection_refused_is_retried_then_reported(session: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and now has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = await call_webhook(session, hook(f"http://127.0.0.1:{port}/x", retries=2), PAYLOAD, backoff_s=BACKOFF)
    assert (r.ok, r.attempts, r.status) == (False, 3, None)
    assert r.error.startswith("ClientConnectorError")


async def test_result_details_are_flat_text_for_history(server: Server, session: aiohttp.ClientSession) -> None:
    r = await call_webhook(session, hook(server.url("/forbidden")), PAYLOAD, backoff_s=BACKOFF)
    d = r.details()
    assert d["webhook.gate.kind"] == "pre-rollout"
    assert d["webhook.gate.ok"] == "false"
    assert d["webhook.gate.attempts"] == "1"
    assert d["webhook.gate.status"] == "403"
    assert d["webhook.gate.error"] == "HTTP 403: nope"
    assert all(isinstance(v, str) for v in d.values())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"url": "ftp://ci.example/hook"}, "webhook.url"),
        ({"url": "file:///etc/passwd"}, "webhook.url"),
        ({"url": "ci.example/hook"}, "webhook.url"),
        ({"url": "http://"}, "webhook.url"),
        ({"url": ""}, "webhook.url"),
        ({"url": "https://ci.example/a b"}, "webhook.url"),
        ({"url": "http://ci.example:99999/"}, "webhook.url"),
        ({"url": "https://user:secret@ci.example/hook"}, "webhook.url"),
        ({"name": ""}, "webhook.name"),
        ({"name": "Gate_1"}, "webhook.name"),
        ({"kind": "confirm-batch"}, "webhook.kind"),
        ({"timeout_s": 0.0}, "webhook.timeout"),
        ({"timeout_s": 301.0}, "webhook.timeout"),
        ({"timeout_s": float("nan")}, "webhook.timeout"),
        ({"retries": -1}, "webhook.retries"),
        ({"retries": 11}, "webhook.retries"),
        ({"retries": 1.5}, "webhook.retries"),
    ],
)
def test_bad_webhooks_name_the_field(changes: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"name": "gate", "kind": WebhookKind.ROLLBACK, "url": "https://ci.example/hook"}
    values.update(changes)
    with pytest.raises(InvalidArgument) as caught:
        check_webhook(Webhook(**values))  # type: ignore[arg-type]
    assert caught.value.field == field


def test_good_webhooks_pass() -> None:
    for url in ("http://127.0.0.1:8080/hook", "https://ci.example/hook?x=1", "http://[::1]:9000/"):
        h = Webhook(name="gate", kind=WebhookKind.CONFIRM_BATCH, url=url, timeout_s=300.0, retries=0)
        assert check_webhook(h, where="analysis.webhooks[0]") is h


# ------------------------------------------------------------------ the URL policy


@pytest.mark.parametrize(
    ("address", "refused_because"),
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:169.254.169.254", "metadata"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "not a unicast"),
        ("224.0.0.1", "not a unicast"),
    ],
)
def test_the_policy_refuses_metadata_link_local_and_loopback(address: str, refused_because: str) -> None:
    why = WebhookPolicy().refuses_address(address)
    assert why is not None and refused_because in why


def test_the_policy_allows_ordinary_addresses_and_what_the_operator_lists() -> None:
    policy = WebhookPolicy()
    assert policy.refuses_address("10.1.2.3") is None and policy.refuses_address("203.0.113.9") is None
    assert policy.refuses_host("hooks.example.com") is None
    assert policy.refuses_host("metadata.google.internal") is not None
    assert policy.refuses_host("localhost") is not None
    assert WebhookPolicy(allow_loopback=True).refuses_host("127.0.0.1") is None
    listed = WebhookPolicy.parse(["169.254.0.0/16", "Metadata.Google.Internal"])
    assert listed.refuses_address("169.254.169.254") is None
    assert listed.refuses_host("metadata.google.internal") is None
    with pytest.raises(ValueError, match="neither"):
        WebhookPolicy.parse(["not a host!"])


def test_urls_are_bounded() -> None:
    hook = Webhook(name="h", kind=WebhookKind.CONFIRM_BATCH, url="http://example.com/" + "a" * 3000)
    with pytest.raises(InvalidArgument, match="above the limit of 2048"):
        check_webhook(hook)
    with pytest.raises(InvalidArgument, match="refused by the webhook policy"):
        WebhookPolicy().check_url("url", "http://169.254.169.254/latest")
