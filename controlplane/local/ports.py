"""Free loopback ports for the servers the tests and demos start.

Owns one rule: listening ports are picked below the kernel's ephemeral range, so that the
local end of an outgoing connection cannot take the port between the moment it is picked
and the moment its server binds it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOOPBACK = "127.0.0.1"
# Seen as an Envoy NACK ("Address already in use") when a port came from the ephemeral range.
_LISTEN_PORTS = range(20000, 32768)


def _ephemeral_ports() -> range:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(low, high + 1)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 for a server to listen on.

    Chosen at random outside the ephemeral range (so outgoing connections do not race for
    it) and checked by binding it; falls back to one the OS picks.
    """
    ephemeral = _ephemeral_ports()
    for _ in range(64):
        port = random.choice(_LISTEN_PORTS)
        if port in ephemeral:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        found: int = sock.getsockname()[1]
        return found
