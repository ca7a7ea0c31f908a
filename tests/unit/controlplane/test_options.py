"""HOST:PORT parsing and ServeOptions defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from graylane.controlplane.defaults import DEFAULT_API_PORT, DEFAULT_XDS_PORT
from graylane.controlplane.options import HostPort, ServeOptions, is_loopback_host, parse_agent_tokens


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("127.0.0.1:7400", HostPort("127.0.0.1", 7400), "127.0.0.1:7400"),
        ("etcd-0.etcd:2379", HostPort("etcd-0.etcd", 2379), "etcd-0.etcd:2379"),
        ("[::1]:7401", HostPort("::1", 7401), "[::1]:7401"),
        ("0.0.0.0:1", HostPort("0.0.0.0", 1), "0.0.0.0:1"),
    ],
)
def test_parse_and_show(text: str, expected: HostPort, shown: str) -> None:
    assert HostPort.parse(text) == expected
    assert str(expected) == shown


def test_default_port_applies_only_when_given() -> None:
    assert HostPort.parse("etcd", default_port=2379) == HostPort("etcd", 2379)
    assert HostPort.parse("[::1]", default_port=2379) == HostPort("::1", 2379)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        HostPort.parse("etcd")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (":7400", "missing host"),
        ("host:0", "port must be a number from 1 to 65535"),
        ("host:70000", "port must be a number from 1 to 65535"),
        ("host:http", "port must be a number"),
        ("::1:7400", "write IPv6 addresses as [ADDRESS]:PORT"),
        ("[::1", "expected [IPv6]:PORT"),
    ],
)
def test_bad_addresses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        HostPort.parse(text)


def test_serve_options_defaults() -> None:
    options = ServeOptions()
    assert options.etcd_endpoints == ()
    assert options.embedded_etcd
    assert options.listen == HostPort("127.0.0.1", DEFAULT_API_PORT)
    assert options.xds_listen == HostPort("127.0.0.1", DEFAULT_XDS_PORT)
    assert options.data_dir == Path(".graylane")


def test_a_hash_inside_an_agent_token_is_part_of_it() -> None:
    text = "# clusters\nwest: s3cr#t  # west's agent\neast: 'a#b'\n  # indented comment\n"
    assert parse_agent_tokens(text, source="tokens.txt") == (("west", "s3cr#t"), ("east", "a#b"))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("cp.example.com", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_exposure_needs_auth_or_insecure() -> None:
    exposed = ServeOptions(listen=HostPort("0.0.0.0", 7400))
    with pytest.raises(ValueError, match="0.0.0.0:7400 is reachable beyond this machine"):
        exposed.check_exposure()
    ServeOptions(listen=HostPort("0.0.0.0", 7400), auth=True).check_exposure()
    ServeOptions(listen=HostPort("0.0.0.0", 7400), insecure=True).check_exposure()
    ServeOptions().check_exposure()
