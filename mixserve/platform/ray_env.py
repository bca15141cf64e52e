"""Ray Serve settings mixserve runs with. They are read by Ray's processes when they start, so
they go into the environment before a local cluster starts (`mixserve serve` without
--address, the tests) and onto `ray start` in the cluster recipes (infra/).

RAY_SERVE_PROXY_USE_GRPC=1: the HTTP proxy talks to replicas over gRPC, passing requests and
streamed chunks by value instead of through Ray actor calls and the object store. Measured
with benchmarks/serving.py's load on the 2-core CI machine (tiny-mixtral, front door in the
replicas): 16 streams 488 -> 615 output tok/s, 4 streams 239 -> 310, time to first token p50
272 -> 234 ms.

RAY_SERVE_ENABLE_DIRECT_INGRESS=1: besides the proxy on http.port (head node), every ingress
replica also serves HTTP itself on a port of its own (Ray's range, 30000 to 31000, on
http.host; `mixserve serve` and `mixserve status` print them), skipping the proxy hop and its
process. Measured on the same server, same run, alternating rounds (16 streams x 2 completions x
6 rounds, tiny-mixtral, 2-core CI machine): through the proxy 948 output tok/s, time to first
token p50 165 / p99 235 ms; straight to the replica 1197 tok/s, 80 / 119 ms. Point a load
balancer (or a single-node client) at the replica ports; the proxy port keeps working for
everything, gRPC included. RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5: a replica that
scales down keeps answering on its port for 5 s (Ray's default, 30 s, suits load balancers with
slow health checks; set it higher where yours are).
"""

from __future__ import annotations

import os

SERVE_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}


def apply_serve_env() -> None:
    """Sets SERVE_ENV where the environment does not already choose otherwise."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
