"""The `graylane` command line: one entry point, `main`, for operators and pipelines.

One module per group of commands — `serve`, `agent`, `access` (token, certs, bootstrap),
`releases` (apply, get, status, history, traffic, metrics, the actions, delete, tombstones),
`inventory` (services, versions, clusters), `demo` — over two shared ones: `base` (exit codes,
connection flags, argument types, and the translation of RPC failures into messages and exit
codes, in one place) and `output` (`-o table|json|yaml`). `commands` holds the table of
commands and `main`.

The CLI talks to a control plane only through `ReleaseClient` (the public gRPC API), reads
manifests through `graylane.controlplane.domain.manifest`, and starts a server or an agent only
inside the command's handler, so a client command never loads server code.
Must not import: etcd, graylane.xds.

Exit codes: 0 success; 1 the server refused or could not be reached; 2 bad usage or a bad
manifest (nothing was sent); 3 `status --watch` saw the release end ROLLED_BACK or FAILED;
130 interrupted.
"""

from graylane.controlplane.cli.commands import main

__all__ = ["main"]
