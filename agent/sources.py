"""Where an agent learns its cluster's endpoints: the `EndpointSource` role and a file source.

Owns: `EndpointSource` (an async stream of complete, validated endpoint sets; any other
source, e.g. one reading Kubernetes, would implement the same protocol) and `FileEndpointSource`, which reads a YAML
file, validates it with the control plane's own rules (so an endpoint the control plane
would refuse is caught here first), and follows the file for changes. A file that does not
parse or does not validate is logged and skipped: the last good set stays in force.

File format (the `EndpointSnapshot` message as YAML)::

    versions:
      - service: checkout
        version: v2
        endpoints:
          - {address: 127.0.0.1, port: 18082}

Concurrency: one asyncio loop; the file is polled (size, mtime and content hash) every
`poll_seconds`, so editors that replace the file are followed too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import yaml
from google.protobuf import json_format
from graylane.controlplane.domain import model
from graylane.controlplane.domain.manifest import ManifestLoader
from graylane.controlplane.errors import InvalidArgument
from graylane.v1 import agent_pb2 as apb

log = logging.getLogger(__name__)


class EndpointSource(Protocol):
    def watch(self) -> AsyncIterator[apb.EndpointSnapshot]:
        """Every new complete endpoint set, the current one first."""
        ...


class EndpointFileError(ValueError):
    """The endpoints file cannot be used; the message says where and why."""


def parse_endpoints(text: str, *, source: str = "endpoints file") -> apb.EndpointSnapshot:
    """Parse and validate an endpoints file; EndpointFileError names the problem."""
    try:
        data = yaml.load(text, Loader=ManifestLoader)  # no aliases: the manifest rules
    except yaml.YAMLError as exc:
        raise EndpointFileError(f"{source}: not YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EndpointFileError(f"{source}: expected a mapping with `versions`, got {type(data).__name__}")
    message = apb.EndpointSnapshot()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise EndpointFileError(f"{source}: {exc}") from exc
    try:
        model.cluster_endpoints_from_proto("local", message)
    except InvalidArgument as exc:
        raise EndpointFileError(f"{source}: {exc}") from exc
    return message


class FileEndpointSource:
    def __init__(self, path: Path, *, poll_seconds: float = 0.5) -> None:
        self.path = path
        self.poll_seconds = poll_seconds
        self.last_error = ""  # the last problem with the file, "" while it is good

    async def watch(self) -> AsyncIterator[apb.EndpointSnapshot]:
        seen = b""
        while True:
            try:
                data = await asyncio.to_thread(self.path.read_bytes)
            except OSError as exc:
                data = b""
                self._problem(f"{self.path}: cannot read: {exc}")
            digest = hashlib.sha256(data).digest() if data else b""
            if data and digest != seen:
                seen = digest
                try:
                    snapshot = parse_endpoints(data.decode(errors="replace"), source=str(self.path))
                except EndpointFileError as exc:
                    self._problem(str(exc))
                else:
                    self.last_error = ""
                    log.info("endpoints from %s: %d versions", self.path, len(snapshot.versions))
                    yield snapshot
            await asyncio.sleep(self.poll_seconds)

    def _problem(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s (keeping the last good endpoints)", message)
        self.last_error = message
