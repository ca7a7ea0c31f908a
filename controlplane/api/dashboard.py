"""The web dashboard: pages under `/ui/` on the control plane's HTTP server, and the thin JSON
and server-sent-events layer behind them.

Owns: login sessions, the login rate limit, the routes that turn a
page's request into one call of the gRPC API, and serving the static page files and the
vendored chart library. It computes nothing itself: every number is an API message (the
CLI's `to_dict`), fetched from this replica's API (over a private Unix socket) with the
logged-in user's token, so the API's own role checks, scopes and validation messages apply
to the browser exactly as to the CLI.

Sessions work on every replica and survive restarts: the HttpOnly, SameSite=Strict cookie
carries (session id, token id, identity, expiry) signed with an HMAC key ring the replicas
share through etcd (`controlplane.api.sessions`; made once, a new key added after a day,
which signs once every replica has read the ring; old keys verify until their cookies
expire). The browser never holds the token: each request
re-checks the token's record by id (through the API's one-second cache), so a revoked token
ends its sessions on every replica within a second, and this replica's API is called with a
credential for that token id only this process can make. Logout writes the session id to
etcd until the session would have expired (checked at most once a second per session; at
once on the replica that served it). The CSRF token every action must echo in a header is a
MAC of the session id, so any replica checks it.

While etcd is away, a session is served only from what this replica already knows: the key
ring it holds, and a token record and logout check at most a second old. Past that second a
request answers 503 (etcd unavailable) rather than trusting a token that may have been
revoked; the cookie stays valid, so the user is back without logging in when etcd answers.
Open event streams go on (the API tolerates etcd's absence for its own rechecks). A login
needs etcd (the token's record, the key ring): without it, 503.

Failed logins are limited per client address (`LoginLimiter`: 5 at once, then one each
10 s), answered 429 with Retry-After, logged and counted in the API's denied-calls metric.

Live updates are server-sent events fed by the API's Watch and WatchMetrics streams (the
releases list, for which the API has no stream, is a ListReleases a second).

Must not import: etcd, xds, agent code.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import grpc
from aiohttp import web
from google.protobuf.message import Message
from graylane.controlplane.api import auth
from graylane.controlplane.api.client import ACTION_RPCS, USER_ACTIONS, ReleaseClient
from graylane.controlplane.api.http import HttpServer
from graylane.controlplane.api.release_service import DeniedLog
from graylane.controlplane.api.sessions import (
    KeyRing,
    LoginLimiter,
    SessionClaims,
    cookie_key_id,
    csrf_of,
    new_claims,
    sign,
    verify,
)
from graylane.controlplane.cli.output import render_yaml, to_dict
from graylane.controlplane.domain import machine
from graylane.controlplane.domain.manifest import ManifestError, load_manifest
from graylane.controlplane.errors import Unavailable
from graylane.v1 import release_pb2

log = logging.getLogger(__name__)

COOKIE: Final = "graylane_session"
CSRF_HEADER: Final = "X-Graylane-CSRF"
# The chart library, installed from the npm registry by `make` (never committed).
VENDOR_DIR: Final = Path(sys.prefix) / "ui-vendor" / "node_modules" / "uplot" / "dist"
VENDOR_FILES: Final = ("uPlot.esm.js", "uPlot.min.css")
VENDOR_HINT: Final = "the chart library is not installed: run `make ui` (npm install uplot into .venv/ui-vendor)"
STATIC_DIR: Final = Path(__file__).resolve().parent / "ui"
_STATIC_TYPES: Final = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

_SESSION_SECONDS = 12 * 3600.0
# A key older than this is followed by a new one at the next login; the old one verifies
# the cookies it signed until they expire.
_ROTATE_SECONDS = 24 * 3600.0
_RING_REFRESH_SECONDS = 60.0  # re-read the key ring this often (and at once for an unknown key id, at most 1/s)
# A new key signs only after every replica has re-read the ring (and some clock skew).
_SETTLE_SECONDS = _RING_REFRESH_SECONDS + 30.0
_LOGOUT_CHECK_SECONDS = 1.0  # a logout on another replica takes effect here within this
_MAX_CHECKED = 4096
_STREAM_RECHECK_SECONDS = 5.0  # an open event stream of a session logged out or revoked ends within this
_LOGIN = "/ui/api/login"
_LIST_EVERY_SECONDS = 1.0
# Totals are read from every proxy's admin endpoint: less often than the windows.
_TRAFFIC_EVERY_SECONDS = 2.0
_RETRY_SECONDS = 1.0
_MAX_RETRY_SECONDS = 10.0
_HEARTBEAT_SECONDS = 15.0
_MAX_BODY_BYTES = 1024 * 1024
_OPEN_ACTOR = "dashboard"

_HTTP_STATUS: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_RS = "/graylane.v1.ReleaseService/"
_END: Final = b""  # queued to end an event stream
_USER_ACTIONS: Final = {action.value: action for action in USER_ACTIONS}


class SessionKeys(Protocol):
    """What sessions keep in the store (`controlplane.store.SessionStore`)."""

    async def session_keys(self) -> KeyRing: ...

    async def rotate_session_keys(self, seen: KeyRing, *, keep_seconds: float) -> KeyRing: ...

    async def end_session(self, sid: str, *, seconds: float) -> None: ...

    async def session_ended(self, sid: str) -> bool: ...


@dataclass
class Session:
    """One browser's login as checked for this request: its claims (from the signed cookie)
    with the role and scope its token's record has now."""

    sid: str
    token_id: str
    identity: str
    role: str
    csrf: str
    expires: float
    services: tuple[str, ...] = ()
    releases: tuple[str, ...] = ()

    def public(self, *, auth_enabled: bool) -> dict[str, Any]:
        return {
            "auth": auth_enabled,
            "identity": self.identity,
            "role": self.role,
            "csrf": self.csrf,
            "scope": {"services": list(self.services), "releases": list(self.releases)},
            "needs": {action.value: _needed_role(ACTION_RPCS[action]) for action in USER_ACTIONS}
            | {"apply": _needed_role("ApplyRelease")},
            # The phases each action is legal from: the state machine's own table, so the
            # page disables a button for the same reason the API would refuse it.
            "sources": {
                action.value: sorted(p.name for p in machine.TRANSITIONS[action].sources) for action in USER_ACTIONS
            },
        }


def _needed_role(method: str) -> str:
    role = auth.required_role(_RS + method)
    return role.label if role is not None else ""


def _error(status: int, message: str, *, code: str = "") -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


def _rpc_error(exc: grpc.aio.AioRpcError) -> web.Response:
    code = exc.code()
    return _error(_HTTP_STATUS.get(code, 502), exc.details() or code.name, code=code.name)


class _NotServing(Exception):
    """The API is not serving in this process (yet, or any more)."""


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(eq=False)
class Dashboard:
    """The dashboard's routes over one loopback channel to this replica's gRPC API.

    `api_target` is called when the first request needs the API, and names how this process
    reaches its own API (None: not serving yet); `identify` turns a bearer token into an identity with the
    API's own Authenticator; `auth_enabled` False is the open loopback mode, where no login
    is needed and actions are recorded as `dashboard`.
    """

    _: KW_ONLY
    api_target: Callable[[], str | None]
    identify: Callable[[str], Awaitable[auth.Identity | None]]
    identity_of: Callable[[str], Awaitable[auth.Identity | None]]
    delegate: Callable[[str], str]
    keys: SessionKeys
    auth_enabled: bool
    on_denied: Callable[[str, str], None] = lambda code, method: None
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    vendor_dir: Path = VENDOR_DIR
    stream_recheck_seconds: float = _STREAM_RECHECK_SECONDS
    clock: Callable[[], float] = time.time
    _denied_log: DeniedLog = field(init=False, default_factory=DeniedLog)
    _ring: KeyRing | None = field(init=False, default=None)
    _ring_read: float = field(init=False, default=-math.inf)  # monotonic time of the last read of the ring
    _ended: dict[str, float] = field(init=False, default_factory=dict)  # sessions logged out here: their expiry
    # sessions seen not logged out: when (monotonic)
    _not_ended: dict[str, float] = field(init=False, default_factory=dict)
    _channel: grpc.aio.Channel | None = field(init=False, default=None)
    # open event streams: their session
    _streams: dict[asyncio.Task[Any], str] = field(init=False, default_factory=dict)

    # --- wiring -----------------------------------------------------------------------

    def add_routes(self, server: HttpServer) -> None:
        r = server.add_route
        r("GET", "/ui", self._redirect, name="ui-root")
        r("GET", "/ui/", self._index, name="ui")
        r("GET", "/ui/static/{file}", self._static, name="ui-static")
        r("GET", "/ui/vendor/{file}", self._vendor, name="ui-vendor")
        r("GET", "/ui/api/session", self._session, name="ui-session")
        r("POST", "/ui/api/login", self._login, name="ui-login")
        r("POST", "/ui/api/logout", self._logout, name="ui-logout")
        r("GET", "/ui/api/releases", self._releases, name="ui-releases")
        r("GET", "/ui/api/releases/{name}", self._release, name="ui-release")
        r("GET", "/ui/api/releases/{name}/yaml", self._release_yaml, name="ui-release-yaml")
        r("POST", "/ui/api/releases/{name}/{action}", self._act, name="ui-act")
        r("POST", "/ui/api/apply", self._apply, name="ui-apply")
        r("POST", "/ui/api/yaml", self._to_yaml, name="ui-to-yaml")
        r("GET", "/ui/api/clusters", self._clusters, name="ui-clusters")
        r("GET", "/ui/events/releases", self._list_events, name="ui-list-events")
        r("GET", "/ui/events/releases/{name}", self._release_events, name="ui-release-events")

    async def close(self) -> None:
        # Event streams last as long as the browser keeps the page open: end them now, or
        # the HTTP server would wait its whole shutdown timeout for them.
        for task in list(self._streams):
            task.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    def _client(self, session: Session) -> ReleaseClient:
        if self._channel is None:
            target = self.api_target()
            if target is None:
                raise _NotServing()
            self._channel = grpc.aio.insecure_channel(target)
        token = self.delegate(session.token_id) if self.auth_enabled else ""
        return ReleaseClient(self._channel, actor="" if self.auth_enabled else _OPEN_ACTOR, token=token, timeout=10.0)

    # --- sessions ---------------------------------------------------------------------

    async def _key_ring(self, key_id: str = "") -> KeyRing:
        """The shared key ring: read again after `_RING_REFRESH_SECONDS`, or at once (at most
        once a second) for a key id it lacks, made by another replica's rotation. While
        etcd is away the ring already read serves; with none read yet, `Unavailable`."""
        since = time.monotonic() - self._ring_read
        stale = since >= _RING_REFRESH_SECONDS or (
            key_id and self._ring is not None and self._ring.get(key_id) is None and since >= 1.0
        )
        if self._ring is None or stale:
            try:
                self._ring = await self.keys.session_keys()
                self._ring_read = time.monotonic()
            except Unavailable:
                if self._ring is None:
                    raise
        return self._ring

    async def _ended_session(self, sid: str) -> bool:
        """Whether the session was logged out (here at once; elsewhere within a second)."""
        if sid in self._ended:
            return True
        now = time.monotonic()
        seen = self._not_ended.get(sid)
        if seen is not None and now - seen < _LOGOUT_CHECK_SECONDS:
            return False
        ended = await self.keys.session_ended(sid)
        if len(self._not_ended) >= _MAX_CHECKED:
            self._not_ended.clear()  # bounded: many browsers cost re-reads, not memory
        if ended:
            self._note_ended(sid, self.clock() + _SESSION_SECONDS)
        else:
            self._not_ended[sid] = now
        return ended

    def _note_ended(self, sid: str, expires: float) -> None:
        self._not_ended.pop(sid, None)
        if len(self._ended) >= _MAX_CHECKED:
            now = self.clock()
            for old in [k for k, v in self._ended.items() if v <= now]:
                del self._ended[old]
            while len(self._ended) >= _MAX_CHECKED:  # the store still knows them: re-read
                del self._ended[next(iter(self._ended))]
        self._ended[sid] = expires

    async def _current(self, request: web.Request) -> Session | None:
        """The request's session, checked: the cookie's MAC and expiry, that it was not
        logged out, and (with auth) that its token's record still exists for the same
        identity. Raises `Unavailable` when etcd is needed and cannot answer."""
        cookie = request.cookies.get(COOKIE, "")
        if not cookie:
            return None
        key_id = cookie_key_id(cookie)
        if not key_id:
            return None
        ring = await self._key_ring(key_id)
        claims = verify(cookie, ring, now=self.clock())
        if claims is None or await self._ended_session(claims.sid):
            return None
        if not self.auth_enabled:
            if claims.token_id:
                return None
            return self._session_of(claims, ring, key_id, None)
        if not claims.token_id:
            return None  # an open-mode cookie, from before --auth
        identity = await self.identity_of(claims.token_id)
        if identity is None or identity.name != claims.identity or identity.role is auth.Role.AGENT:
            return None
        return self._session_of(claims, ring, key_id, identity)

    @staticmethod
    def _session_of(claims: SessionClaims, ring: KeyRing, key_id: str, identity: auth.Identity | None) -> Session:
        """The session of `claims` with `identity`'s role and scope (None: open mode, admin)."""
        session = Session(
            sid=claims.sid,
            token_id=claims.token_id,
            identity=claims.identity,
            role="admin",
            csrf=csrf_of(claims, ring, key_id),
            expires=claims.expires,
        )
        if identity is not None:
            session.role = identity.role.label
            session.services = tuple(sorted(identity.services))
            session.releases = tuple(sorted(identity.releases))
        return session

    async def _new_session(
        self, request: web.Request, response: web.StreamResponse, *, token_id: str, identity: str
    ) -> tuple[SessionClaims, KeyRing, str]:
        ring = await self.keys.session_keys()
        now = self.clock()
        if now - ring.newest.created > _ROTATE_SECONDS:
            ring = await self.keys.rotate_session_keys(ring, keep_seconds=_SETTLE_SECONDS + _SESSION_SECONDS + 60.0)
        self._ring, self._ring_read = ring, time.monotonic()
        key = ring.signer(now=now, settle_seconds=_SETTLE_SECONDS)
        claims = new_claims(token_id=token_id, identity=identity, now=now, lifetime=_SESSION_SECONDS)
        # Secure when this server itself saw TLS; plain HTTP is meant for loopback, where
        # a Secure cookie would not be sent back at all.
        response.set_cookie(
            COOKIE,
            sign(claims, key),
            path="/ui",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=int(_SESSION_SECONDS),
        )
        return claims, ring, key.key_id

    def _refusal(self, request: web.Request, *, post: bool) -> web.Response | None:
        """Checks before any session is looked at.

        Open mode has no credential to steal, so a page elsewhere must not reach it through
        DNS rebinding (a name of its own re-pointed at 127.0.0.1): the Host must be an
        address or localhost. A POST must be JSON (a form on another site cannot send that
        without the browser asking us first, which we never allow) and, when the browser
        names its Origin, come from this very origin."""
        if not self.auth_enabled and not _local_host(request.host):
            return _error(403, f"open mode answers only on an address or localhost, not {request.host!r}", code="HOST")
        if post:
            if request.content_type != "application/json":
                return _error(415, "expected application/json", code="CONTENT_TYPE")
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return _error(403, f"cross-origin request from {origin!r} refused", code="ORIGIN")
        return None

    async def _require(self, request: web.Request, *, action: bool = False) -> Session | web.Response:
        refused = self._refusal(request, post=request.method == "POST")
        if refused is not None:
            return refused
        try:
            session = await self._current(request)
        except Unavailable as exc:
            return _error(503, f"cannot check the session now: {exc}", code="UNAVAILABLE")
        if session is None:
            return _error(401, "log in first", code="UNAUTHENTICATED")
        if action and not secrets.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), session.csrf.encode()):
            return _error(403, f"missing or wrong {CSRF_HEADER} header (reload the page)", code="CSRF")
        return session

    async def _session(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, post=request.method == "POST")
        if refused is not None:
            return refused
        try:
            session = await self._current(request)
            if session is not None:
                return web.json_response(session.public(auth_enabled=self.auth_enabled))
            if self.auth_enabled:
                return _error(401, "log in with a token", code="UNAUTHENTICATED")
            # Open mode: everyone is let in; the session only carries the CSRF token.
            response = web.json_response({})
            claims, ring, key_id = await self._new_session(request, response, token_id="", identity=_OPEN_ACTOR)
        except Unavailable as exc:
            return _error(503, f"cannot check the session now: {exc}", code="UNAVAILABLE")
        session = self._session_of(claims, ring, key_id, None)
        response.text = json.dumps(session.public(auth_enabled=False))
        return response

    async def _login(self, request: web.Request) -> web.Response:
        if not self.auth_enabled:
            return await self._session(request)
        refused = self._refusal(request, post=True)
        if refused is not None:
            return refused
        try:
            body = await request.json()
            token = str(body.get("token", "")).strip()
        except (ValueError, AttributeError):
            return _error(400, 'expected JSON {"token": ...}')
        if not token:
            return _error(400, "enter a token")
        address = request.remote or ""
        wait = self.limiter.take(address, now=time.monotonic())
        if wait > 0:
            seconds = math.ceil(wait)
            why = f"too many failed logins from {address}: try again in {seconds} s"
            self._denied(grpc.StatusCode.RESOURCE_EXHAUSTED, address, why)
            response = _error(429, why, code="RESOURCE_EXHAUSTED")
            response.headers["Retry-After"] = str(seconds)
            return response
        try:
            identity = await self.identify(token)
        except Unavailable as exc:
            self.limiter.give_back(address, now=time.monotonic())
            return _error(503, f"cannot check the token now: {exc}", code="UNAVAILABLE")
        parts = auth.split_token(token)
        if identity is None or parts is None:
            why = "this token is not valid (unknown, revoked or mistyped)"
            self._denied(grpc.StatusCode.UNAUTHENTICATED, address, why)
            return _error(401, why, code="UNAUTHENTICATED")
        if identity.role is auth.Role.AGENT:
            why = "an agent token cannot log in to the dashboard"
            self._denied(grpc.StatusCode.PERMISSION_DENIED, address, why, who=identity.name)
            return _error(403, why, code="PERMISSION_DENIED")
        self.limiter.give_back(address, now=time.monotonic())
        response = web.json_response({})
        try:
            old = await self._current(request)
            if old is not None:  # a new login ends the one this browser had
                await self._end(old)
            claims, ring, key_id = await self._new_session(request, response, token_id=parts[0], identity=identity.name)
        except Unavailable as exc:
            return _error(503, f"cannot make a session now: {exc}", code="UNAVAILABLE")
        session = self._session_of(claims, ring, key_id, identity)
        log.info("dashboard: %s logged in", identity.name)
        response.text = json.dumps(session.public(auth_enabled=True))
        return response

    def _denied(self, code: grpc.StatusCode, address: str, why: str, *, who: str = "") -> None:
        """A refused login, logged and counted as the API's refused calls are."""
        self.on_denied(code.name.lower(), _LOGIN)
        self._denied_log(code, _LOGIN, address, who, why)

    async def _end(self, session: Session) -> None:
        """Log `session` out on every replica (`Unavailable` when etcd cannot record it)."""
        await self.keys.end_session(session.sid, seconds=session.expires - self.clock())
        self._note_ended(session.sid, session.expires)
        # The session's open event streams carry its credential: they end with it.
        for task, sid in list(self._streams.items()):
            if sid == session.sid:
                task.cancel()

    async def _logout(self, request: web.Request) -> web.Response:
        found = await self._require(request, action=True)
        if isinstance(found, web.Response):
            return found
        try:
            await self._end(found)
        except Unavailable as exc:
            return _error(503, f"cannot log out now (try again): {exc}", code="UNAVAILABLE")
        response = web.json_response({"ok": True})
        response.del_cookie(COOKIE, path="/ui")
        return response

    # --- static files -----------------------------------------------------------------

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def _index(self, request: web.Request) -> web.FileResponse:
        return self._file(STATIC_DIR / "index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        path = STATIC_DIR / name
        if "/" in name or path.suffix not in _STATIC_TYPES or not path.is_file():
            raise web.HTTPNotFound()
        return self._file(path)

    async def _vendor(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in VENDOR_FILES:
            raise web.HTTPNotFound()
        path = self.vendor_dir / name
        if not path.is_file():
            return web.Response(status=404, text=VENDOR_HINT)
        return self._file(path)

    @staticmethod
    def _file(path: Path) -> web.FileResponse:
        response = web.FileResponse(path)
        response.content_type = _STATIC_TYPES.get(path.suffix, "application/octet-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    # --- reads ------------------------------------------------------------------------

    async def _call(
        self, request: web.Request, read: Callable[[ReleaseClient], Awaitable[object]], *, action: bool = False
    ) -> web.Response:
        found = await self._require(request, action=action)
        if isinstance(found, web.Response):
            return found
        try:
            result = await read(self._client(found))
        except _NotServing:
            return _error(503, "the control plane is starting or stopping", code="UNAVAILABLE")
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(exc)  # UNAUTHENTICATED (revoked): the page asks for a token again
        # What one identity may read must not be kept by a shared cache on the way.
        return web.json_response(result, headers={"Cache-Control": "no-store"})

    async def _releases(self, request: web.Request) -> web.Response:
        async def read(client: ReleaseClient) -> object:
            return to_dict(await client.list_releases())

        return await self._call(request, read)

    async def _release_page(
        self, client: ReleaseClient, name: str, release: release_pb2.Release, cache: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The release with its history and its versions' metadata. `cache` (one per event
        stream) keeps the history until the release has written another event, and the
        versions until its spec changes, so convergence updates cost one message each."""
        cache = {} if cache is None else cache
        if cache.get("events") != release.status.events:
            cache["history"] = to_dict(await client.history(name))["events"]
            cache["events"] = release.status.events
        if cache.get("generation") != release.status.generation:
            versions: dict[str, list[dict[str, Any]]] = {}
            for service in release.spec.services:
                listed = await client.list_versions(service.service)
                wanted = {service.base_version, service.gray_version}
                versions[service.service] = [to_dict(v) for v in listed.versions if v.name in wanted]
            cache["versions"] = versions
            cache["generation"] = release.status.generation
        return {"release": to_dict(release), "history": cache["history"], "versions": cache["versions"]}

    async def _release(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        async def read(client: ReleaseClient) -> object:
            return await self._release_page(client, name, await client.get_release(name))

        return await self._call(request, read)

    async def _release_yaml(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        async def read(client: ReleaseClient) -> object:
            release = await client.get_release(name)
            return {"yaml": _manifest_yaml(release)}

        return await self._call(request, read)

    async def _clusters(self, request: web.Request) -> web.Response:
        async def read(client: ReleaseClient) -> object:
            return to_dict(await client.list_clusters())

        return await self._call(request, read)

    # --- actions ----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > _MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=_MAX_BODY_BYTES, actual_size=request.content_length)
        try:
            body = await request.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    async def _act(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            action = _USER_ACTIONS[request.match_info["action"]]
        except KeyError:
            return _error(404, f"no action {request.match_info['action']!r}")
        body = await self._body(request)
        reason = str(body.get("reason", "")) or f"from the dashboard: {action.value}"
        expected = body.get("expected_revision", 0)

        async def call(client: ReleaseClient) -> object:
            release = await client.act(
                action, name, reason=reason, expected_revision=expected if isinstance(expected, int) else 0
            )
            return to_dict(release)

        return await self._call(request, call, action=True)

    async def _to_yaml(self, request: web.Request) -> web.Response:
        """A release form's fields as the manifest YAML it applies, checked for shape by the
        loader `graylane apply -f` uses (its messages name the field)."""
        found = await self._require(request)
        if isinstance(found, web.Response):
            return found
        body = await self._body(request)
        text = render_yaml({"kind": "Release", "name": body.get("name", ""), "spec": body.get("spec", {})})
        try:
            load_manifest(text, source="form")
        except ManifestError as exc:
            return web.json_response({"yaml": text, "error": str(exc)})
        return web.json_response({"yaml": text, "error": ""})

    async def _apply(self, request: web.Request) -> web.Response:
        """Apply a manifest (the YAML the page shows): its shape is checked by the manifest
        loader, its values by the API, whose INVALID_ARGUMENT message the page shows."""
        found = await self._require(request, action=True)
        if isinstance(found, web.Response):
            return found
        body = await self._body(request)
        text = str(body.get("yaml", ""))
        restart = bool(body.get("restart", False))
        try:
            objects = load_manifest(text, source="manifest")
        except ManifestError as exc:
            return _error(400, str(exc), code="INVALID_MANIFEST")
        releases = [o for o in objects if isinstance(o, release_pb2.Release)]
        if len(releases) != 1 or len(objects) != 1:
            return _error(400, "the dashboard applies exactly one Release document", code="INVALID_MANIFEST")

        async def call(client: ReleaseClient) -> object:
            applied = await client.apply_release(releases[0], reason="from the dashboard", restart=restart)
            return to_dict(applied)

        return await self._call(request, call, action=True)

    # --- live -------------------------------------------------------------------------

    async def _stream(
        self, request: web.Request, feeds: Callable[[ReleaseClient], list[AsyncIterator[bytes]]]
    ) -> web.StreamResponse:
        found = await self._require(request)
        if isinstance(found, web.Response):
            return found
        try:
            client = self._client(found)
        except _NotServing:
            return _error(503, "the control plane is starting or stopping", code="UNAVAILABLE")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        me = asyncio.current_task()
        if me is not None:
            self._streams[me] = found.sid

        async def pump(feed: AsyncIterator[bytes]) -> None:
            try:
                async for chunk in feed:
                    await queue.put(chunk)
            except Exception as exc:  # a bug, not the API's refusal: say so, keep serving
                log.exception("dashboard: an event feed failed")
                await queue.put(_sse("problem", {"error": f"this feed stopped: {exc}; reload the page"}))

        async def recheck() -> None:
            """Ends the stream once its session is logged out (on any replica) or its token
            revoked; an etcd that cannot answer ends nothing."""
            while True:
                await asyncio.sleep(self.stream_recheck_seconds)
                try:
                    if await self._current(request) is not None:
                        continue
                except Unavailable:
                    continue
                await queue.put(_sse("problem", {"error": "this session has ended: log in again"}))
                await queue.put(_END)
                return

        pumps = [asyncio.create_task(pump(f)) for f in feeds(client)]
        pumps.append(asyncio.create_task(recheck()))
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(queue.get(), _HEARTBEAT_SECONDS)
                except TimeoutError:
                    chunk = b": keep-alive\n\n"
                if chunk == _END:
                    break
                await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the browser left, or the server stops: either way this stream is over
        finally:
            if me is not None:
                self._streams.pop(me, None)
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        return response

    async def _retrying(self, name: str, run: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
        """`run()`'s events until it ends; when the API call behind it fails (etcd out of
        reach, the release not there yet), a `problem` event says why and the call is made
        again after a pause that doubles. A refused credential ends it."""
        pause = _RETRY_SECONDS
        while True:
            try:
                async for chunk in run():
                    pause = _RETRY_SECONDS
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                yield _sse("problem", {"feed": name, "code": code.name, "error": exc.details() or code.name})
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_RETRY_SECONDS)

    async def _list_events(self, request: web.Request) -> web.StreamResponse:
        def feeds(client: ReleaseClient) -> list[AsyncIterator[bytes]]:
            async def releases() -> AsyncIterator[bytes]:
                last = b""
                while True:
                    chunk = _sse("releases", to_dict(await client.list_releases()))
                    if chunk != last:
                        last = chunk
                        yield chunk
                    await asyncio.sleep(_LIST_EVERY_SECONDS)

            return [self._retrying("releases", releases)]

        return await self._stream(request, feeds)

    async def _release_events(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            window = min(max(float(request.query.get("window", "5")), 1.0), 600.0)
        except ValueError:
            window = 5.0

        def feeds(client: ReleaseClient) -> list[AsyncIterator[bytes]]:
            async def release() -> AsyncIterator[bytes]:
                cache: dict[str, Any] = {}
                async for current in client.watch(name):
                    yield _sse("release", await self._release_page(client, name, current, cache))
                # Watch ends when the release is deleted (or the replica stops).
                yield _sse("problem", {"feed": "release", "error": f"release {name} is gone (deleted?)"})

            async def metrics() -> AsyncIterator[bytes]:
                async for answer in client.watch_metrics(name, window=window, every=1.0):
                    yield _sse("metrics", to_dict(answer))

            async def traffic() -> AsyncIterator[bytes]:
                while True:
                    try:
                        counts = to_dict(await client.get_traffic(name))
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                            raise
                        # A replica without proxies of its own has no counters: say so once.
                        yield _sse("traffic", {"unavailable": exc.details() or ""})
                        return
                    yield _sse("traffic", counts)
                    await asyncio.sleep(_TRAFFIC_EVERY_SECONDS)

            return [
                self._retrying("release", release),
                self._retrying("metrics", metrics),
                self._retrying("traffic", traffic),
            ]

        return await self._stream(request, feeds)


def _manifest_yaml(release: release_pb2.Release) -> str:
    """The release as the manifest `graylane apply -f` reads: its name and spec only."""
    spec: Message = release.spec
    return render_yaml({"kind": "Release", "name": release.name, "spec": to_dict(spec)})


def _local_host(host: str) -> bool:
    """Whether a Host header names an IP address or localhost (with or without a port)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.removeprefix("[").split("]")[0]
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
