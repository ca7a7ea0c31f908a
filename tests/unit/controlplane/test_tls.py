"""Identities in certificates, the certificates `graylane certs` makes, the tokens file."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from graylane.controlplane.api.certs import make_local_certs
from graylane.controlplane.api.tls import (
    AGENT,
    PROXY,
    USER,
    CertIdentity,
    ClientTls,
    ServerTls,
    TlsConfigError,
    agent_uri,
    peer_identities,
    proxy_uri,
    user_uri,
)
from graylane.controlplane.options import parse_xds_tokens


def test_identity_uris_round_trip_and_refuse_what_they_do_not_name() -> None:
    assert CertIdentity.parse(proxy_uri("east", "envoy-1")) == CertIdentity(PROXY, ("east", "envoy-1"))
    assert CertIdentity.parse(proxy_uri("east")) == CertIdentity(PROXY, ("east",))
    assert CertIdentity.parse(agent_uri("east")) == CertIdentity(AGENT, ("east",))
    assert CertIdentity.parse(user_uri("ci-bot")) == CertIdentity(USER, ("ci-bot",))
    for uri in (
        "spiffe://other/proxy/east",
        "spiffe://graylane/proxy/east/a/b",
        "spiffe://graylane/agent/east/x",
        "spiffe://graylane/admin/root",
        "spiffe://graylane/proxy/ea st",
        "spiffe://graylane/proxy/*",
    ):
        assert CertIdentity.parse(uri) is None, uri
    with pytest.raises(ValueError, match="cluster"):
        proxy_uri("a/b")


def test_peer_identities_only_over_tls_and_only_from_sans() -> None:
    uri = proxy_uri("east").encode()
    assert peer_identities({"transport_security_type": [b"ssl"], "x509_subject_alternative_name": [uri]}) == (
        CertIdentity(PROXY, ("east",)),
    )
    assert peer_identities({"x509_subject_alternative_name": [uri]}) == ()  # not TLS: nothing is proven
    assert peer_identities({"transport_security_type": [b"ssl"], "x509_common_name": [uri]}) == ()


def test_make_local_certs_writes_a_ca_and_leaves_naming_their_identities(tmp_path: Path) -> None:
    written = make_local_certs(tmp_path, hosts=["10.0.0.5", "cp.example"], clusters=["east"], users=["ci"])
    names = {i.cert.name: i for i in written}
    assert set(names) == {"ca.pem", "server.pem", "envoy-east.pem", "agent-east.pem", "user-ci.pem"}
    for issued in written:
        assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600, issued.key
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "cp.example"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.5")
    }
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for file, uri in (("envoy-east.pem", proxy_uri("east")), ("agent-east.pem", agent_uri("east")),
                      ("user-ci.pem", user_uri("ci"))):  # fmt: skip
        leaf = x509.load_pem_x509_certificate((tmp_path / file).read_bytes())
        leaf.verify_directly_issued_by(ca)
        leaf_sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert leaf_sans.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
    # A second run keeps the CA (certificates made before stay valid) and adds a cluster.
    again = make_local_certs(tmp_path, clusters=["west"])
    assert (tmp_path / "ca.pem").read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    west = x509.load_pem_x509_certificate((tmp_path / "envoy-west.pem").read_bytes())
    west.verify_directly_issued_by(ca)
    assert again[0].name == "CA"


def test_tls_settings_name_the_file_they_cannot_read(tmp_path: Path) -> None:
    make_local_certs(tmp_path)
    with pytest.raises(TlsConfigError, match="missing.pem"):
        ServerTls(cert=tmp_path / "missing.pem", key=tmp_path / "server-key.pem").grpc_credentials()
    with pytest.raises(TlsConfigError, match="its key"):
        ClientTls(ca=tmp_path / "ca.pem", cert=tmp_path / "user-admin.pem")
    pair = {"cert": tmp_path / "server.pem", "key": tmp_path / "server-key.pem"}
    assert ServerTls(**pair, client_ca=tmp_path / "ca.pem").mutual
    ServerTls(cert=tmp_path / "server.pem", key=tmp_path / "server-key.pem").ssl_context()


def test_xds_tokens_keep_hashes_inside_tokens_and_name_bad_lines() -> None:
    text = "# proxies\neast: 'tok#en-0123456789abcdef'\neast/envoy-1: plain-0123456789abcdef  \n\n"
    text += "east/envoy-2 [checkout, payments]: scoped-0123456789abcdef\neast [web]\n"
    assert parse_xds_tokens(text, source="t") == (
        ("east", None, "tok#en-0123456789abcdef", None),
        ("east", "envoy-1", "plain-0123456789abcdef", None),
        ("east", "envoy-2", "scoped-0123456789abcdef", frozenset({"checkout", "payments"})),
        ("east", None, "", frozenset({"web"})),  # scopes east's client certificates
    )
    for bad, message in (
        ("east 0123456789abcdef", "t:1: expected"),
        ("east: short", "t:1: a token must be at least 16"),
        ("ea st: 0123456789abcdef", "t:1: 'ea st': expected `cluster"),
        ("east: 0123456789abcdef\nwest: 0123456789abcdef", "listed twice"),
        ("east\neast []: 0123456789abcdef", "t:1: expected"),
        ("east []: 0123456789abcdef", "t:1: a scope `.*` names at least one service"),
        ("# c\neast [a,Bad]: 0123456789abcdef", "t:2: scope: service 'Bad' is not a service name"),
        ("east [a,,b]", "t:1: scope: service '' is not"),
        ("east [a] [b]: 0123456789abcdef", "t:1: 'east \\[a\\] \\[b\\]': expected"),
        ("east [a: 0123456789abcdef", "t:1: 'east \\[a': expected"),
        ("e/st/x [a]", "t:1: node 'st/x'"),
        ("east [a]\neast [b]", "a certificate identity is scoped twice"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_xds_tokens(bad, source="t")
