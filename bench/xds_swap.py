"""`--xds DIR` for the benches: run another revision's `xds/` package against this tree.

`git archive <commit> xds | tar -x -C /tmp/old` then `--xds /tmp/old/xds`: before / after
figures from one script. Must run before anything imports `graylane.xds`; imports nothing
of it itself.
"""

from __future__ import annotations

import pathlib
import sys
import types


def use_xds(directory: str) -> None:
    """Make `graylane.xds` the package in `directory`."""
    import graylane

    module = types.ModuleType("graylane.xds")
    module.__path__ = [str(pathlib.Path(directory).resolve())]
    sys.modules["graylane.xds"] = module
    graylane.xds = module  # type: ignore[attr-defined]
