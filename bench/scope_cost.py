"""What scoped proxies cost the snapshot cache, at 1,000 and 10,000 services.

`.venv/bin/python -P bench/scope_cost.py [--services 1000 10000] [--changes 30]`

For a view of n services and n/10 lanes (`change_cost.make_view`), the node group's render
is set in a cache and then changed `--changes` times (a lane's weight, or a new release's
version and lane, alternately; rendered incrementally). Measured (ms): `set_snapshot` of
each change in a plain `SnapshotCache`, in a `ScopedSnapshotCache` with no scoped key
(unscoped proxies' cost), and with 3 scoped keys watched (3 services; 1 service; every 10th
service), which derives each scope's configuration from the change; and what the first
proxy of each scope cost (its whole configuration filtered once). However many proxies
share a scope, it is derived once per change.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from change_cost import add_lane, bump, make_view  # noqa: E402
from graylane.xds.cache import SnapshotCache  # noqa: E402
from graylane.xds.renderer import Renderer  # noqa: E402
from graylane.xds.scope import ScopedSnapshotCache  # noqa: E402

KEY = "10000"


def measure(
    n: int, changes: int, cache: SnapshotCache, scopes: list[tuple[str, ...]]
) -> tuple[list[float], list[float]]:
    """(ms of each change's set_snapshot, ms of each scope's first watch)."""
    view = make_view(n)
    renderer = Renderer(listen_port=int(KEY))
    cache.set_snapshot(KEY, renderer.render(view))
    first = []
    for scope in scopes:
        began = time.perf_counter()
        cache.watch(f"{KEY}@{','.join(sorted(scope))}", lambda: None)
        first.append((time.perf_counter() - began) * 1000)
    costs = []
    for step in range(changes):
        view = (bump if step % 2 else add_lane)(view, step)
        rendered = renderer.render(view)
        began = time.perf_counter()
        cache.set_snapshot(KEY, rendered)
        costs.append((time.perf_counter() - began) * 1000)
    return costs, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--changes", type=int, default=30)
    args = parser.parse_args()
    for n in args.services:
        scopes = [("svc-0000", "svc-0001", "svc-0002"), ("svc-0010",), tuple(f"svc-{i:04d}" for i in range(0, n, 10))]
        cases: list[tuple[str, SnapshotCache, list[tuple[str, ...]]]] = [
            ("SnapshotCache", SnapshotCache(), []),
            ("ScopedSnapshotCache, no scoped key", ScopedSnapshotCache(), []),
            ("ScopedSnapshotCache, 3 scoped keys", ScopedSnapshotCache(), scopes),
        ]
        for label, cache, watched in cases:
            costs, first = measure(n, args.changes, cache, watched)
            line = f"{n} services, {label}: set_snapshot per change median {statistics.median(costs):.2f} ms"
            line += f", max {max(costs):.2f} ms"
            if first:
                line += "; first proxy of each scope " + ", ".join(f"{ms:.1f}" for ms in first) + " ms"
            print(line, flush=True)


if __name__ == "__main__":
    main()
