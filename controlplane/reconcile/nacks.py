"""The NACK policy: what a proxy's rejection of a configuration does to releases.

Owns: turning each NACK (of this replica's own streams, and those agents report from their
clusters) into a pause of the releases whose lanes the rejected configuration changed
against the proxy's accepted one, held at the value the proxy accepted; and remembering
which NACKs were handled, so each pauses once. What a rejection blames is
`views.blame_nack`'s; which views a stream's rejection names is `LocalServing.rejection`'s.

Concurrency: called from the convergence pass on the replica's loop; a pause that failed
to write raises out of `handle` with the NACK not marked handled, so the next pass tries
it again (`Releases.hold_for_nack` is idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime

from graylane.controlplane.api.agent_service import AgentHub
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Cause
from graylane.controlplane.domain.releases import Releases
from graylane.controlplane.reconcile import views
from graylane.controlplane.store import Snapshot
from graylane.xds import view as xv
from graylane.xds.local import LocalServing
from graylane.xds.tracker import ProxyStatus

log = logging.getLogger(__name__)


@dataclass(eq=False)
class NackPolicy:
    releases: Releases
    serving: LocalServing[xv.RoutingView]
    _: KW_ONLY
    actor: str
    agents: AgentHub | None = None
    # (stream, nonce) of every NACK handled, for streams still open (agents: (cluster, ...)).
    _handled: set[tuple[str, str]] = field(init=False, default_factory=set)

    def _prune(self, own: Container[str]) -> None:
        """Keep the handled-NACK keys of live streams (`own`) and reporting agents only."""
        agents = {f"agent:{name}" for name in self.agents.sessions} if self.agents is not None else set()
        self._handled = {k for k in self._handled if k[0] in own or k[0] in agents}

    async def handle(self, snap: Snapshot, proxies: list[ProxyStatus], *, own: Container[str]) -> None:
        """Pause the releases whose lanes a rejected configuration introduced: for this
        replica's own proxies (`proxies`: those changed since they were last looked at;
        `own`: the streams still open) and for those the agents report from their clusters.

        A NACK counts as handled once its pause is written: a write that failed (etcd
        unreachable) raises out of the pass, and the next pass looks at it again (a pause
        already written is not written twice: `Releases.hold_for_nack` is idempotent)."""
        self._prune(own)
        for proxy in proxies:
            nack = proxy.last_nack
            if nack is None or (proxy.stream, nack.nonce) in self._handled:
                continue
            record = model.Nack(
                node=proxy.node_id,
                type_url=nack.type_url,
                version=nack.version,
                message=nack.message,
                at=datetime.fromtimestamp(nack.at, UTC),
                stream=proxy.stream,
                cluster=proxy.cluster,
            )
            judged = self.serving.rejection(proxy)
            assert judged is not None  # (it holds a NACK)
            await self._hold(snap, record, rejected=judged.rejected, accepted=judged.accepted, only=judged.services)
            self._handled.add((proxy.stream, nack.nonce))
        for found in self.agents.nacks() if self.agents is not None else ():
            # An agent's proxy: named with its cluster; each NACK (by its time) handled once.
            node = f"{found.cluster}/{found.node_id}"
            key = (
                f"agent:{found.cluster}",
                f"{found.node_id}@{found.nack.type_url}@{found.nack.version}@{found.nack.at.ToNanoseconds()}",  # noqa: E501
            )
            if key in self._handled:
                continue
            record = model.Nack(
                node=node,
                type_url=found.nack.type_url,
                version=found.nack.version,
                message=found.nack.message,
                at=found.nack.at.ToDatetime(tzinfo=UTC),
                cluster=found.cluster,
            )
            await self._hold(snap, record, rejected=found.rejected, accepted=found.accepted, only=found.scope)
            self._handled.add(key)

    async def _hold(
        self,
        snap: Snapshot,
        record: model.Nack,
        *,
        rejected: xv.RoutingView | None,
        accepted: xv.RoutingView | None,
        only: frozenset[str] | None = None,
    ) -> None:
        """Pause what the rejected configuration changed against the proxy's accepted one,
        held at the value the proxy accepted, so every proxy is served that value.

        A proxy that never accepted a configuration of that type (or rejected one this
        replica did not render) blames nothing: it cannot tell which lane it objects to, so
        it is shown as lagging with Envoy's message until the stale-proxy rule drops it.
        """
        if rejected is None or accepted is None:
            log.warning(
                "%s rejected %s %s with nothing accepted before to compare: shown as lagging, no release paused: %s",
                record.node,
                record.type_url,
                record.version,
                record.message,
            )
            return
        blamed = views.blame_nack(rejected, accepted)
        if only is not None:  # lanes that enter at or have a version of those services
            touching = (
                lane.name
                for lane in rejected.lanes
                if lane.entry in only or any(service in only for service, _version in lane.versions)
            )
            blamed &= frozenset(touching)
        for release in snap.releases:
            if release.spec.lane in blamed and views.routed(release):
                lane = views.lanes_by_name(accepted).get(release.spec.lane)
                await self.releases.hold_for_nack(
                    release.name,
                    record,
                    held_batch=views.accepted_batch(release, accepted),
                    held_lane=views.held_lane_from(lane) if lane is not None else None,
                    cause=Cause(actor=self.actor),
                )
