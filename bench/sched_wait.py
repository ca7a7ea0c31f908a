"""How long each thread of every `graylane serve` process waits for a core (bench aid).

Samples /proc/<pid>/task/<tid>/schedstat (CPU time, time runnable on a run queue) every 0.2 s
for the given number of seconds, then prints per thread its CPU, its total run-queue wait and
the longest wait within one 0.2 s interval. Run it beside `bench/run.py --scale --replicas N`
to tell a loop held by its own work (CPU) from one waiting for a core (run-queue wait):

    .venv/bin/python -P bench/sched_wait.py 75 & .venv/bin/python -P bench/run.py --scale --replicas 2 --api-replica
"""

from __future__ import annotations

import collections
import os
import sys
import time

INTERVAL = 0.2


def serve_processes() -> dict[str, str]:
    """pid -> the tail of its command line, for every `graylane serve` process."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(b"graylane" in a for a in argv):
            found[pid] = b" ".join(argv)[-60:].decode(errors="replace")
    return found


def main(seconds: float) -> None:
    end = time.monotonic() + seconds
    last: dict[tuple[str, str], tuple[int, int]] = {}
    longest: collections.Counter[tuple[str, str]] = collections.Counter()
    waited: collections.Counter[tuple[str, str]] = collections.Counter()
    ran: collections.Counter[tuple[str, str]] = collections.Counter()
    names: dict[tuple[str, str], str] = {}
    commands: dict[str, str] = {}
    while time.monotonic() < end:
        for pid, command in serve_processes().items():
            commands[pid] = command
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    run, wait, _ = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
                    names[(pid, tid)] = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                except OSError:
                    continue
                key, now = (pid, tid), (int(run), int(wait))
                if key in last:
                    ran[key] += now[0] - last[key][0]
                    waited[key] += now[1] - last[key][1]
                    longest[key] = max(longest[key], now[1] - last[key][1])
                last[key] = now
        time.sleep(INTERVAL)
    for pid, command in commands.items():
        print(pid, command)
        for key in sorted(k for k in names if k[0] == pid):
            if ran[key] > 50e6 or longest[key] > 20e6:  # threads that did or waited for something
                print(
                    f"   tid {key[1]} {names[key]:16s} cpu {ran[key] / 1e6:8.0f} ms  run-queue wait "
                    f"{waited[key] / 1e6:8.0f} ms, longest per {INTERVAL} s {longest[key] / 1e6:6.1f} ms"
                )


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
