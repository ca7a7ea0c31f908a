"""The dashboard's HTTP layer without a browser: sessions, CSRF and origin checks, the API's
refusals relayed, revocation, open mode's Host check, static files and event streams.

A real etcd and a real control plane (its HTTP server and gRPC API); requests are plain
aiohttp, so each header can be set or left out on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from graylane.controlplane.api import auth
from graylane.controlplane.api.certs import make_local_certs
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.api.dashboard import COOKIE, CSRF_HEADER
from graylane.controlplane.api.release_service import token_record
from graylane.controlplane.api.tls import ClientTls, ServerTls
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.store import EtcdStore
from graylane.v1 import release_pb2 as pb

pytestmark = pytest.mark.etcd


def spec() -> pb.ReleaseSpec:
    return pb.ReleaseSpec(
        lane="checkout-v2",
        entry="checkout",
        services=[pb.ServiceVersions(service="checkout", base_version="v1", gray_version="v2")],
        strategy=pb.CANARY,
        batches=[pb.Batch(weight=50, pause=pb.Pause(manual=True))],
    )


@contextlib.asynccontextmanager
async def serving(
    store: EtcdStore, *, auth_enabled: bool, tls: ServerTls | None = None, client_tls: ClientTls | None = None
) -> AsyncIterator[tuple[ControlPlane, dict[str, str]]]:
    tokens: dict[str, str] = {}
    if auth_enabled:
        for role in ("admin", "viewer"):
            made = auth.new_token()
            await store.create_token(token_record(name=f"{role}-1", role=role, made=made, created_by="test"))
            tokens[role] = made.token
    plane = ControlPlane(store, api_listen="127.0.0.1:0", http_listen="127.0.0.1:0", auth=auth_enabled, tls=tls)
    async with plane.running():
        async with ReleaseClient.connect(
            f"127.0.0.1:{plane.api_port}", token=tokens.get("admin", ""), tls=client_tls
        ) as admin:
            await admin.put_service(pb.Service(name="checkout", stable_version="v1"))
            for name in ("v1", "v2"):
                meta = pb.VersionMetadata(author="dev@example.com", change_summary=f"{name} build")
                await admin.put_version(pb.Version(service="checkout", name=name, metadata=meta))
            await admin.apply_release(pb.Release(name="rel", spec=spec()))
        yield plane, tokens


def browser(plane: ControlPlane) -> aiohttp.ClientSession:
    # unsafe=True: keep cookies set by an IP address (the server is on 127.0.0.1).
    return aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{plane.http_port}", cookie_jar=aiohttp.CookieJar(unsafe=True)
    )


async def post(http: aiohttp.ClientSession, path: str, body: Any, **headers: str) -> tuple[int, dict[str, Any]]:
    async with http.post(path, data=json.dumps(body), headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, await r.json()


async def test_login_session_csrf_and_the_apis_refusals(store: EtcdStore) -> None:
    async with serving(store, auth_enabled=True) as (plane, tokens), browser(plane) as http:
        async with http.get("/ui/api/session") as r:
            assert r.status == 401
        async with http.get("/ui/api/releases") as r:
            assert r.status == 401
        status, body = await post(http, "/ui/api/login", {"token": tokens["viewer"] + "x"})
        assert (status, body["code"]) == (401, "UNAUTHENTICATED")

        async with http.post(
            "/ui/api/login", data=json.dumps({"token": tokens["viewer"]}), headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 200
            session = await r.json()
            cookie = r.cookies[COOKIE]
        assert session["identity"] == "token:viewer-1" and session["role"] == "viewer"
        assert session["needs"]["next"] == "operator" and session["sources"]["resume"] == ["PAUSED"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ui"
        assert tokens["viewer"] not in cookie.value

        async with http.get("/ui/api/releases/rel") as r:
            page = await r.json()
        assert page["release"]["status"]["phase"] == "PENDING"
        assert [e["action"] for e in page["history"]] == ["create"]
        assert {v["name"] for v in page["versions"]["checkout"]} == {"v1", "v2"}

        # An action needs the session's CSRF token, JSON, and this origin; then the API decides.
        status, body = await post(http, "/ui/api/releases/rel/next", {})
        assert (status, body["code"]) == (403, "CSRF")
        csrf = {CSRF_HEADER: session["csrf"]}
        async with http.post("/ui/api/releases/rel/next", data="{}", headers=csrf) as r:
            assert r.status == 415
        status, body = await post(http, "/ui/api/releases/rel/next", {}, Origin="http://evil.example", **csrf)
        assert (status, body["code"]) == (403, "ORIGIN")
        status, body = await post(http, "/ui/api/releases/rel/next", {}, **csrf)
        assert (status, body["code"]) == (403, "PERMISSION_DENIED")
        assert body["error"] == "NextBatch needs role operator (this identity has viewer)"

        # A revoked token ends the session at its next call.
        async with ReleaseClient.connect(f"127.0.0.1:{plane.api_port}", token=tokens["admin"]) as admin:
            await admin.revoke_token("viewer-1")
        async with http.get("/ui/api/releases") as r:
            assert r.status == 401
        async with http.get("/ui/api/session") as r:
            assert r.status == 401


async def test_event_stream_sends_the_release_and_its_metrics(store: EtcdStore) -> None:
    async with serving(store, auth_enabled=True) as (plane, tokens), browser(plane) as http:
        status, session = await post(http, "/ui/api/login", {"token": tokens["viewer"]})
        assert status == 200
        seen: dict[str, Any] = {}
        async with http.get("/ui/events/releases/rel") as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            async with asyncio.timeout(10):
                event = ""
                while not {"release", "metrics", "traffic"} <= seen.keys():
                    line = (await r.content.readline()).decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        seen[event] = json.loads(line.removeprefix("data: "))
            # Logging out ends the session's open streams (they carry its token).
            status, _ = await post(http, "/ui/api/logout", {}, **{CSRF_HEADER: session["csrf"]})
            assert status == 200
            async with asyncio.timeout(5):
                while await r.content.readline():
                    pass
        assert seen["release"]["release"]["name"] == "rel"
        assert "series" in seen["metrics"] and "until" in seen["metrics"]
        # This replica serves no proxies (no xDS), so the API has no totals: the page says why.
        assert "serves no proxies" in seen["traffic"]["unavailable"]


async def test_open_mode_needs_no_login_but_refuses_other_host_names(store: EtcdStore, tmp_path: Path) -> None:
    async with serving(store, auth_enabled=False) as (plane, _), browser(plane) as http:
        async with http.get("/ui/api/session", headers={"Host": "rebound.example"}) as r:
            assert (r.status, (await r.json())["code"]) == (403, "HOST")
        async with http.get("/ui/api/session") as r:
            session = await r.json()
        assert session["auth"] is False
        csrf = {CSRF_HEADER: session["csrf"]}
        status, body = await post(http, "/ui/api/releases/rel/next", {"reason": "from a test"}, **csrf)
        assert status == 200 and body["status"]["phase"] == "PROGRESSING"
        async with http.get("/ui/api/releases/rel") as r:
            history = (await r.json())["history"]
        assert (history[-1]["actor"], history[-1]["reason"]) == ("dashboard", "from a test")

        # A manifest's shape error names the field, as `graylane apply -f` does.
        status, body = await post(http, "/ui/api/apply", {"yaml": "name: x\nspec: {batches: [{weight: ten}]}"}, **csrf)
        assert status == 400 and "spec.batches[0].weight" in body["error"], body

        async with http.get("/ui/") as r:
            assert r.status == 200 and "app.js" in await r.text()
        async with http.get("/ui/static/..%2Fdashboard.py") as r:
            assert r.status == 404
        plane.dashboard.vendor_dir = tmp_path / "missing"
        async with http.get("/ui/vendor/uPlot.esm.js") as r:
            assert r.status == 404 and "make ui" in await r.text()


async def test_behind_mutual_tls_the_dashboard_still_reaches_its_api(store: EtcdStore, tmp_path: Path) -> None:
    """The API port wants a client certificate the dashboard has none of: it calls its API
    over the process's private socket instead, still with the user's token."""
    make_local_certs(tmp_path, users=["admin", "alice"])
    tls = ServerTls(cert=tmp_path / "server.pem", key=tmp_path / "server-key.pem", client_ca=tmp_path / "ca.pem")
    admin_tls = ClientTls(ca=tmp_path / "ca.pem", cert=tmp_path / "user-admin.pem", key=tmp_path / "user-admin-key.pem")
    alice = ClientTls(ca=tmp_path / "ca.pem", cert=tmp_path / "user-alice.pem", key=tmp_path / "user-alice-key.pem")
    async with serving(store, auth_enabled=True, tls=tls, client_tls=admin_tls) as (plane, tokens):
        async with aiohttp.ClientSession(
            base_url=f"https://127.0.0.1:{plane.http_port}",
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(ssl=alice.ssl_context()),
        ) as http:
            async with http.post(
                "/ui/api/login",
                data=json.dumps({"token": tokens["viewer"]}),
                headers={"Content-Type": "application/json"},
            ) as r:
                assert r.status == 200, await r.text()
                assert r.cookies[COOKIE]["secure"]
            async with http.get("/ui/api/releases/rel") as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["release"]["status"]["phase"] == "PENDING"
