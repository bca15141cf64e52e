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

GOMP_SPINCOUNT=10000 in attention replicas whose experts are on shards: after a parallel region,
torch's OpenMP workers spin before they sleep, 300,000 rounds by default (milliseconds). A
replica with remote experts runs its LM head and attention projections on heavy_op_threads
while its shards wait, then the shards compute while the replica waits; a worker still spinning
then takes a core from a shard. Measured on the 2-core CI machine, small-mixtral, 2 one-thread
shards, the replica decoding on 1 thread with heavy_op_threads 2, alternating rounds: at 8 / 32
sequences 0.54 / 0.56x the single-process engine's tokens/s with the default spin, 0.88 / 0.77x
with this (0.83 / 0.69x on 1 thread throughout). Set it yourself to choose another value.
"""

from __future__ import annotations

import os

SERVE_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}


# The environment of attention replicas that dispatch to expert shards (their processes read it at start).
REMOTE_EXPERTS_REPLICA_ENV = {"GOMP_SPINCOUNT": "10000"}


def remote_experts_replica_env() -> dict[str, str]:
    """REMOTE_EXPERTS_REPLICA_ENV, where this process's environment does not choose otherwise."""
    return {name: os.environ.get(name, value) for name, value in REMOTE_EXPERTS_REPLICA_ENV.items()}


def apply_serve_env() -> None:
    """Sets SERVE_ENV where the environment does not already choose otherwise."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
