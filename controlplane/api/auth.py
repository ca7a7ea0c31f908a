"""Identities and roles: who a caller is, and what each gRPC method asks of them.

Owns the identity seam every server of the control plane goes through:
- `Role` (viewer < operator < admin, and `agent`, which is outside that order: it may only
  run the AgentService stream of the one cluster it is bound to);
- `Identity` (a name, a role, an optional scope of services / releases, the agent's cluster);
- `REQUIRED_ROLE`, the one table of gRPC method -> role needed, and `authorize`, the pure
  check against it (a method missing from the table needs admin: new methods fail closed);
- `TokenRecord` and the token format: `glt_<id>_<secret>`, of which etcd keeps only the id
  (the key) and a SHA-256 of the secret (see `hash_secret` for why that suffices);
- `identity_from_peer(auth_context)`, which maps a verified client certificate (common name
  or a SAN) to an identity through the same records: a record may name a certificate
  subject instead of holding a secret.

Pure: no etcd, no gRPC server, no clock of its own. `controlplane.store` reads and writes
the records; `controlplane.api` calls `authorize` around each handler.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TOKEN_PREFIX = "glt_"
# 8 random bytes name a token (the etcd key; shown in `token list`, safe to log), 32 more
# are its secret.
_ID_BYTES = 8
_SECRET_BYTES = 32
_TOKEN = re.compile(r"^glt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,62}$")


class Role(enum.IntEnum):
    """Ordered: a higher role may do all a lower one may. `AGENT` sits below every other
    role and is never enough for the ReleaseService; only it (bound to a cluster) may run
    the AgentService stream."""

    AGENT = 0
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"{text!r} is not a role (one of {', '.join(r.label for r in cls)})") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """An authenticated caller. Empty `services` and `releases` mean: not scoped.

    `name` is what history records as the actor (`token:<name>`, `cert:<subject>`,
    `agent:<cluster>`); it never comes from anything the caller merely claims.
    """

    name: str
    role: Role
    services: frozenset[str] = frozenset()
    releases: frozenset[str] = frozenset()
    cluster: str = ""  # the cluster an agent identity reports for

    @property
    def scoped(self) -> bool:
        return bool(self.services or self.releases)

    def may_touch(self, release: str, services: Iterable[str]) -> bool:
        """Whether a release (by name, and the services it routes) is inside this scope.

        A scope of releases admits those releases; a scope of services admits a release all
        of whose services are in it (a full-link release touching one service outside the
        scope would let the caller move traffic there)."""
        if not self.scoped:
            return True
        if release in self.releases:
            return True
        names = set(services)
        return bool(self.services) and bool(names) and names <= self.services


_RS = "/graylane.v1.ReleaseService/"
_AS = "/graylane.v1.AgentService/"
AGENT_SERVICE_PREFIX = _AS  # every AgentService method's path starts with it
_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

# Methods anyone may call, even unauthenticated: load balancers and probes check health.
PUBLIC_PREFIXES: tuple[str, ...] = (_HEALTH,)

REQUIRED_ROLE: Mapping[str, Role] = {
    **{
        _RS + m: Role.VIEWER
        for m in (
            "GetRelease",
            "ListReleases",
            "Watch",
            "History",
            "ListServices",
            "ListVersions",
            "ListClusters",
            "GetTraffic",
            "GetMetrics",
            "WatchMetrics",
        )
    },
    **{
        _RS + m: Role.OPERATOR
        for m in ("CreateRelease", "ApplyRelease", "NextBatch", "Pause", "Resume", "Rollback", "Promote", "Restart")
    },
    **{
        _RS + m: Role.ADMIN
        for m in (
            "DeleteRelease",
            "PutService",
            "PutVersion",
            "ForgetCluster",
            "ListTombstones",
            "TombstoneHistory",
            "CreateToken",
            "ListTokens",
            "RevokeToken",
        )
    },
    _AS + "Connect": Role.AGENT,
    **{prefix + "ServerReflectionInfo": Role.VIEWER for prefix in _REFLECTION},
}


class Denied(Exception):
    """The caller may not make this call. `needed` names the role it lacks (None: the role
    is enough but the scope or the cluster is not)."""

    def __init__(self, message: str, *, needed: Role | None = None) -> None:
        super().__init__(message)
        self.needed = needed


def required_role(method: str) -> Role | None:
    """The role `method` needs; None for a public method. Unknown methods need admin."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    return REQUIRED_ROLE.get(method, Role.ADMIN)


def authorize(identity: Identity, method: str) -> None:
    """Raise `Denied` unless `identity` may call `method` (role only; scopes are per object)."""
    needed = required_role(method)
    if needed is None:
        return
    short = method.rsplit("/", 1)[-1]
    if needed is Role.AGENT:
        if identity.role is not Role.AGENT or not identity.cluster:
            raise Denied(f"{short} needs an agent credential bound to a cluster", needed=Role.AGENT)
        return
    if identity.role is Role.AGENT:
        raise Denied(f"{short} needs role {needed.label}; an agent credential is only for AgentService", needed=needed)
    if identity.role < needed:
        raise Denied(f"{short} needs role {needed.label} (this identity has {identity.role.label})", needed=needed)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{name!r}: a token name is 1-63 letters, digits and . _ @ : - (starting with a letter or digit)"
        )
    return name


# ---------------------------------------------------------------------------- tokens


def hash_secret(secret: str) -> str:
    """SHA-256 of a token's secret, hex.

    A fast unsalted hash is enough here, unlike for passwords: the secret is 256 bits from
    `secrets.token_urlsafe`, so there is no dictionary to try and no brute force within
    reach, and a leaked hash cannot be turned back into a usable token. A slow KDF would
    only add its cost to every API call.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class NewToken:
    token_id: str
    token: str  # the whole bearer value, shown once
    secret_hash: str


def new_token() -> NewToken:
    token_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return NewToken(token_id=token_id, token=f"{TOKEN_PREFIX}{token_id}_{secret}", secret_hash=hash_secret(secret))


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = _TOKEN.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRecord:
    """What etcd keeps of one token (under `tokens/<id>`). No secret, only its hash.

    A record with `subject` and no `secret_hash` grants its role to a client certificate
    whose common name or SAN equals `subject`, instead of to a bearer token."""

    token_id: str
    name: str
    role: Role
    services: frozenset[str] = frozenset()
    releases: frozenset[str] = frozenset()
    cluster: str = ""
    subject: str = ""
    secret_hash: str = ""
    created_at: str = ""
    created_by: str = ""

    def identity(self) -> Identity:
        prefix = "cert" if self.subject and not self.secret_hash else "token"
        name = f"agent:{self.cluster}" if self.role is Role.AGENT else f"{prefix}:{self.name}"
        return Identity(name=name, role=self.role, services=self.services, releases=self.releases, cluster=self.cluster)

    def matches(self, secret: str) -> bool:
        return bool(self.secret_hash) and hmac.compare_digest(hash_secret(secret), self.secret_hash)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.token_id,
            "name": self.name,
            "role": self.role.label,
            "services": sorted(self.services),
            "releases": sorted(self.releases),
            "cluster": self.cluster,
            "subject": self.subject,
            "sha256": self.secret_hash,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, object]) -> TokenRecord:
        def strings(key: str) -> frozenset[str]:
            raw = value.get(key) or []
            return frozenset(str(v) for v in raw) if isinstance(raw, list) else frozenset()

        return cls(
            token_id=str(value["id"]),
            name=str(value["name"]),
            role=Role.parse(str(value["role"])),
            services=strings("services"),
            releases=strings("releases"),
            cluster=str(value.get("cluster", "")),
            subject=str(value.get("subject", "")),
            secret_hash=str(value.get("sha256", "")),
            created_at=str(value.get("created_at", "")),
            created_by=str(value.get("created_by", "")),
        )


def check_record(record: TokenRecord) -> TokenRecord:
    """Raise ValueError unless the record is coherent (an agent has a cluster, others none)."""
    check_name(record.name)
    if record.role is Role.AGENT and not record.cluster:
        raise ValueError("an agent token needs --cluster")
    if record.role is not Role.AGENT and record.cluster:
        raise ValueError("--cluster is only for agent tokens")
    if record.role is Role.AGENT and (record.services or record.releases):
        raise ValueError("an agent token is scoped by its cluster, not by services or releases")
    if bool(record.subject) == bool(record.secret_hash):
        raise ValueError("a record holds either a secret's hash or a certificate subject")
    return record


def bearer(metadata: Mapping[str, str]) -> str:
    """The token of an `authorization: Bearer <token>` header ("" if none)."""
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True, slots=True)
class PeerNames:
    """The names a verified client certificate carries (common name, then SANs)."""

    names: tuple[str, ...] = field(default=())


def peer_names(auth_context: Mapping[str, Iterable[bytes]]) -> PeerNames:
    """Names from a gRPC auth context of a TLS connection whose client certificate the
    server verified (gRPC puts only verified peers' names there). Empty without one."""
    if not auth_context or list(auth_context.get("transport_security_type", [])) != [b"ssl"]:
        return PeerNames()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for raw in auth_context.get(key, ()):
            text = raw.decode(errors="replace")
            if text not in names:
                names.append(text)
    return PeerNames(tuple(names))


def identity_from_peer(auth_context: Mapping[str, Iterable[bytes]], records: Iterable[TokenRecord]) -> Identity | None:
    """The identity of a verified client certificate: the first record whose `subject` is
    the certificate's common name or one of its SANs. None: no certificate, or no record
    names it (a certificate alone grants nothing; the CA proves the name, the records give
    it a role)."""
    names = peer_names(auth_context).names
    if not names:
        return None
    by_subject = {r.subject: r for r in records if r.subject and not r.secret_hash}
    for name in names:
        record = by_subject.get(name)
        if record is not None:
            return record.identity()
    return None


def agent_identities(agent_tokens: Mapping[str, str]) -> dict[str, tuple[str, Identity]]:
    """Legacy `--agent-tokens` (cluster -> token) as hash -> (cluster, identity)."""
    return {
        hash_secret(token): (cluster, Identity(name=f"agent:{cluster}", role=Role.AGENT, cluster=cluster))
        for cluster, token in agent_tokens.items()
    }
