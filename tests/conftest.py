"""Fixtures shared by every test: a real etcd for the session, a store per test.

A missing etcd binary skips the tests that need it on a developer machine and fails them
under CI=true, where `make test` has installed it.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from graylane.controlplane.local.etcd import INSTALL_HINT, EtcdProcess, find_etcd
from graylane.controlplane.store import EtcdStore, connect

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(found: str | None, hint: str) -> str:
    """A real component is required: fail under CI, skip elsewhere."""
    if found:
        return found
    if IN_CI:
        pytest.fail(hint)
    pytest.skip(hint)


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_binary(find_etcd(), INSTALL_HINT)
    proc = EtcdProcess(data_dir=tmp_path_factory.mktemp("etcd") / "data")
    asyncio.run(proc.start())
    try:
        yield proc.endpoint
    finally:
        asyncio.run(proc.stop())


@pytest.fixture
async def store(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    """A store under a key prefix of its own, so tests never see each other's data."""
    s = await connect(etcd_endpoint, prefix=f"/graylane-test/{uuid.uuid4().hex}/v1/")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent
