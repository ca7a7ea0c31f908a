from __future__ import annotations

import pytest
from graylane.controlplane.errors import UnsupportedEtcd
from graylane.controlplane.store._client import _range_end, refuse_version


@pytest.mark.parametrize("version", ["3.5.0", "3.5.1", "3.5.2"])
def test_refuses_the_data_inconsistency_releases(version: str) -> None:
    with pytest.raises(UnsupportedEtcd, match="3.5.3"):
        refuse_version(version)


@pytest.mark.parametrize("version", ["3.4.23", "3.5.3", "3.5.17", "3.6.0"])
def test_accepts_other_releases(version: str) -> None:
    refuse_version(version)


def test_prefix_range_end() -> None:
    assert _range_end(b"/graylane/v1/") == b"/graylane/v10"
    assert _range_end(b"a\xff") == b"b"
