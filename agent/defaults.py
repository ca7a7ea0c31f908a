"""The agent's defaults, in one place: `AgentOptions` and the `graylane agent` flags read them.

Owns constants only, so the CLI may import it without loading the agent (gRPC servers,
the relay). Must not import: graylane.controlplane, graylane.xds.
"""

from __future__ import annotations

from typing import Final

#: The port the agent's xDS (ADS) server listens on for its cluster's Envoys.
DEFAULT_AGENT_XDS_PORT: Final = 7402
#: Where the agent keeps its last-known-good view and its id.
DEFAULT_AGENT_STATE_DIR: Final = ".graylane-agent"
#: How long the control plane may be away before the local guard may act.
DEFAULT_GUARD_AFTER_SECONDS: Final = 30.0
#: The local guard routes a lane to base when its gray versions fail this share of requests.
DEFAULT_MAX_ERROR_RATE: Final = 0.5
#: A control plane that answers nothing this long counts as gone, connection open or not.
DEFAULT_ANSWER_TIMEOUT_SECONDS: Final = 5.0
#: The longest wait between attempts to reach the control plane.
DEFAULT_RECONNECT_MAX_SECONDS: Final = 5.0
