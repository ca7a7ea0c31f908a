"""The local process harness of demos, tests and benchmarks: upstream servers, bounded
load, and a throw-away control plane on loopback."""
