"""Ray Serve settings mixserve runs with. They are read by Ray's processes when they start, so
they go into the environment before a local cluster starts (`mixserve serve` without
--address, the tests) and onto `ray start` in the cluster recipes (infra/).

RAY_SERVE_PROXY_USE_GRPC=1: the HTTP proxy talks to replicas over gRPC, passing requests and
streamed chunks by value instead of through Ray actor calls and the object store. Measured
with benchmarks/serving.py's load on the 2-core CI machine (tiny-mixtral, front door in the
replicas): 16 streams 488 -> 615 output tok/s, 4 streams 239 -> 310, time to first token p50
272 -> 234 ms.
"""

from __future__ import annotations

import os

SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def apply_serve_env() -> None:
    """Sets SERVE_ENV where the environment does not already choose otherwise."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
