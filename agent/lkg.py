"""The last-known-good view on disk, and the agent's stable identity.

Owns: writing every view the agent applied to `<state dir>/view.json` (atomically: a
temporary file renamed over the old one, so a crash leaves the old or the new file, never
half of one), reading it back at start, and the `agent_id` that lets a restarted agent
take its cluster registration back.

Must not import: etcd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path

from google.protobuf import json_format
from graylane.v1 import agent_pb2 as apb

log = logging.getLogger(__name__)


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    @property
    def view_file(self) -> Path:
        return self.path / "view.json"

    def agent_id(self) -> str:
        """This agent's stable id, created on first use."""
        file = self.path / "agent_id"
        with contextlib.suppress(FileNotFoundError):
            found = file.read_text().strip()
            if found:
                return found
        fresh = uuid.uuid4().hex
        self._write(file, fresh)
        return fresh

    def save_view(self, view: apb.ClusterView) -> None:
        self._write(self.view_file, json_format.MessageToJson(view, indent=None, sort_keys=True))

    def load_view(self) -> apb.ClusterView | None:
        try:
            text = self.view_file.read_text()
        except FileNotFoundError:
            return None
        try:
            return json_format.Parse(text, apb.ClusterView())
        except json_format.ParseError:
            log.exception("ignoring an unreadable last-known-good view at %s", self.view_file)
            return None

    @staticmethod
    def _write(file: Path, text: str) -> None:
        tmp = file.with_suffix(file.suffix + ".tmp")
        with open(tmp, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, file)
