"""Default ports and places shared by the control plane, its CLI and agents.

Owns constants only, so anything may import it without pulling in gRPC or etcd.
"""

from __future__ import annotations

from typing import Final

#: The ReleaseService (gRPC API) port of the control plane.
DEFAULT_API_PORT: Final = 7400
#: The port the control plane's embedded xDS (ADS) server listens on for Envoys.
DEFAULT_XDS_PORT: Final = 7401
#: The control plane's HTTP server: /metrics and /healthz.
DEFAULT_HTTP_PORT: Final = 7403
#: etcd's client port, assumed when `--etcd` names a host without a port.
DEFAULT_ETCD_PORT: Final = 2379

#: Where `serve` listens unless told otherwise: loopback, because the API is plain gRPC
#: with no authentication; binding to a routable address is an explicit choice.
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
#: Where `serve` keeps local state (the embedded etcd's data lives under `<dir>/etcd`).
DEFAULT_DATA_DIR: Final = ".graylane"
#: Deadline of every unary call the CLI makes: above the server's etcd call timeout (5 s),
#: so a caller sees the server's UNAVAILABLE "etcd unavailable", not its own deadline.
DEFAULT_RPC_TIMEOUT_SECONDS: Final = 15.0
#: The event-loop lag probe's timer period (graylane_event_loop_lag_* on /metrics). A stall
#: is read short by up to one period; each wake costs the loop ~0.1 ms on a small VM, so 20
#: a second are ~0.3 % of a core idle (measured: 1.3 % at a 10 ms period).
DEFAULT_LOOP_LAG_INTERVAL_SECONDS: Final = 0.05
#: gRPC metadata naming who makes a call, for calls whose request has no `actor` field.
ACTOR_METADATA: Final = "x-graylane-actor"
