"""`HostPort`: a TCP address, and the one parser of `HOST:PORT` text in Graylane.

Every address read from a flag, an API field (an agent's gateway) or a proxy's node metadata
(its admin endpoint) is parsed here, so all of them accept the same forms: `host:port`,
`[v6]:port`, and a bare host only where a default port is given. An IPv6 address without
brackets is refused rather than guessed at. Parsing is pure and raises `ValueError` with a
message fit for a command line; callers that answer an API turn it into their own error.

Must not import: graylane.controlplane, graylane.agent, graylane.xds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostPort:
    """A TCP address. `host` is a name or an IP literal, IPv6 without brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None, any_port: bool = False) -> HostPort:
        """Parse `host:port`, `[v6]:port`, or a bare host when `default_port` is given.

        `any_port`: port 0 is allowed and means "any free port" (for an address we listen on
        and log, never one we connect to)."""
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{text!r}: expected [IPv6]:PORT")
            port_text = rest[1:] if rest else ""
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        elif ":" in text:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
        else:
            host, port_text = text, ""
        if not host:
            raise ValueError(f"{text!r}: missing host")
        if not port_text:
            if default_port is None:
                raise ValueError(f"{text!r}: expected HOST:PORT")
            return cls(host, default_port)
        lowest = 0 if any_port else 1
        if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be a number from {lowest} to 65535")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
