"""How much of an etcd transaction is this disk: etcd's data dir on the disk and on /dev/shm.

For each folder given (default: the temporary folder and /dev/shm, twice each, alternated):
an etcd started as the benches start it (`EtcdProcess`), `PUTS` transactions of one 2 kB
put from a blocking client, their latency (p50 / p90 / p99), and etcd's own WAL fsync and
backend commit means over them (its /metrics); then the folder's raw fdatasync of 4 KiB.

    .venv/bin/python -P bench/etcd_disk.py [FOLDER ...]
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import tempfile
import time

import grpc
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc
from graylane.controlplane.local.etcd import EtcdProcess

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from store_bench import etcd_disk, fdatasync_ms  # noqa: E402

PUTS = 300


async def one(folder: pathlib.Path) -> str:
    with tempfile.TemporaryDirectory(dir=folder, prefix="graylane-etcd-disk-") as tmp:
        async with EtcdProcess(data_dir=pathlib.Path(tmp) / "etcd") as etcd:
            channel = grpc.insecure_channel(etcd.endpoint)
            kv = rpc_pb2_grpc.KVStub(channel)
            put = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"warm", value=b"v" * 2000))
            for _ in range(20):
                kv.Txn(rpc_pb2.TxnRequest(success=[put]), timeout=5)
            before = etcd_disk(etcd.endpoint)
            took = []
            for i in range(PUTS):
                op = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"k%d" % (i % 10), value=b"v" * 2000))
                t0 = time.perf_counter()
                kv.Txn(rpc_pb2.TxnRequest(success=[op]), timeout=5)
                took.append((time.perf_counter() - t0) * 1000)
            after = etcd_disk(etcd.endpoint)
            channel.close()
        raw = fdatasync_ms(pathlib.Path(tmp))
    took.sort()
    wal = (after[0] - before[0]) / max(after[1] - before[1], 1) * 1000
    commit = (after[2] - before[2]) / max(after[3] - before[3], 1) * 1000
    return (
        f"{folder}: txn p50 {took[len(took) // 2]:.2f} / p90 {took[int(len(took) * 0.9)]:.2f} / "
        f"p99 {took[int(len(took) * 0.99)]:.2f} ms; etcd WAL fsync mean {wal:.3f} ms "
        f"({after[1] - before[1]:.0f}), backend commit mean {commit:.3f} ms ({after[3] - before[3]:.0f}); "
        f"fdatasync 4 KiB p50 {raw:.3f} ms"
    )


async def main(folders: list[pathlib.Path]) -> None:
    for folder in folders:
        print(await one(folder), flush=True)


if __name__ == "__main__":
    given = [pathlib.Path(a) for a in sys.argv[1:]]
    default = [pathlib.Path(tempfile.gettempdir()), pathlib.Path("/dev/shm")] * 2
    asyncio.run(main(given or default))
