"""The role table, token format and certificate mapping of `controlplane.auth`."""

from __future__ import annotations

import pytest
from graylane.controlplane.api import auth
from graylane.controlplane.api.auth import Denied, Identity, Role, TokenRecord

RS = "/graylane.v1.ReleaseService/"


def ident(role: Role, **kw: object) -> Identity:
    return Identity(name=f"token:{role.label}", role=role, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "lowest"),
    [
        ("GetRelease", Role.VIEWER),
        ("History", Role.VIEWER),
        ("Watch", Role.VIEWER),
        ("NextBatch", Role.OPERATOR),
        ("Rollback", Role.OPERATOR),
        ("ApplyRelease", Role.OPERATOR),
        ("DeleteRelease", Role.ADMIN),
        ("PutService", Role.ADMIN),
        ("ForgetCluster", Role.ADMIN),
        ("CreateToken", Role.ADMIN),
        ("SomethingAddedLater", Role.ADMIN),
    ],
)
def test_each_role_may_call_what_its_rank_allows(method: str, lowest: Role) -> None:
    for role in (Role.VIEWER, Role.OPERATOR, Role.ADMIN):
        if role >= lowest:
            auth.authorize(ident(role), RS + method)
        else:
            with pytest.raises(Denied, match=f"needs role {lowest.label}") as err:
                auth.authorize(ident(role), RS + method)
            assert err.value.needed is lowest


def test_agents_only_run_their_stream() -> None:
    agent = Identity(name="agent:west", role=Role.AGENT, cluster="west")
    auth.authorize(agent, "/graylane.v1.AgentService/Connect")
    with pytest.raises(Denied, match="only for AgentService"):
        auth.authorize(agent, RS + "GetRelease")
    with pytest.raises(Denied, match="agent credential"):
        auth.authorize(ident(Role.ADMIN), "/graylane.v1.AgentService/Connect")


def test_health_is_public() -> None:
    assert auth.required_role("/grpc.health.v1.Health/Check") is None


def test_scope_by_release_or_by_every_service() -> None:
    scoped = ident(Role.OPERATOR, services=frozenset({"a", "b"}), releases=frozenset({"x"}))
    assert scoped.may_touch("x", ["z"])
    assert scoped.may_touch("y", ["a", "b"])
    assert not scoped.may_touch("y", ["a", "c"])
    assert not scoped.may_touch("y", [])
    assert ident(Role.VIEWER).may_touch("anything", ["c"])


def test_token_round_trip_and_hash_only() -> None:
    made = auth.new_token()
    parts = auth.split_token(made.token)
    assert parts is not None and parts[0] == made.token_id
    record = TokenRecord(token_id=made.token_id, name="ci", role=Role.OPERATOR, secret_hash=made.secret_hash)
    assert parts[1] not in str(record.to_json())
    assert record.matches(parts[1])
    assert not record.matches(parts[1][:-1] + ("A" if parts[1][-1] != "A" else "B"))
    again = TokenRecord.from_json(record.to_json())
    assert again == record
    assert again.identity().name == "token:ci"
    assert auth.split_token(made.token + "#x") is None
    assert auth.split_token("glt_zz") is None


def test_bearer_header() -> None:
    assert auth.bearer({"authorization": "Bearer abc"}) == "abc"
    assert auth.bearer({"authorization": "bearer  abc "}) == "abc"
    assert auth.bearer({"authorization": "Basic abc"}) == ""
    assert auth.bearer({}) == ""


def test_records_must_be_coherent() -> None:
    with pytest.raises(ValueError, match="needs --cluster"):
        auth.check_record(TokenRecord(token_id="1", name="a", role=Role.AGENT, secret_hash="h"))
    with pytest.raises(ValueError, match="only for agent"):
        auth.check_record(TokenRecord(token_id="1", name="a", role=Role.VIEWER, cluster="w", secret_hash="h"))
    with pytest.raises(ValueError, match="either"):
        auth.check_record(TokenRecord(token_id="1", name="a", role=Role.VIEWER))
    with pytest.raises(ValueError, match="token name"):
        auth.check_name("bad\nname")


def test_certificate_maps_through_subject_records() -> None:
    records = [
        TokenRecord(token_id="1", name="ci-cert", role=Role.OPERATOR, subject="ci.example"),
        TokenRecord(token_id="2", name="tok", role=Role.ADMIN, secret_hash="h", subject="admin.example"),
    ]
    ctx = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"ci.example"],
        "x509_subject_alternative_name": [b"ci.example", b"spiffe://x"],
    }
    found = auth.identity_from_peer(ctx, records)
    assert found is not None and found.role is Role.OPERATOR and found.name == "cert:ci-cert"
    # A record holding a secret does not grant its role to a certificate.
    assert (
        auth.identity_from_peer(
            {**ctx, "x509_common_name": [b"admin.example"], "x509_subject_alternative_name": []}, records
        )
        is None
    )
    assert auth.identity_from_peer({"transport_security_type": [b"insecure"]}, records) is None
    assert auth.identity_from_peer({}, records) is None
