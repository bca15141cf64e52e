"""Per-layer dispatch round trip of the transports Ray offers, on this machine.

One "layer" = the attention side sends each of 2 expert shards its [rows, D] float32 token
groups and waits for both answers of the same size (the shards echo them: this measures the
hop, not the experts). Measured for each candidate, each in its own process (a hung
teardown cannot stall the run), medians and p99 over many layers:

- actor: Ray actor calls with numpy payloads (what mixserve uses)
- actor-torch: the same with torch tensors
- cgraph: a Ray Compiled Graph over the same two actors (shared-memory channels)
- gloo: torch.distributed gloo point-to-point inside a placement group (replica + 2 shards;
  a 2-int size header then the payload, since group sizes change every layer)
- tcp: mixserve's own channel (mixserve/expert_shards/channel.py) between the same actors
- zmq: a ZeroMQ DEALER/ROUTER echo of the same frames (mixserve's channel before the TCP one;
  measured only where pyzmq is installed, which mixserve no longer needs)

Run:
    .venv/bin/python benchmarks/transport.py            # D=1024, rows per shard 1, 8, 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import format_table, write_results  # noqa: E402

TRANSPORTS = ("actor", "actor-torch", "cgraph", "gloo", "zmq", "tcp")
N_SHARDS = 2
CHOICE = (
    "Choice: mixserve sends token groups over its own framed TCP connections (tcp rows). An actor runs one "
    "Compiled Graph at a time and a gloo group's members are fixed at rendezvous, so neither lets autoscaled "
    "attention replicas join and leave the shared shards alone; Ray actor calls allow that but cost several "
    "times more per hop. The zmq row is a bare echo (the shard side parses nothing and makes no tensors), "
    "so idle it beats the full tcp channel; but ZeroMQ hands every message to an I/O thread on each end, and "
    "those hand-offs queue behind the experts' compute when the shards fill the cores: in decode, mixserve's "
    "ZeroMQ channel gave small-mixtral 197-252 tok/s at c=32 against 232-286 over TCP (interleaved runs, "
    "dispatch overhead 2.4-2.8 vs 1.3-1.6 ms a layer). On GPUs, NCCL goes behind the same Transport "
    "interface (mixserve/expert_shards/dispatch.py)."
)


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, mean and p99 in milliseconds."""
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
    }


class Echo:
    def echo(self, x):
        return x


def measure_actor(rows: int, dim: int, iters: int, as_torch: bool = False) -> dict[str, float]:
    """Round trips of one layer over Ray actor calls (needs ray.init done)."""
    import numpy as np
    import ray
    import torch

    actors = [ray.remote(Echo).options(num_cpus=0).remote() for _ in range(N_SHARDS)]
    payload = torch.randn(rows, dim) if as_torch else np.random.randn(rows, dim).astype(np.float32)
    samples = []
    for i in range(iters + 20):
        start = time.perf_counter()
        outs = ray.get([a.echo.remote(payload) for a in actors])
        if not as_torch:
            outs = [np.array(o) for o in outs]  # the copy mixserve makes out of the object store
        if i >= 20:
            samples.append(time.perf_counter() - start)
    for a in actors:
        ray.kill(a)
    return summarize(samples)


class TcpEcho:
    def __init__(self):
        from mixserve.expert_shards.channel import ShardServer

        self.server = ShardServer(lambda layer, x, expert_ids, weights: x)

    def address(self) -> str:
        return self.server.address


def time_round_trips(transport, requests: dict, iters: int, gap_s: float = 0.0, between: Callable[[], object] | None = None,
                     less_compute: bool = False) -> list[float]:
    """Seconds per round trip of `requests` (one layer's) through `transport`, after 20 for
    warm-up; less the slowest shard's reported compute with less_compute. gap_s and `between`
    as in measure_tcp."""
    samples = []
    for i in range(iters + 20):
        if gap_s:
            time.sleep(gap_s)
        if between is not None:
            between()
        start = time.perf_counter()
        replies = transport.collect(transport.submit(0, requests))
        wall = time.perf_counter() - start
        if i >= 20:
            samples.append(wall - (max(r.compute_s for r in replies.values()) if less_compute else 0.0))
    return samples


def measure_tcp(rows: int, dim: int, iters: int, gap_s: float = 0.0, between: Callable[[], object] | None = None) -> dict[str, float]:
    """mixserve's channel: the request carries x, expert ids and weights; the reply x. With
    gap_s, the sender idles that long before each round trip, as a replica does between layers
    (on a VM an idle core takes much longer to wake than a busy one). With `between`, the sender
    runs it before each round trip (untimed): a replica's attention work, which leaves its caches
    cold for the transport's own code, as in a real decode layer."""
    import ray
    import torch

    from mixserve.expert_shards.channel import TcpTransport
    from mixserve.expert_shards.dispatch import ShardRequest

    actors = [ray.remote(TcpEcho).options(num_cpus=0).remote() for _ in range(N_SHARDS)]
    transport = TcpTransport(dict(enumerate(ray.get([a.address.remote() for a in actors]))))
    requests = {i: ShardRequest(torch.randn(rows, dim), torch.zeros(rows, 2, dtype=torch.long), torch.ones(rows, 2))
                for i in range(N_SHARDS)}
    samples = time_round_trips(transport, requests, iters, gap_s, between)
    transport.close()
    for a in actors:
        ray.kill(a)
    return summarize(samples)


class ZmqEcho:
    """A ZeroMQ ROUTER answering each [header, x, ids, weights] request with [header, x]."""

    def __init__(self):
        import threading

        import zmq

        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            identity, header, x, _, _ = self.socket.recv_multipart(copy=False)
            self.socket.send_multipart([identity, header, x], copy=False)

    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


def measure_zmq(rows: int, dim: int, iters: int) -> dict[str, float]:
    import numpy as np
    import ray
    import zmq

    actors = [ray.remote(ZmqEcho).options(num_cpus=0).remote() for _ in range(N_SHARDS)]
    sockets = []
    for address in ray.get([a.address.remote() for a in actors]):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(address)
        sockets.append(sock)
    x, ids, weights = np.random.randn(rows, dim).astype(np.float32), np.zeros((rows, 2), np.int64), np.ones((rows, 2), np.float32)
    out = np.empty_like(x)
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    samples = []
    for i in range(iters + 20):
        start = time.perf_counter()
        for sock in sockets:
            sock.send_multipart([json.dumps({"layer": 0, "rows": rows}).encode(), x, ids, weights], copy=False)
        waiting = set(sockets)
        while waiting:
            for sock in dict(poller.poll(10_000)):
                json.loads(sock.recv())
                sock.recv_into(out)
                waiting.discard(sock)
        if i >= 20:
            samples.append(time.perf_counter() - start)
    return summarize(samples)


def measure_cgraph(rows: int, dim: int, iters: int) -> dict[str, float]:
    import numpy as np
    import ray
    from ray.dag import InputNode, MultiOutputNode

    actors = [ray.remote(Echo).options(num_cpus=0).remote() for _ in range(N_SHARDS)]
    with InputNode() as inp:
        dag = MultiOutputNode([a.echo.bind(inp[i]) for i, a in enumerate(actors)])
    compiled = dag.experimental_compile()
    payloads = [np.random.randn(rows, dim).astype(np.float32) for _ in actors]
    samples = []
    for i in range(iters + 20):
        start = time.perf_counter()
        [np.array(o) for o in ray.get(compiled.execute(*payloads))]  # the copy out of the channel, as mixserve would
        if i >= 20:
            samples.append(time.perf_counter() - start)
    result = summarize(samples)
    print(json.dumps(result), flush=True)  # before teardown, which has hung on this kind of machine
    compiled.teardown()
    return result


class GlooShard:
    """Receives (header, payload) from rank 0 and sends the payload back, until a 0 header."""

    def run(self, rank: int, world: int, address: str, dim: int) -> int:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
        header = torch.zeros(2, dtype=torch.long)
        served = 0
        while True:
            dist.recv(header, src=0)
            if header[0] == 0:
                break
            buf = torch.empty(int(header[0]), int(header[1]))
            dist.recv(buf, src=0)
            dist.send(buf, dst=0)
            served += 1
        dist.destroy_process_group()
        return served


class GlooReplica:
    def run(self, address: str, rows: int, dim: int, iters: int) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=address, rank=0, world_size=N_SHARDS + 1)
        payload = torch.randn(rows, dim)
        header = torch.tensor([rows, dim])
        back = [torch.empty(rows, dim) for _ in range(N_SHARDS)]
        samples = []
        for i in range(iters + 20):
            start = time.perf_counter()
            sends = []
            for shard in range(1, N_SHARDS + 1):
                sends.append(dist.isend(header, dst=shard))
                sends.append(dist.isend(payload, dst=shard))
            recvs = [dist.irecv(back[s - 1], src=s) for s in range(1, N_SHARDS + 1)]
            for work in sends + recvs:
                work.wait()
            if i >= 20:
                samples.append(time.perf_counter() - start)
        stop = torch.zeros(2, dtype=torch.long)
        for shard in range(1, N_SHARDS + 1):
            dist.send(stop, dst=shard)
        dist.destroy_process_group()
        return summarize(samples)


def measure_gloo(rows: int, dim: int, iters: int) -> dict[str, float]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 0.01}] * (N_SHARDS + 1), strategy="PACK")
    ray.get(pg.ready())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"

    def in_bundle(cls, i):
        return ray.remote(cls).options(
            num_cpus=0.01, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        ).remote()

    replica = in_bundle(GlooReplica, 0)
    shards = [in_bundle(GlooShard, i) for i in range(1, N_SHARDS + 1)]
    served = [s.run.remote(i, N_SHARDS + 1, address, dim) for i, s in enumerate(shards, start=1)]
    result = ray.get(replica.run.remote(address, rows, dim, iters))
    ray.get(served)
    remove_placement_group(pg)
    return result


def run_one(transport: str, rows_list: list[int], dim: int, iters: int) -> None:
    """Child process: measures one transport at every size, prints one JSON line per size."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for rows in rows_list:
        if transport == "cgraph":
            result = measure_cgraph(rows, dim, iters)
            print(json.dumps({"rows": rows, **result}), flush=True)
            return  # one compiled graph per process: a second compile after teardown is not worth the risk
        measure = {"actor": measure_actor, "actor-torch": lambda r, d, n: measure_actor(r, d, n, True), "gloo": measure_gloo, "zmq": measure_zmq,
                   "tcp": measure_tcp}[transport]
        print(json.dumps({"rows": rows, **measure(rows, dim, iters)}), flush=True)


def measure_in_subprocess(transport: str, rows: int, dim: int, iters: int, timeout_s: float = 180) -> dict | None:
    """Runs one measurement in a fresh process; takes its first JSON line even if it then hangs."""
    cmd = [sys.executable, __file__, "--child", transport, "--rows", str(rows), "--dim", str(dim), "--iters", str(iters)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
    for line in out.splitlines():
        if line.startswith("{"):
            data = json.loads(line)
            return {k: v for k, v in data.items() if k != "rows"}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rows", default="1,8,32", help="token rows per shard per layer, comma separated")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--child", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.child:
        run_one(args.child, rows_list, args.dim, args.iters)
        return

    transports = args.transports.split(",")
    try:
        import zmq  # noqa: F401 - only for the comparison row
    except ImportError:
        transports = [t for t in transports if t != "zmq"]
        print("pyzmq is not installed: no zmq row")
    figures = {(t, r): measure_in_subprocess(t, r, args.dim, args.iters) for t in transports for r in rows_list}
    rows = []
    for r in rows_list:
        base = figures.get(("actor", r))
        for t in transports:
            f = figures[(t, r)]
            ratio = base["median_ms"] / f["median_ms"] if f and base else None
            rows.append([r, t, f and f["median_ms"], f and f["p99_ms"], ratio])
    table = format_table(
        ["rows/shard", "transport", "median ms", "p99 ms", "speed vs actor"], rows
    )
    print(table)
    if not args.no_write:
        write_results(
            "Transport: per-layer round trip to 2 shards",
            f"Payload [rows, {args.dim}] float32 to each of {N_SHARDS} shards and back (echo), "
            f"{args.iters} layers after warm-up; n/a = it failed or hung.\n\n{table}\n\n{CHOICE}",
        )


if __name__ == "__main__":
    main()
