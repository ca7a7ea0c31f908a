"""Dashboard sessions behind several replicas, and the login rate limit.

A real etcd and two real control-plane replicas on one store (each with its HTTP server and
gRPC API); requests are plain aiohttp with the session cookie set by hand, so one browser's
cookie can be taken from replica A to replica B.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from graylane.controlplane.api import auth
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.api.dashboard import COOKIE, CSRF_HEADER
from graylane.controlplane.api.release_service import token_record
from graylane.controlplane.api.sessions import KeyRing, LoginLimiter
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.errors import Unavailable
from graylane.controlplane.store import EtcdStore, connect
from graylane.deploy.local.stack import register_service
from graylane.v1 import release_pb2 as pb

from tests.integration.conftest import eventually

pytestmark = pytest.mark.etcd


async def tokens_for(store: EtcdStore, *roles: str) -> dict[str, str]:
    made: dict[str, str] = {}
    for role in roles:
        new = auth.new_token()
        await store.create_token(token_record(name=f"{role}-1", role=role, made=new, created_by="test"))
        made[role] = new.token
    return made


@contextlib.asynccontextmanager
async def replica(store: EtcdStore) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(store, api_listen="127.0.0.1:0", http_listen="127.0.0.1:0", auth=True)
    async with plane.running():
        yield plane


class Browser:
    """One browser's cookie, sent to whichever replica a request goes to."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.cookie = ""
        self.csrf = ""

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **extra}
        if self.cookie:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        return headers

    async def get(self, plane: ControlPlane, path: str) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{plane.http_port}{path}"
        async with self.http.get(url, headers=self._headers({})) as r:
            return r.status, await r.json()

    async def post(
        self, plane: ControlPlane, path: str, body: Any, **headers: str
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        url = f"http://127.0.0.1:{plane.http_port}{path}"
        async with self.http.post(url, data=json.dumps(body), headers=self._headers(headers)) as r:
            return r.status, await r.json(), r

    async def login(self, plane: ControlPlane, token: str) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        status, body, r = await self.post(plane, "/ui/api/login", {"token": token})
        if status == 200:
            self.cookie = r.cookies[COOKIE].value
            self.csrf = body["csrf"]
        return status, body, r


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield Browser(http)


async def applied(plane: ControlPlane, token: str) -> None:
    async with ReleaseClient.connect(f"127.0.0.1:{plane.api_port}", token=token) as admin:
        await register_service(admin, "checkout")
        spec = pb.ReleaseSpec(
            lane="checkout-v2",
            entry="checkout",
            services=[pb.ServiceVersions(service="checkout", base_version="v1", gray_version="v2")],
            strategy=pb.CANARY,
            batches=[pb.Batch(weight=50, pause=pb.Pause(manual=True))],
        )
        await admin.apply_release(pb.Release(name="rel", spec=spec))


async def test_a_session_made_on_one_replica_works_on_the_other_until_logout(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "admin", "operator")
    async with replica(store) as a, replica(store) as b, browser() as user:
        await applied(a, tokens["admin"])
        status, session, r = await user.login(a, tokens["operator"])
        assert status == 200 and session["identity"] == "token:operator-1"
        cookie = r.cookies[COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ui"
        # The secret is url-safe base64 and may hold "_" itself: split as the server does.
        parts = auth.split_token(tokens["operator"])
        assert parts is not None
        secret = parts[1]
        assert secret not in user.cookie and tokens["operator"] not in user.cookie

        # Replica B knows the session: its reads, and an action with the CSRF token A gave.
        status, body = await user.get(b, "/ui/api/session")
        assert (status, body["identity"], body["csrf"]) == (200, "token:operator-1", user.csrf)
        status, body = await user.get(b, "/ui/api/releases")
        assert status == 200 and [r["name"] for r in body["releases"]] == ["rel"]
        status, body, _ = await user.post(b, "/ui/api/releases/rel/next", {}, **{CSRF_HEADER: "wrong"})
        assert (status, body["code"]) == (403, "CSRF")
        status, body, _ = await user.post(
            b, "/ui/api/releases/rel/next", {"reason": "via b"}, **{CSRF_HEADER: user.csrf}
        )
        assert status == 200 and body["status"]["phase"] == "PROGRESSING", body
        status, page = await user.get(a, "/ui/api/releases/rel")
        assert page["history"][-1]["actor"] == "token:operator-1"

        # Logout on B: refused on B at once, on A within its second.
        status, _, _ = await user.post(b, "/ui/api/logout", {}, **{CSRF_HEADER: user.csrf})
        assert status == 200
        assert (await user.get(b, "/ui/api/releases"))[0] == 401

        async def refused_on_a() -> bool:
            return (await user.get(a, "/ui/api/releases"))[0] == 401

        await eventually(refused_on_a, timeout=5, what="the logout made on B to reach A")
        # The token itself still works: a new login does.
        assert (await user.login(a, tokens["operator"]))[0] == 200
        assert (await user.get(b, "/ui/api/releases"))[0] == 200


async def test_a_revoked_token_ends_its_sessions_on_every_replica(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "admin", "viewer")
    async with replica(store) as a, replica(store) as b, browser() as user:
        assert (await user.login(a, tokens["viewer"]))[0] == 200
        assert (await user.get(b, "/ui/api/releases"))[0] == 200
        async with ReleaseClient.connect(f"127.0.0.1:{b.api_port}", token=tokens["admin"]) as admin:
            await admin.revoke_token("viewer-1")
        # B served the revoke: at once there; A within its cache's second.
        assert (await user.get(b, "/ui/api/releases"))[0] == 401

        async def refused_on_a() -> bool:
            return (await user.get(a, "/ui/api/session"))[0] == 401

        await eventually(refused_on_a, timeout=5, what="the revoke to end the session on A")
        assert (await user.get(a, "/ui/api/releases"))[0] == 401


async def test_a_restarted_replica_keeps_its_sessions(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "viewer")
    async with browser() as user:
        async with replica(store) as a:
            assert (await user.login(a, tokens["viewer"]))[0] == 200
            assert (await user.get(a, "/ui/api/session"))[0] == 200
        async with replica(store) as again:
            status, body = await user.get(again, "/ui/api/session")
            assert (status, body["identity"], body["csrf"]) == (200, "token:viewer-1", user.csrf)


async def test_a_tampered_cookie_is_refused(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "viewer", "admin")
    async with replica(store) as a, browser() as user:
        assert (await user.login(a, tokens["viewer"]))[0] == 200
        good = user.cookie
        version, key_id, claims, mac = good.split(".")
        value = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        admin_id = auth.split_token(tokens["admin"])
        assert admin_id is not None
        forged = {**value, "tid": admin_id[0], "who": "token:admin-1"}
        body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
        longer = {**value, "exp": value["exp"] + 86400}
        later = base64.urlsafe_b64encode(json.dumps(longer).encode()).rstrip(b"=").decode()
        for bad in (
            f"{version}.{key_id}.{body}.{mac}",  # another identity under the old MAC
            f"{version}.{key_id}.{later}.{mac}",  # a longer life
            f"{version}.{key_id}.{claims}.{mac[:-2]}AA",  # the MAC itself changed
            f"{version}.{'0' * len(key_id)}.{claims}.{mac}",  # a key nobody has
            "not-a-cookie",
        ):
            user.cookie = bad
            assert (await user.get(a, "/ui/api/releases"))[0] == 401, bad
        user.cookie = good
        assert (await user.get(a, "/ui/api/releases"))[0] == 200


async def test_the_sixth_fast_failed_login_waits_and_a_good_one_works_after(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "viewer")
    async with replica(store) as a, browser() as user:
        a.dashboard.limiter = LoginLimiter(burst=5, refill_seconds=1.5)
        wrong = tokens["viewer"][:-4] + "AAAA"
        for _ in range(5):
            status, body, _ = await user.login(a, wrong)
            assert (status, body["code"]) == (401, "UNAUTHENTICATED")
        status, body, r = await user.login(a, tokens["viewer"])
        assert (status, body["code"]) == (429, "RESOURCE_EXHAUSTED"), body
        retry = int(r.headers["Retry-After"])
        assert 1 <= retry <= 2 and f"try again in {retry} s" in body["error"]

        async def logged_in() -> bool:
            return (await user.login(a, tokens["viewer"]))[0] == 200

        await eventually(logged_in, timeout=5, what="a correct login after the back-off")
        async with user.http.get(f"http://127.0.0.1:{a.http_port}/metrics") as m:
            text = await m.text()
        denied = {
            line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("graylane_api_denied_total{") and "/ui/api/login" in line
        }
        assert sum(v for k, v in denied.items() if 'code="unauthenticated"' in k) == 5, denied
        assert sum(v for k, v in denied.items() if 'code="resource_exhausted"' in k) >= 1, denied


class _EtcdAway(EtcdStore):
    """Answers `Unavailable` for the sessions' and tokens' reads while `away` is set."""

    away = False

    async def get_token(self, token_id: str) -> auth.TokenRecord | None:
        if self.away:
            raise Unavailable("etcd unavailable: injected")
        return await super().get_token(token_id)

    async def session_keys(self) -> KeyRing:
        if self.away:
            raise Unavailable("etcd unavailable: injected")
        return await super().session_keys()

    async def session_ended(self, sid: str) -> bool:
        if self.away:
            raise Unavailable("etcd unavailable: injected")
        return await super().session_ended(sid)


async def test_etcd_away_at_login_is_a_clear_503_and_the_session_is_back_with_it(etcd_endpoint: str) -> None:
    plain = await connect(etcd_endpoint, prefix=f"/graylane-test/{uuid.uuid4().hex}/v1/")
    try:
        store = _EtcdAway(plain._channel, prefix=plain.prefix)
        tokens = await tokens_for(store, "viewer")
        async with replica(store) as a, browser() as user:
            assert (await user.login(a, tokens["viewer"]))[0] == 200
            store.away = True
            fresh = Browser(user.http)
            status, body, _ = await fresh.login(a, tokens["viewer"])
            assert (status, body["code"]) == (503, "UNAVAILABLE") and "etcd unavailable" in body["error"], body

            async def unavailable() -> bool:
                status, body = await user.get(a, "/ui/api/session")
                return status == 503 and "cannot check the session now" in body["error"]

            # Past the one-second cache the session cannot be checked: 503, not a logout.
            await eventually(unavailable, timeout=5, what="the session check to need etcd")
            store.away = False
            status, body = await user.get(a, "/ui/api/session")
            assert (status, body["identity"]) == (200, "token:viewer-1")
    finally:
        await plain.close()


async def test_a_logout_on_one_replica_ends_the_sessions_live_page_on_the_other(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "admin", "viewer")
    async with replica(store) as a, replica(store) as b, browser() as user:
        await applied(a, tokens["admin"])
        a.dashboard.stream_recheck_seconds = 0.2
        assert (await user.login(a, tokens["viewer"]))[0] == 200
        url = f"http://127.0.0.1:{a.http_port}/ui/events/releases/rel"
        async with user.http.get(url, headers={"Cookie": f"{COOKIE}={user.cookie}"}) as stream:
            assert stream.status == 200
            async with asyncio.timeout(10):
                while not (await stream.content.readline()).startswith(b"event: release"):
                    pass
            status, _, _ = await user.post(b, "/ui/api/logout", {}, **{CSRF_HEADER: user.csrf})
            assert status == 200
            lines: list[bytes] = []
            async with asyncio.timeout(5):
                while line := await stream.content.readline():
                    lines.append(line)
        assert any(b"this session has ended" in line for line in lines), lines


async def test_a_key_rotation_ends_no_session(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "viewer")
    async with replica(store) as a, replica(store) as b, browser() as old, browser() as new:
        assert (await old.login(a, tokens["viewer"]))[0] == 200
        ring = await store.session_keys()
        rotated = await store.rotate_session_keys(ring, keep_seconds=3600.0)
        assert rotated.keys[1:] == ring.keys and rotated.newest != ring.newest
        # Rotating again from the ring seen before is a no-op: the guard sees it changed.
        assert await store.rotate_session_keys(ring, keep_seconds=3600.0) == rotated
        # A login now still signs with the settled key, which A (not re-read yet) knows.
        assert (await new.login(b, tokens["viewer"]))[0] == 200
        for user in (old, new):
            for plane in (a, b):
                assert (await user.get(plane, "/ui/api/session"))[0] == 200


async def test_logouts_share_one_lease_and_outlive_their_sessions(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "viewer")
    async with replica(store) as a, browser() as first, browser() as second:
        sids = []
        for user in (first, second):
            assert (await user.login(a, tokens["viewer"]))[0] == 200
            sids.append(json.loads(base64.urlsafe_b64decode(user.cookie.split(".")[2] + "=="))["sid"])
            assert (await user.post(a, "/ui/api/logout", {}, **{CSRF_HEADER: user.csrf}))[0] == 200
        kvs = [await store._get(store._key("dashboard", "logouts", sid)) for sid in sids]
        assert all(kv is not None for kv in kvs)
        leases = {kv.lease for kv in kvs if kv is not None}
        assert len(leases) == 1 and 0 not in leases
        ttl = await store.keep_alive(leases.pop())
        assert ttl > 12 * 3600


async def test_the_dashboards_delegated_credential_is_refused_off_its_private_socket(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "viewer")
    async with replica(store) as a:
        parts = auth.split_token(tokens["viewer"])
        assert parts is not None
        delegated = a.authenticator.delegated(parts[0])
        async with ReleaseClient.connect(f"127.0.0.1:{a.api_port}", token=delegated) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.list_releases()
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        async with ReleaseClient.connect(f"127.0.0.1:{a.api_port}", token=tokens["viewer"]) as client:
            await client.list_releases()


async def test_failed_logins_sent_at_once_are_limited_as_well(store: EtcdStore) -> None:
    tokens = await tokens_for(store, "viewer")
    async with replica(store) as a, browser() as user:
        wrong = tokens["viewer"][:-4] + "AAAA"
        answers = await asyncio.gather(*(user.login(a, wrong) for _ in range(12)))
        assert sorted(status for status, _, _ in answers) == [401] * 5 + [429] * 7
