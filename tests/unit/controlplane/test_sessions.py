"""Session cookies, the shared key ring and the login limiter, as pure values."""

from __future__ import annotations

import pytest
from graylane.controlplane.api import sessions
from graylane.controlplane.api.sessions import (
    KeyRing,
    LoginLimiter,
    client_key,
    new_claims,
    new_key,
    sign,
    verify,
)

DAY = 86400.0


def test_a_signed_cookie_verifies_until_it_expires_and_names_no_secret() -> None:
    ring = KeyRing((new_key(now=0.0),))
    claims = new_claims(token_id="00112233aabbccdd", identity="token:ci", now=100.0, lifetime=60.0)
    cookie = sign(claims, ring.newest)
    assert verify(cookie, ring, now=120.0) == claims
    assert verify(cookie, ring, now=160.0) is None
    assert sessions.cookie_key_id(cookie) == ring.newest.key_id
    assert sessions.csrf_of(claims, ring, ring.newest.key_id) == sessions.csrf_of(claims, ring, ring.newest.key_id)


@pytest.mark.parametrize("change", ["claims", "mac", "key", "version", "shape"])
def test_a_changed_cookie_is_refused(change: str) -> None:
    ring = KeyRing((new_key(now=0.0),))
    cookie = sign(new_claims(token_id="00112233aabbccdd", identity="token:ci", now=0.0, lifetime=60.0), ring.newest)
    version, key_id, body, mac = cookie.split(".")
    other = sign(new_claims(token_id="ffffffffffffffff", identity="token:root", now=0.0, lifetime=60.0), ring.newest)
    bad = {
        "claims": f"{version}.{key_id}.{other.split('.')[2]}.{mac}",
        "mac": f"{version}.{key_id}.{body}.{other.split('.')[3]}",
        "key": sign(new_claims(token_id="1", identity="x", now=0.0, lifetime=60.0), new_key(now=0.0)),
        "version": f"v0.{key_id}.{body}.{mac}",
        "shape": f"{version}.{key_id}.{body}",
    }[change]
    assert verify(bad, ring, now=1.0) is None


def test_rotation_keeps_old_keys_while_their_cookies_may_live() -> None:
    first = KeyRing((new_key(now=0.0),))
    # Signed just before the rotation: the retired key still verifies it.
    cookie = sign(new_claims(token_id="a", identity="token:a", now=DAY - 100, lifetime=DAY / 2), first.newest)
    second = first.rotated(now=DAY, keep_seconds=DAY / 2)
    assert second.newest != first.newest and verify(cookie, second, now=DAY + 10) is not None
    third = second.rotated(now=2 * DAY, keep_seconds=DAY / 2)
    assert [k.key_id for k in third.keys] == [third.newest.key_id, second.newest.key_id]
    assert KeyRing.from_json(third.to_json()) == third


def test_failed_logins_drain_a_bucket_that_refills() -> None:
    limiter = LoginLimiter(burst=5, refill_seconds=10.0)
    for _ in range(5):
        assert limiter.retry_after("192.0.2.1", now=0.0) == 0.0
        limiter.failed("192.0.2.1", now=0.0)
    assert limiter.retry_after("192.0.2.1", now=0.0) == pytest.approx(10.0)
    assert limiter.retry_after("192.0.2.2", now=0.0) == 0.0  # another client is not held back
    assert limiter.retry_after("192.0.2.1", now=4.0) == pytest.approx(6.0)
    assert limiter.retry_after("192.0.2.1", now=10.0) == 0.0


def test_ipv6_clients_count_by_their_64_and_the_table_is_bounded() -> None:
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    limiter = LoginLimiter(burst=2, refill_seconds=1.0, max_clients=3)
    for i in range(10):
        limiter.failed(f"192.0.2.{i}", now=float(i))
    assert len(list(limiter.clients())) <= 3


def test_a_new_key_signs_only_once_every_replica_can_have_read_it() -> None:
    first = KeyRing((new_key(now=0.0),))
    assert first.signer(now=0.0, settle_seconds=90.0) == first.newest  # a ring's first key: at once
    second = first.rotated(now=DAY, keep_seconds=DAY)
    assert second.signer(now=DAY + 89, settle_seconds=90.0) == first.newest
    assert second.signer(now=DAY + 90, settle_seconds=90.0) == second.newest


def test_attempts_made_at_once_take_from_the_bucket_before_they_are_checked() -> None:
    limiter = LoginLimiter(burst=5, refill_seconds=10.0)
    taken = [limiter.take("192.0.2.1", now=0.0) for _ in range(8)]
    assert taken[:5] == [0.0] * 5 and all(wait > 0 for wait in taken[5:])
    limiter.give_back("192.0.2.1", now=0.0)  # one of them was a good token
    assert limiter.take("192.0.2.1", now=0.0) == 0.0
