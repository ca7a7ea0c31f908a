"""The generated Python beside the protos matches the protos (run `make protos` if not)."""

from __future__ import annotations

import pathlib
import subprocess
import sys


def test_generated_code_is_fresh() -> None:
    root = pathlib.Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-P", str(root / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
