"""Regenerate the Python beside the protos (``make protos``).

``--check`` regenerates into a temporary folder and exits non-zero when the committed
files differ, so a test can catch stale generated code.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
API = ROOT / "graylane" / "v1"


def _generate(out: pathlib.Path) -> list[pathlib.Path]:
    include = pathlib.Path(protoc.__file__).resolve().parent / "_proto"
    protos = sorted(API.glob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "graylane" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if generated files are stale")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = _generate(pathlib.Path(tmp))
        names = {p.name for p in generated}
        committed = {p.name for p in API.glob("*_pb2*.py*")}
        if ns.check:
            stale = sorted(
                n
                for n in names
                if not (API / n).exists()
                or not filecmp.cmp(API / n, pathlib.Path(tmp) / "graylane" / "v1" / n, shallow=False)
            ) + sorted(committed - names)
            if stale:
                print("stale generated files (run `make protos`): " + ", ".join(stale))
                return 1
            return 0
        for p in generated:
            shutil.copyfile(p, API / p.name)
        for n in committed - names:
            (API / n).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
