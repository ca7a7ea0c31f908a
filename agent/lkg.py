"""The last-known-good view on disk, and the agent's stable identity.

Owns: writing every view the agent applied to `<state dir>/view.json` (atomically: a
temporary file renamed over the old one, so a crash leaves the old or the new file, never
half of one), reading it back at start, and the `agent_id` that lets a restarted agent
take its cluster registration back.

The file is tied to its cluster: it holds the cluster's name beside the view (and the
control-plane address it came from, for the operator), and a file written for another
cluster, or one that names none, is never served. Nothing on disk can stop the agent from
starting: a file that cannot be read or understood (not UTF-8, not JSON, a directory, no
permission) is reported (a WARNING naming the file and the reason, and `load_note` /
`id_note` for health and metrics) and the agent starts without it. Saving failures are
counted (`save_failures`, `last_save_error`) and the time of the last good save kept.

Must not import: etcd.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from google.protobuf import json_format
from graylane.v1 import agent_pb2 as apb

log = logging.getLogger(__name__)

FORMAT = 1  # the layout of view.json; a file of another format is not served
_AGENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class StateDir:
    """`<state dir>` of one agent of `cluster`. One asyncio loop; writes are synchronous
    (a few KB, fsynced), which is what a crash-safe rename needs."""

    def __init__(self, path: Path, *, cluster: str = "", control_plane: str = "") -> None:
        self.path = path
        self.cluster = cluster
        self.control_plane = control_plane
        self.load_note = ""  # why the last-known-good view was not served ("" when it was, or none existed)
        self.id_note = ""  # why a fresh agent id replaced the stored one ("" when none did)
        self.save_failures = 0
        self.last_save_error = ""  # "" once a save succeeded again
        self.last_saved_at: float | None = None  # wall-clock time of the last good save
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # The agent still serves; every save will fail and say so.
            log.warning("cannot create the state directory %s (%s): no last-known-good view", path, _reason(exc))

    @property
    def view_file(self) -> Path:
        return self.path / "view.json"

    @property
    def id_file(self) -> Path:
        return self.path / "agent_id"

    def agent_id(self) -> str:
        """This agent's stable id, created on first use (and again if the file is unreadable)."""
        file = self.id_file
        problem = ""
        try:
            found = file.read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            found = ""
        except (OSError, UnicodeDecodeError) as exc:
            problem = _reason(exc)
            found = ""
        else:
            if found and not _AGENT_ID.fullmatch(found):
                problem = "not an agent id (expected 1-128 letters, digits, '.', '_' or '-')"
            elif found:
                return found
        fresh = uuid.uuid4().hex
        try:
            self._write(file, fresh)
        except OSError as exc:
            # Kept in memory only: the next start gets another id (and says so again).
            problem = (
                f"{problem}; cannot be replaced ({_reason(exc)})" if problem else f"cannot be written ({_reason(exc)})"
            )
        if problem:
            self.id_note = f"{file}: {problem}; using a fresh agent id {fresh}"
            log.warning(
                "ignoring the agent id at %s: %s; this agent registers under a fresh id %s "
                "(the control plane may see its cluster taken until the old registration expires)",
                file,
                problem,
                fresh,
            )
        return fresh

    # ---------------------------------------------------------------- the view

    def save_view(self, view: apb.ClusterView) -> None:
        """Write `view` for this cluster; raises OSError (see `keep` for the counted form)."""
        document = {
            "format": FORMAT,
            "cluster": self.cluster,
            "control_plane": self.control_plane,
            "saved_at": time.time(),
            "view": json.loads(json_format.MessageToJson(view, indent=None, sort_keys=True)),
        }
        self._write(self.view_file, json.dumps(document, sort_keys=True))

    def keep(self, view: apb.ClusterView) -> bool:
        """`save_view`, counting a failure instead of raising it; whether the view was kept."""
        try:
            self.save_view(view)
        except OSError as exc:
            self.save_failures += 1
            self.last_save_error = f"{self.view_file}: {_reason(exc)}"
            # The view is served all the same; only a restart would fall back further.
            log.error("cannot keep view %s as the last-known-good one: %s", view.version, self.last_save_error)
            return False
        self.last_save_error = ""
        self.last_saved_at = time.time()
        return True

    def load_view(self) -> apb.ClusterView | None:
        """The view last saved for this cluster, or None (with `load_note` saying why, if a
        file was there)."""
        file = self.view_file
        self.load_note = ""
        try:
            text = file.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            return self._ignore(_reason(exc))
        try:
            document = json.loads(text)
        except ValueError as exc:
            return self._ignore(f"not JSON ({exc})")
        if not isinstance(document, dict) or "cluster" not in document or "view" not in document:
            return self._ignore("no cluster named in it (an older agent's file, or not a last-known-good file)")
        if document.get("format") != FORMAT:
            return self._ignore(f"format {document.get('format')!r}, expected {FORMAT}")
        cluster = document.get("cluster")
        if cluster != self.cluster:
            return self._ignore(f"written for cluster {cluster!r}, this agent serves cluster {self.cluster!r}")
        try:
            view = json_format.ParseDict(document["view"], apb.ClusterView())
        except (json_format.ParseError, TypeError, ValueError) as exc:
            return self._ignore(f"not a view ({exc})")
        if not view.version:
            return self._ignore("a view without a version")
        return view

    def _ignore(self, reason: str) -> apb.ClusterView | None:
        self.load_note = f"{self.view_file}: {reason}"
        log.warning(
            "ignoring the last-known-good view at %s: %s; starting with none (Envoys get a view "
            "once the control plane answers)",
            self.view_file,
            reason,
        )
        return None

    @staticmethod
    def _write(file: Path, text: str) -> None:
        tmp = file.with_suffix(file.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, file)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    if isinstance(exc, IsADirectoryError):
        return "a directory, not a file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
