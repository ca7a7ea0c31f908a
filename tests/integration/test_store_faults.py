"""The store side of faults: etcd errors, lost leases, large history, deletes racing writes.

A control plane must never exit on an error from etcd: it degrades, says so in health, and
recovers by itself. Real etcd only (a member cluster on loopback for quorum loss), real
`graylane serve` processes where the process surviving is the point.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from graylane.controlplane.api.client import ReleaseClient
from graylane.controlplane.app import ControlPlane
from graylane.controlplane.domain import model
from graylane.controlplane.domain.machine import Cause
from graylane.controlplane.domain.releases import Releases, StatusUpdate
from graylane.controlplane.errors import LeaseLost, NotFound, Unavailable
from graylane.controlplane.local.etcd import EtcdCluster, EtcdProcess
from graylane.controlplane.local.ports import free_port
from graylane.controlplane.reconcile.replicas import ReplicaRegistry
from graylane.controlplane.store import EtcdStore, ReplicaProgress, Snapshot, connect
from graylane.xds.tracker import ProxyTracker

from tests.integration.conftest import checkout_canary, faulty_store, stop_group

BIN = pathlib.Path(sys.executable).parent


async def _registered(store: EtcdStore) -> None:
    await store.put_service(model.Service(name="checkout", stable_version="v1"))
    for v in ("v1", "v2"):
        await store.put_version(model.Version(service="checkout", name=v))


def _event(sequence: int, reason: str = "") -> model.Event:
    return model.Event(
        release="rel",
        sequence=sequence,
        at=datetime.now(UTC),
        action="note",
        actor="ci",
        reason=reason,
        from_phase=model.Phase.PENDING,
        to_phase=model.Phase.PENDING,
        from_batch=-1,
        to_batch=-1,
        weight=0,
    )


async def _release(store: EtcdStore, name: str = "rel") -> model.Release:
    await _registered(store)
    return await Releases(store).create(name, checkout_canary((10, 100)), Cause(actor="ci"))


async def _lease_of(store: EtcdStore, key: bytes) -> int:
    kv = await store._get(key)  # the test needs the lease etcd holds the key under
    assert kv is not None, key
    return int(kv.lease)


# ----------------------------------------------------------------------------- leases


async def test_a_write_on_an_expired_lease_is_lease_lost(store: EtcdStore) -> None:
    lease = await store.grant_lease(5)
    await store.revoke_lease(lease)
    with pytest.raises(LeaseLost):
        await store.put_replica_proxies("replica-x", {}, lease)
    assert isinstance(LeaseLost("x"), Unavailable)  # callers that hold no lease see UNAVAILABLE
    await store.revoke_lease(lease)  # revoking it again is no error


async def test_replica_registry_registers_again_after_its_lease_is_lost(store: EtcdStore) -> None:
    # A long refresh period: the next write meets the revoked lease before any keep-alive
    # would notice it (what a stalled event loop does).
    registry = ReplicaRegistry(store, ProxyTracker(), identity="replica-a", ttl_seconds=5, refresh_seconds=30.0)
    key = store._key("replicas", "replica-a")
    task = asyncio.create_task(registry.run())
    try:
        async with asyncio.timeout(10):
            while await store._get(key) is None:
                await asyncio.sleep(0.05)
        first = await _lease_of(store, key)
        await store.revoke_lease(first)
        registry.set_progress({"rel": ReplicaProgress(lane="fp", proxies=1, converged=1)})
        async with asyncio.timeout(10):
            while (kv := await store._get(key)) is None or int(kv.lease) == first:
                assert not task.done(), task
                await asyncio.sleep(0.05)
        assert await store._get(store._key("progress", "replica-a")) is not None
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ----------------------------------------------------------------------- large history


async def test_more_than_4_mb_of_history_leaves_the_store_readable(
    store: EtcdStore, etcd_endpoint: str, tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    release = await _release(store)
    big = "r" * 600_000  # etcd takes one value up to 1.5 MiB; 8 of these are 4.8 MB
    sequence = 0  # the create event's
    for _ in range(8):
        sequence += 1
        release = await store.update_release(release, [_event(sequence, big)])
    # and many small ones, over several pages
    for _ in range(12):
        events = [_event(sequence + i) for i in range(1, 101)]
        sequence += 100
        release = await store.update_release(release, events)

    started = time.monotonic()
    snap = await store.snapshot()
    read_snapshot = time.monotonic() - started
    assert [r.name for r in snap.releases] == ["rel"]
    started = time.monotonic()
    history = await store.history("rel")
    read_history = time.monotonic() - started
    assert [e.sequence for e in history] == list(range(sequence + 1))
    assert sum(len(e.reason) == len(big) for e in history) == 8
    print(f"snapshot {read_snapshot * 1000:.1f} ms, history of {len(history)} events {read_history * 1000:.1f} ms")

    # A replica that starts on this store serves it.
    plane = ControlPlane(store, api_listen="127.0.0.1:0", xds_listen=None)
    async with plane.running():
        async with ReleaseClient.connect(f"127.0.0.1:{plane.api_port}", timeout=10) as client:
            assert (await client.get_release("rel")).name == "rel"
            assert len((await client.history("rel")).events) == sequence + 1

    # And `graylane serve` starts on it (it exited at every start while reads failed).
    proc, server, _ = _serve(tmp_path, etcd_endpoint, store.prefix)
    processes.append(proc)
    await _until("serve answers", lambda: _graylane(server, "get", "rel").returncode == 0, within=30)
    out = await asyncio.to_thread(_graylane, server, "history", "rel", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["events"]) == sequence + 1
    assert proc.poll() is None


# ------------------------------------------------------------------ deletes racing writes


class _DeletedAfterRead(EtcdStore):
    """A real store where DeleteRelease lands right after each read of a release (the race),
    and after the next snapshot once `delete_after_snapshot` is set."""

    delete_after_snapshot = ""

    async def get_release(self, name: str) -> model.Release:
        current = await super().get_release(name)
        await self._delete(name)
        return current

    async def snapshot(self, *, revision: int = 0) -> Snapshot:
        snap = await super().snapshot(revision=revision)
        name, self.delete_after_snapshot = self.delete_after_snapshot, ""
        if name:
            await self._delete(name)
        return snap

    async def _delete(self, name: str) -> None:
        try:
            await self.delete_release(name)
        except NotFound:
            pass


@pytest.fixture
async def racing(etcd_endpoint: str) -> AsyncIterator[_DeletedAfterRead]:
    async with faulty_store(etcd_endpoint, _DeletedAfterRead) as store:
        yield store


async def test_delete_racing_a_status_write_ends_cleanly(racing: _DeletedAfterRead) -> None:
    releases = Releases(racing)
    await _release(racing)

    def change(current: model.Release) -> StatusUpdate:
        return StatusUpdate(status=replace(current.status, reason="converging"))

    assert await releases.update_status("rel", change) is None

    created = await _release(racing)
    with pytest.raises(NotFound):  # an API caller's note: NOT_FOUND, never an unhandled error
        await releases.note("rel", "note", Cause(actor="ci"), expected_revision=created.revision)

    # ApplyRelease whose release is deleted between its read and its write creates it anew.
    await _release(racing)
    racing.delete_after_snapshot = "rel"
    spec = replace(checkout_canary((10, 100)), batches=(model.Batch(weight=20, pause=None),))
    applied = await releases.apply("rel", spec, Cause(actor="ci"))
    assert applied.spec == spec and applied.status.phase is model.Phase.PENDING


# ------------------------------------------------------------------ processes: graylane serve


def _serve(
    tmp: pathlib.Path, endpoints: str, prefix: str, *, leader_ttl: int = 5
) -> tuple[subprocess.Popen[bytes], str, int]:
    api_port, http_port = free_port(), free_port()
    log = (tmp / f"serve-{api_port}.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "graylane"),
            "serve",
            "--etcd",
            endpoints,
            "--etcd-prefix",
            prefix,
            "--leader-ttl",
            str(leader_ttl),
            "--listen",
            f"127.0.0.1:{api_port}",
            "--xds-listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc, f"127.0.0.1:{api_port}", http_port


def _health(http_port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return str(resp.read().decode())


def _graylane(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "graylane"), "--server", server, *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_group(proc)


async def _until(what: str, check: object, *, within: float) -> float:
    """Poll `check()` (sync or async) until true; the seconds it took."""
    started = time.monotonic()
    deadline = started + within
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.1)


async def test_serve_survives_a_stall_longer_than_its_leases(
    tmp_path: pathlib.Path, etcd_endpoint: str, store: EtcdStore, processes: list[subprocess.Popen[bytes]]
) -> None:
    proc, server, http_port = _serve(tmp_path, etcd_endpoint, store.prefix, leader_ttl=2)
    processes.append(proc)
    await _until("serve answers", lambda: _graylane(server, "get").returncode == 0, within=30)
    await _until("a leader", store.leader, within=10)
    identity = await store.leader()
    assert identity
    replica_key = store._key("replicas", identity)
    await _until("registered", lambda: store._get(replica_key), within=10)

    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        # Both leases (TTL 2 s) expire while the process is stopped.
        await _until("leader key gone", lambda: _none(store.leader()), within=15)
        await _until("replica key gone", lambda: _none(store._get(replica_key)), within=15)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    took = await _until("registered again", lambda: store._get(replica_key), within=15)
    await _until("leading again", lambda: _equals(store.leader(), identity), within=15)
    print(f"re-registered {took:.1f} s after SIGCONT")
    assert proc.poll() is None
    assert _health(http_port)[0] == 200
    assert _graylane(server, "get").returncode == 0


async def _none(value: object) -> bool:
    return (await value) is None  # type: ignore[misc]


async def _equals(value: object, expected: object) -> bool:
    return (await value) == expected  # type: ignore[misc]


@pytest.mark.chaos
async def test_quorum_loss_degrades_and_recovers(
    tmp_path: pathlib.Path, processes: list[subprocess.Popen[bytes]], repo_root: pathlib.Path
) -> None:
    async with EtcdCluster(data_dir=tmp_path / "etcd") as cluster:
        prefix = "/graylane/v1/"
        servers = [_serve(tmp_path, cluster.endpoints, prefix, leader_ttl=3) for _ in range(2)]
        processes.extend(proc for proc, _, _ in servers)
        for _proc, server, _ in servers:
            await _until("serve answers", lambda server=server: _graylane(server, "get").returncode == 0, within=30)
        first = servers[0][1]
        store = await connect(cluster.endpoints, prefix=prefix)
        try:
            await _registered(store)
            await Releases(store).create("rel", checkout_canary((10, 100)), Cause(actor="ci"))
            assert _graylane(first, "next", "rel").returncode == 0
            before = _graylane(first, "history", "rel", "-o", "json").stdout

            # One member down: the API still works.
            cluster.members[0].kill()
            assert _graylane(first, "get", "rel").returncode == 0

            # Two down: no quorum for 20 s.
            cluster.members[1].kill()
            lost = time.monotonic()
            for _, _, http_port in servers:
                await _until("health says not serving", lambda p=http_port: _health(p)[0] == 503, within=10)
            status, body = _health(servers[0][2])
            assert "etcd" in body, body
            out = _graylane(first, "get", "rel")
            assert out.returncode == 1
            assert "etcd" in out.stderr and "is `graylane serve` running" not in out.stderr, out.stderr
            while time.monotonic() - lost < 20:
                assert all(proc.poll() is None for proc, _, _ in servers)
                await asyncio.sleep(0.5)
            assert all(proc.poll() is None for proc, _, _ in servers)

            # Back: both members restart on their data.
            await asyncio.gather(cluster.members[0].start(), cluster.members[1].start())
            back = time.monotonic()
            answered = await _until("API answers", lambda: _graylane(first, "get", "rel").returncode == 0, within=15)
            for _, _, http_port in servers:
                await _until("health ok", lambda p=http_port: _health(p)[0] == 200, within=15)
            healthy = time.monotonic() - back
            await _until("a leader", store.leader, within=15)
            print(f"after quorum came back: API answered in {answered:.1f} s, every replica healthy in {healthy:.1f} s")
            assert answered < 5
            got = _graylane(first, "get", "rel", "-o", "json")
            assert got.returncode == 0 and '"weight": 10' in got.stdout, got.stdout
            assert _graylane(first, "history", "rel", "-o", "json").stdout == before
            assert all(proc.poll() is None for proc, _, _ in servers)
        finally:
            await store.close()


async def test_health_follows_the_embedded_etcd(tmp_path: pathlib.Path, etcd_endpoint: str) -> None:
    # etcd_endpoint only makes sure the etcd binary exists. An etcd of its own, killed as a
    # full disk kills it; then started again on its data.
    etcd = EtcdProcess(data_dir=tmp_path / "etcd")
    await etcd.start()
    try:
        store = await connect(etcd.endpoint)
        plane = ControlPlane(
            store, api_listen="127.0.0.1:0", xds_listen=None, http_listen="127.0.0.1:0", embedded_etcd=etcd
        )
        async with plane.running():
            port = plane.http_port
            await _until("healthy", lambda: _is_200(port), within=10)
            etcd.kill()
            await _until("503 naming the exited etcd", lambda: _says_exited(port), within=10)
            metrics = await asyncio.to_thread(_get_text, f"http://127.0.0.1:{port}/metrics")
            assert "graylane_store_up 0" in metrics, metrics
            await etcd.start()
            took = await _until("healthy again", lambda: _is_200(port), within=10)
            print(f"healthy {took:.1f} s after etcd answered again")
        await store.close()
    finally:
        await etcd.stop()


async def _says_exited(port: int) -> bool:
    status, body = await asyncio.to_thread(_health, port)
    return status == 503 and "embedded etcd exited" in body


async def _is_200(port: int) -> bool:
    return (await asyncio.to_thread(_health, port))[0] == 200


# ----------------------------------------------------------------------- unreadable records


async def test_a_record_this_version_cannot_read_is_skipped_not_fatal(store: EtcdStore) -> None:
    """A service named `evil\\n` (accepted by an older Graylane, or written by hand) no longer
    passes the name rule; reading it must skip that one record, not fail every snapshot."""
    from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc
    from google.protobuf import json_format
    from graylane.v1 import release_pb2 as pb

    await store.put_service(model.Service(name="good", stable_version="v1"))
    bad = json_format.MessageToJson(pb.Service(name="evil\n", stable_version="v1")).encode()
    kv = rpc_pb2_grpc.KVStub(store._channel)
    await kv.Put(rpc_pb2.PutRequest(key=(store.prefix + "services/evil\n").encode(), value=bad))
    snap = await store.snapshot()
    assert [s.name for s in snap.services] == ["good"]
    # and a follower fed by the watch skips it the same way
    state = await store.live_state()
    await kv.Put(rpc_pb2.PutRequest(key=(store.prefix + "services/evil2\n").encode(), value=bad))
    async for events in store.watch(start_revision=state.revision + 1):
        state.apply(events)
        break
    assert [s.name for s in state.snapshot().services] == ["good"]


class _Counting(EtcdStore):
    """A real store that counts release reads and writes."""

    reads = 0
    writes = 0

    async def get_release(self, name: str) -> model.Release:
        self.reads += 1
        return await super().get_release(name)

    async def update_release(self, release: model.Release, events: object, **options: object) -> model.Release:
        self.writes += 1
        return await super().update_release(release, events, **options)  # type: ignore[arg-type]


async def test_status_writes_ahead_of_the_follower_start_from_the_last_one_written(store: EtcdStore) -> None:
    """Convergence writes status again before the store follower has applied its previous
    write: it starts from what it wrote (one transaction each), not from the follower's
    older value (a refused transaction and a read each time); a value written by someone
    else meanwhile is still caught by the guard."""
    counting = _Counting(store._channel, prefix=store.prefix)
    await _release(counting)
    releases = Releases(counting)
    releases.follow(await counting.live_state())  # a follower that stays behind from here on
    counting.reads = counting.writes = 0

    def reason(text: str) -> Callable[[model.Release], StatusUpdate]:
        return lambda current: StatusUpdate(status=replace(current.status, reason=text))

    for text in ("one", "two", "three"):
        written = await releases.update_status("rel", reason(text))
        assert written is not None and written.status.reason == text
    assert (counting.writes, counting.reads) == (3, 0)
    other = await counting.get_release("rel")
    await counting.update_release(replace(other, status=replace(other.status, reason="elsewhere")), [])
    counting.reads = counting.writes = 0
    written = await releases.update_status("rel", reason("four"))
    assert written is not None and written.status.reason == "four"
    assert (counting.writes, counting.reads) == (2, 1)  # refused once, read, written
    releases.follow(await counting.live_state())  # caught up: its value is the newest again
    written = await releases.update_status("rel", reason("five"))
    assert written is not None and written.status.reason == "five"
