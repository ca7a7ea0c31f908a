"""Options of a control-plane process, as plain frozen values.

Owns `ServeOptions` (what `graylane serve` hands to `graylane.controlplane.app.serve`);
its addresses are `graylane.controlplane.address.HostPort`. Parsing here is pure and raises
`ValueError` with a message fit for a command line; it imports no gRPC, etcd or xds code,
so the CLI can build options without loading the server.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from graylane.controlplane.address import HostPort as HostPort  # re-exported: ServeOptions' addresses are HostPorts
from graylane.controlplane.api.tls import ClientTls, ServerTls, check_name
from graylane.controlplane.defaults import (
    DEFAULT_API_PORT,
    DEFAULT_DATA_DIR,
    DEFAULT_HTTP_PORT,
    DEFAULT_LISTEN_HOST,
    DEFAULT_LOOP_LAG_INTERVAL_SECONDS,
    DEFAULT_XDS_PORT,
)

#: The cluster a control plane's own xDS port serves (its proxies' node.cluster under auth).
DEFAULT_XDS_CLUSTER = "local"
#: Admin endpoints fetched by default: loopback only (the bootstraps' admin listens there).
DEFAULT_ADMIN_ALLOW: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
#: A proxy token shorter than this is refused when the file is read: it could be guessed.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeOptions:
    """What one control-plane process needs to start.

    `etcd_endpoints` empty means: start an embedded etcd child process with its data under
    `data_dir / "etcd"`. Otherwise they are the client URLs of an external cluster, tried
    in order.
    """

    etcd_endpoints: tuple[HostPort, ...] = ()
    listen: HostPort = field(default=HostPort(DEFAULT_LISTEN_HOST, DEFAULT_API_PORT))
    xds_listen: HostPort = field(default=HostPort(DEFAULT_LISTEN_HOST, DEFAULT_XDS_PORT))
    # The HTTP server: /metrics (Prometheus) and /healthz.
    http_listen: HostPort = field(default=HostPort(DEFAULT_LISTEN_HOST, DEFAULT_HTTP_PORT))
    # OTLP/HTTP base URL for traces (like OTEL_EXPORTER_OTLP_ENDPOINT, which is used when
    # this is None); with neither, no traces.
    otlp_endpoint: str | None = None
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    # cluster -> agent token; empty: agents are not authenticated (a local set-up)
    agent_tokens: tuple[tuple[str, str], ...] = ()
    agent_lease_ttl_seconds: int = 10
    leader_ttl_seconds: int = 5  # a killed leader is replaced within this
    # A proxy that has not ACKed a release's target this long after it appeared (or after
    # the proxy connected), or whose replica went silent this long ago, is declared gone for
    # convergence (and named in the release's status).
    stale_proxy_seconds: float = 30.0
    # Where Graylane's keys live in etcd; another prefix lets installations share one etcd.
    etcd_prefix: str = "/graylane/v1/"
    # TLS on every port (API and agents, xDS, HTTP); None: plain text.
    tls: ServerTls | None = None
    # TLS to an external etcd (its CA, and a client certificate if it requires one); None:
    # plain text. The embedded etcd listens on loopback in plain text.
    etcd_tls: ClientTls | None = None
    # Proxies' tokens and scopes (`parse_xds_tokens`); with these or with mutual
    # TLS, an xDS client must prove it is a proxy of `xds_cluster` (see controlplane.proxyauth).
    xds_tokens: tuple[XdsCredential, ...] = ()
    xds_cluster: str = DEFAULT_XDS_CLUSTER
    # Where proxies' self-reported admin endpoints may be fetched (`CIDR[:PORT]` items).
    admin_allow: tuple[str, ...] = DEFAULT_ADMIN_ALLOW
    # Metrics from a Prometheus that already scrapes the Envoys, instead of their admin
    # endpoints ("": read the admins): its base URL, how often it is asked (each answer
    # covers the time since the last), and label matchers added to every query.
    prometheus_url: str = ""
    prometheus_interval_seconds: float = 30.0
    prometheus_selector: str = ""
    # Callers must present a token or a client certificate that a token record names.
    auth: bool = False
    # Listen on a non-loopback address without auth (refused otherwise).
    insecure: bool = False
    # Where a fresh `--auth` installation's first admin token is written (mode 0600);
    # None: DATA_DIR/admin.token.
    bootstrap_token_file: Path | None = None
    # API server limits: the largest request, response streams (Watch, WatchMetrics, agent
    # streams) one identity may hold open, and how long a connection with no call lives.
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_streams_per_identity: int = 64
    max_connection_idle_seconds: float = 300.0
    # Webhook destinations allowed beyond the default policy (host names or CIDRs).
    webhook_allow: tuple[str, ...] = ()
    # The event-loop lag probe's timer period (graylane_event_loop_lag_* on /metrics).
    loop_lag_interval_seconds: float = DEFAULT_LOOP_LAG_INTERVAL_SECONDS

    @property
    def token_file(self) -> Path:
        return self.bootstrap_token_file or self.data_dir / "admin.token"

    def exposed(self) -> list[str]:
        """The listen addresses reachable from beyond this machine."""
        return [str(a) for a in (self.listen, self.xds_listen, self.http_listen) if not is_loopback_host(a.host)]

    def check_exposure(self) -> None:
        """ValueError when a non-loopback address would serve without auth and no --insecure."""
        exposed = self.exposed()
        if exposed and not self.auth and not self.insecure:
            raise ValueError(
                f"{', '.join(exposed)} is reachable beyond this machine, and without --auth anyone who "
                "reaches it may roll back, delete or rewrite releases; add --auth (see `graylane token`), "
                "or --insecure to run open anyway"
            )
        if not is_loopback_host(self.xds_listen.host) and not self.xds_authenticated and not self.insecure:
            raise ValueError(
                f"xDS on {self.xds_listen} is reachable beyond this machine, and without proxy credentials "
                "anyone who reaches it reads every route and may NACK to pause releases; add --client-ca "
                "(with --tls-cert/--tls-key) or --xds-tokens, or --insecure to run open anyway"
            )

        check_certificate_scopes(self.xds_tokens, mutual=self.tls is not None and self.tls.mutual)

    @property
    def xds_authenticated(self) -> bool:
        """Whether xDS clients must prove they are proxies (client certificates or tokens)."""
        return bool(self.xds_tokens) or (self.tls is not None and self.tls.mutual)

    @property
    def embedded_etcd(self) -> bool:
        return not self.etcd_endpoints


def check_certificate_scopes(credentials: Sequence[XdsCredential], *, mutual: bool) -> None:
    """ValueError when `--xds-tokens` holds only token-less lines (scopes of client
    certificates) but no client certificate is asked for: the gate would be on and could
    admit no proxy at all."""
    if credentials and not mutual and not any(c.token for c in credentials):
        raise ValueError(
            "--xds-tokens: every line is a token-less scope of client certificates, but without "
            "--client-ca no proxy presents one, so every proxy would be refused; add --client-ca "
            "(with --tls-cert/--tls-key) or give the lines tokens"
        )


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve anywhere


def parse_agent_tokens(text: str, *, source: str) -> tuple[tuple[str, str], ...]:
    """`cluster: token` lines (YAML mapping) into pairs; ValueError names the problem."""
    pairs: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        # A comment is a line that starts with `#`, or a ` #` (as in YAML): a `#` inside a
        # token is part of the token.
        line = raw.strip()
        if line.startswith("#"):
            continue
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()
        if not line:
            continue
        cluster, sep, token = line.partition(":")
        cluster, token = cluster.strip(), token.strip().strip("\"'")
        if not sep or not cluster or not token:
            raise ValueError(f"{source}:{number}: expected `cluster: token`")
        pairs.append((cluster, token))
    if len({c for c, _ in pairs}) != len(pairs):
        raise ValueError(f"{source}: a cluster is listed twice")
    return tuple(pairs)


class XdsCredential(NamedTuple):
    """One line of an `--xds-tokens` file: a proxy identity (a cluster, and a node or None
    for any node of it), its token ("" for a line that only scopes the client certificates
    naming that identity), and the services it may receive (None: all of its cluster's)."""

    cluster: str
    node: str | None
    token: str
    services: frozenset[str] | None = None


# `cluster[/node]`, then an optional `[service,service]` scope.
_XDS_IDENTITY = re.compile(r"(?P<name>[^\s\[\]]*)\s*(?:\[(?P<scope>[^\]]*)\])?")
_SERVICE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # as a release names one


def parse_xds_tokens(text: str, *, source: str) -> tuple[XdsCredential, ...]:
    """An `--xds-tokens` file into its credentials; ValueError names the file, line and problem.

    Lines (see graylane.controlplane.api.proxyauth):
    * `cluster: token` - any proxy of the cluster; `cluster/node: token` - that node only;
    * `cluster[/node] [a,b]: token` - the same, scoped: the proxy receives services a and b
      only (their routes, clusters and endpoints, gray versions and lanes included);
    * `cluster[/node] [a,b]` (no token) - scopes the client certificates naming that
      identity (`spiffe://graylane/proxy/cluster[/node]`), which need no new extension.

    A line is a comment only when it starts with `#`: a token may hold any character, a `#`
    included. Surrounding quotes are taken off.
    """
    found: list[XdsCredential] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
            token = token[1:-1]
        try:
            match = _XDS_IDENTITY.fullmatch(name)
            if not sep and (match is None or match["scope"] is None):
                raise ValueError(
                    "expected `cluster: token`, `cluster/node: token`, `cluster[/node] [services]: token`, "
                    "or `cluster[/node] [services]` (scoping client certificates)"
                )
            if match is None:
                raise ValueError(
                    f"{name!r}: expected `cluster[/node] [service,...]` before the `:` "
                    "(`[` and `]` only around the services)"
                )
            cluster, _, node = match["name"].partition("/")
            services = _parse_scope(match["scope"])
            check_name("cluster", cluster)
            if node:
                check_name("node", node)
            if sep and len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(f"a token must be at least {MIN_TOKEN_LENGTH} characters")
        except ValueError as exc:
            raise ValueError(f"{source}:{number}: {exc}") from None
        found.append(XdsCredential(cluster, node or None, token, services))
    tokens = [c.token for c in found if c.token]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{source}: a token is listed twice")
    scoped = [(c.cluster, c.node) for c in found if not c.token]
    if len(set(scoped)) != len(scoped):
        raise ValueError(f"{source}: a certificate identity is scoped twice")
    return tuple(found)


def _parse_scope(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if names == [""]:
        raise ValueError("a scope `[...]` names at least one service (leave it out for all of them)")
    for name in names:
        if not _SERVICE.fullmatch(name):
            raise ValueError(
                f"scope: service {name!r} is not a service name (lower-case letters, digits and '-', at most 63)"
            )
    return frozenset(names)
