"""Dashboard sessions every replica can check, and the login rate limit.

Owns, pure (no etcd, no HTTP, no clock of its own):
- `SessionKey` / `KeyRing`: the HMAC keys replicas share (kept in etcd by the store; the
  first one signs, every one verifies, so a rotation ends no session);
- `SessionClaims` and the cookie format `v1.<key id>.<claims>.<mac>`: the claims (a random
  session id, the token's id, the identity's name, the expiry in wall-clock seconds) in
  base64url JSON, signed with HMAC-SHA256 over the key id and the claims. The cookie names
  the token by id only: it is no credential by itself, and a replica re-checks the token's
  record on each request, so a revoked token ends its sessions;
- `csrf_of`: the session's CSRF token, derived from its id under the same key, so any
  replica can check it without a table;
- `LoginLimiter`: a token bucket of failed logins per client address.

Must not import: etcd, grpc, aiohttp, xds, agent code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_VERSION = "v1"
_KEY_BYTES = 32
_KEY_ID_BYTES = 6
_MAX_COOKIE_CHARS = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionKey:
    """One signing key: `key_id` is named in every cookie it signs; `created` is wall-clock seconds."""

    key_id: str
    secret: bytes
    created: float

    def to_json(self) -> dict[str, object]:
        return {"id": self.key_id, "secret": _b64(self.secret), "created": self.created}

    @classmethod
    def from_json(cls, value: Mapping[str, object]) -> SessionKey:
        created = value.get("created", 0.0)
        return cls(
            key_id=str(value["id"]),
            secret=_unb64(str(value["secret"])),
            created=float(created) if isinstance(created, int | float) else 0.0,
        )


def new_key(*, now: float) -> SessionKey:
    return SessionKey(key_id=secrets.token_hex(_KEY_ID_BYTES), secret=secrets.token_bytes(_KEY_BYTES), created=now)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys in force, newest first; all verify.

    A new key signs only once it has settled (`signer`): every replica re-reads the ring
    within that time, so none meets a cookie signed by a key it has not read yet."""

    keys: tuple[SessionKey, ...]

    @property
    def newest(self) -> SessionKey:
        return self.keys[0]

    def signer(self, *, now: float, settle_seconds: float) -> SessionKey:
        """The newest key made at least `settle_seconds` ago (a ring's first key signs at once)."""
        return next((k for k in self.keys if now - k.created >= settle_seconds), self.keys[-1])

    def get(self, key_id: str) -> SessionKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def rotated(self, *, now: float, keep_seconds: float) -> KeyRing:
        """A new key before the old ones; keys whose successor was made longer than
        `keep_seconds` ago (the settling time and a session's life: every cookie they signed
        has expired) are dropped."""
        kept = [self.keys[0]] + [
            k for prev, k in zip(self.keys, self.keys[1:], strict=False) if now - prev.created < keep_seconds
        ]
        return KeyRing((new_key(now=now), *kept))

    def to_json(self) -> dict[str, object]:
        return {"keys": [k.to_json() for k in self.keys]}

    @classmethod
    def from_json(cls, value: Mapping[str, object]) -> KeyRing:
        raw = value.get("keys")
        if not isinstance(raw, list) or not raw:
            raise ValueError("a session key ring holds at least one key")
        return cls(tuple(SessionKey.from_json(k) for k in raw))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionClaims:
    """What a session cookie says. `token_id` "" is open mode (no token behind it)."""

    sid: str
    token_id: str
    identity: str
    expires: float

    def to_json(self) -> dict[str, object]:
        return {"sid": self.sid, "tid": self.token_id, "who": self.identity, "exp": self.expires}


def new_claims(*, token_id: str, identity: str, now: float, lifetime: float) -> SessionClaims:
    return SessionClaims(sid=secrets.token_urlsafe(18), token_id=token_id, identity=identity, expires=now + lifetime)


def _mac(key: SessionKey, signed: str) -> bytes:
    return hmac.new(key.secret, signed.encode(), hashlib.sha256).digest()


def sign(claims: SessionClaims, key: SessionKey) -> str:
    body = _b64(json.dumps(claims.to_json(), separators=(",", ":"), sort_keys=True).encode())
    signed = f"{_VERSION}.{key.key_id}.{body}"
    return f"{signed}.{_b64(_mac(key, signed))}"


def cookie_key_id(cookie: str) -> str:
    """The key id a cookie names ("" when it is not shaped like one of ours)."""
    parts = cookie.split(".")
    return parts[1] if len(parts) == 4 and parts[0] == _VERSION else ""


def verify(cookie: str, ring: KeyRing, *, now: float) -> SessionClaims | None:
    """The claims of a cookie signed by a key of `ring` and not expired; None otherwise
    (malformed, unknown key, wrong MAC, expired: the caller treats all alike)."""
    if len(cookie) > _MAX_COOKIE_CHARS:
        return None
    parts = cookie.split(".")
    if len(parts) != 4 or parts[0] != _VERSION:
        return None
    key = ring.get(parts[1])
    if key is None:
        return None
    try:
        mac = _unb64(parts[3])
        if not hmac.compare_digest(mac, _mac(key, ".".join(parts[:3]))):
            return None
        value = json.loads(_unb64(parts[2]))
        claims = SessionClaims(
            sid=str(value["sid"]),
            token_id=str(value["tid"]),
            identity=str(value["who"]),
            expires=float(value["exp"]),
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if not math.isfinite(claims.expires) or claims.expires <= now:
        return None
    return claims


def csrf_of(claims: SessionClaims, ring: KeyRing, key_id: str) -> str:
    """The session's CSRF token: a MAC of its id under the key that signed it."""
    key = ring.get(key_id) or ring.newest
    return _b64(_mac(key, f"csrf.{claims.sid}"))[:32]


# ---------------------------------------------------------------------------- rate limit


def client_key(address: str) -> str:
    """The bucket an address counts in: itself for IPv4, its /64 for IPv6 (one host
    usually holds a whole /64, so per-address buckets would not limit it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    at: float


class LoginLimiter:
    """Failed logins per client: `burst` failures at once, then one more each
    `refill_seconds`. An attempt takes from the bucket before its token is checked (so
    attempts made at once cannot all pass the check before any has failed) and gives it
    back when it succeeds; a refused attempt (429) takes nothing, so waiting the time it
    names is always enough.

    Bounded: at most `max_clients` buckets; full buckets are forgotten first (they say
    nothing a new bucket would not), then the oldest."""

    def __init__(self, *, burst: int = 5, refill_seconds: float = 10.0, max_clients: int = 10_000) -> None:
        self.burst = burst
        self.refill_seconds = refill_seconds
        self._max = max_clients
        self._buckets: dict[str, _Bucket] = {}

    def _level(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            return _Bucket(tokens=float(self.burst), at=now)
        tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) / self.refill_seconds)
        return _Bucket(tokens=tokens, at=now)

    def retry_after(self, address: str, *, now: float) -> float:
        """Seconds until `address` may try again (0: it may now)."""
        bucket = self._level(client_key(address), now)
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) * self.refill_seconds

    def take(self, address: str, *, now: float) -> float:
        """Take one attempt: 0 when taken, else the seconds to wait (nothing taken)."""
        wait = self.retry_after(address, now=now)
        if wait == 0.0:
            self._add(client_key(address), -1.0, now)
        return wait

    def give_back(self, address: str, *, now: float) -> None:
        """The attempt taken succeeded (or could not be checked): it does not count."""
        self._add(client_key(address), 1.0, now)

    def failed(self, address: str, *, now: float) -> None:
        """One failure counted without a `take` before it."""
        self._add(client_key(address), -1.0, now)

    def _add(self, key: str, tokens: float, now: float) -> None:
        bucket = self._level(key, now)
        bucket.tokens = min(float(self.burst), max(0.0, bucket.tokens + tokens))
        self._buckets.pop(key, None)
        self._buckets[key] = bucket  # newest last
        if len(self._buckets) > self._max:
            self._trim(now)

    def _trim(self, now: float) -> None:
        for key in [k for k in self._buckets if self._level(k, now).tokens >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > self._max:
            del self._buckets[next(iter(self._buckets))]

    def clients(self) -> Iterable[str]:
        return self._buckets.keys()
