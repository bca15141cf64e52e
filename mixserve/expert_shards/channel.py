"""The data plane between attention replicas and expert shards: ZeroMQ over TCP.

Why ZeroMQ and not what Ray offers (figures from benchmarks/transport.py on the 2-core CI
machine, one layer = [rows, 1024] float32 to 2 shards and back, medians): Ray actor calls cost
2.1 / 3.0 / 7.1 ms at 1 / 8 / 32 rows per shard, too much for a hop every layer of every step;
a Ray Compiled Graph costs about 0.5 ms, but an actor can only run one compiled graph at a
time, so a second attention replica could not share the shards; a torch.distributed gloo group
(also about 0.5 ms) has a membership fixed at rendezvous. Autoscaled replicas come and go, so
each replica needs its own channel to each shard that it can open and drop alone. A ZeroMQ
DEALER socket per (replica, shard) to the shard's ROUTER gives that, at the hop cost of a raw
socket, with framing, reconnects and zero-copy sends done by a well-kept library. Ray still
owns the actors' lives; only the tensors take this path. (On GPUs the same Transport seam takes
NCCL.)

Wire format, one message each way per shard per layer (T_s tokens, K experts per token):
  request: [header JSON {id, layer, rows, dim, k, dtype, sent_at}, x [T_s, dim] in dtype,
            expert ids [T_s, k] int64 (-1: a slot another shard computes), gate weights [T_s, k] in dtype]
  reply:   [header JSON {id, rows, dim, dtype, compute_s, to_shard_s, replied_at} or {id, error},
            output [T_s, dim] in dtype (absent on error)]
(sent_at and replied_at are wall-clock stamps: the trip times they give are exact on one
machine and approximate across machines; they only feed the dispatch statistics.)
The channel is inside the cluster's network, like Ray's own ports: bind it to the node's
cluster address, never to a public interface.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from mixserve.expert_shards.dispatch import ShardReply, ShardRequest, ShardUnavailableError

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
POLL_SLICE_MS = 200  # how often a waiting replica looks at connection events
ComputeFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, x, expert_ids, weights)


def _as_bytes(t: torch.Tensor):
    """A buffer over a tensor's bytes, whatever its dtype (numpy has no bfloat16)."""
    return t.contiguous().view(torch.uint8).numpy()


def _receive_tensor(sock: zmq.Socket, rows: int, dim: int, dtype: str | torch.dtype) -> torch.Tensor:
    """Reads the next frame straight into a new writable tensor."""
    out = torch.empty(rows, dim, dtype=DTYPES[dtype] if isinstance(dtype, str) else dtype)
    if not sock.getsockopt(zmq.RCVMORE):
        raise ShardUnavailableError("malformed message from an expert shard: payload missing")
    n = sock.recv_into(_as_bytes(out))
    if n != out.numel() * out.element_size():
        raise ShardUnavailableError(f"expert shard sent {n} bytes for a [{rows}, {dim}] {dtype} tensor")
    return out


class ShardServer:
    """Shard side: answers compute requests from any number of replicas in one thread."""

    def __init__(self, compute: ComputeFn, host: str = "127.0.0.1"):
        self._compute = compute
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="shard-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _serve(self) -> None:
        sock = self._socket
        while not self._stop.is_set():
            if not sock.poll(POLL_SLICE_MS):
                continue
            identity = sock.recv()
            header = json.loads(sock.recv())
            try:
                rows, k, dtype = header["rows"], header["k"], header["dtype"]
                x = _receive_tensor(sock, rows, header["dim"], dtype)
                expert_ids = _receive_tensor(sock, rows, k, torch.long)
                weights = _receive_tensor(sock, rows, k, dtype)
                received_at = time.time()
                start = time.perf_counter()
                out = self._compute(header["layer"], x, expert_ids, weights).to(DTYPES[dtype])
                reply = {
                    "id": header["id"], "rows": out.shape[0], "dim": out.shape[1], "dtype": header["dtype"],
                    "compute_s": time.perf_counter() - start,
                    "to_shard_s": received_at - header["sent_at"],
                    "replied_at": time.time(),
                }
                sock.send_multipart([identity, json.dumps(reply).encode(), _as_bytes(out)], copy=False)
            except Exception as exc:  # noqa: BLE001 - the replica gets the error; the shard keeps serving
                while sock.getsockopt(zmq.RCVMORE):
                    sock.recv()
                sock.send_multipart([identity, json.dumps({"id": header["id"], "error": f"{type(exc).__name__}: {exc}"}).encode()])
        sock.close()


@dataclass
class _Peer:
    address: str
    socket: zmq.Socket
    monitor: zmq.Socket
    broken: str | None = None  # why the connection is unusable, once it is


class ZmqTransport:
    """Replica side: one DEALER socket per shard. Used from one thread (the engine's step
    thread); `set_addresses` may come from any thread and takes effect at the next submit.

    `submit` sends every shard its groups and returns at once, so the caller can compute
    (ping-pong micro-batches) while the shards work; `collect` waits for the answers. A shard
    that dies or falls silent becomes a ShardUnavailableError: at once when its connection
    drops, else after `timeout_s`."""

    def __init__(self, addresses: dict[int, str], timeout_s: float = 30.0, connect_timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count()
        self._peers: dict[int, _Peer] = {}
        self._stash: dict[int, ShardReply | str] = {}  # replies read while waiting for others
        self._wanted: dict[int, str] | None = None
        self._lock = threading.Lock()
        self._apply_addresses(addresses)

    def set_addresses(self, addresses: dict[int, str]) -> None:
        with self._lock:
            self._wanted = dict(addresses)

    def close(self) -> None:
        for peer in self._peers.values():
            self._close_peer(peer)
        self._peers.clear()

    # ---- the Transport interface -------------------------------------------------------------
    def submit(self, layer: int, requests: dict[int, ShardRequest]) -> dict[int, int]:
        """Sends each shard its request; returns {shard: request id} to collect later."""
        with self._lock:
            wanted, self._wanted = self._wanted, None
        if wanted is not None:
            self._apply_addresses(wanted)
        pending = {}
        for shard, req in requests.items():
            peer = self._peers.get(shard)
            if peer is None:
                raise ShardUnavailableError(f"no channel to expert shard {shard}")
            self._drain_events(shard, peer)
            if peer.broken:
                raise ShardUnavailableError(f"expert shard {shard} is unreachable: {peer.broken}")
            x = req.x.contiguous()
            header = {
                "id": next(self._ids), "layer": layer, "rows": x.shape[0], "dim": x.shape[1],
                "k": req.expert_ids.shape[1], "dtype": DTYPE_NAMES[x.dtype], "sent_at": time.time(),
            }
            frames = [json.dumps(header).encode(), _as_bytes(x), _as_bytes(req.expert_ids.to(torch.long)),
                      _as_bytes(req.weights.to(x.dtype))]
            try:
                peer.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:  # IMMEDIATE: nothing is queued for a shard that is not connected
                raise ShardUnavailableError(f"expert shard {shard} is not connected") from None
            pending[shard] = header["id"]
        return pending

    def collect(self, pending: dict[int, int]) -> dict[int, ShardReply]:
        deadline = time.monotonic() + self.timeout_s
        results: dict[int, ShardReply] = {}
        try:
            while True:
                for shard, req_id in pending.items():
                    if shard not in results and req_id in self._stash:
                        reply = self._stash.pop(req_id)
                        if isinstance(reply, str):
                            raise ShardUnavailableError(f"expert shard {shard} failed: {reply}")
                        results[shard] = reply
                missing = [s for s in pending if s not in results]
                if not missing:
                    return results
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ShardUnavailableError(f"expert shards {missing} did not answer within {self.timeout_s:.0f}s")
                self._wait_once(missing, min(remaining * 1000, POLL_SLICE_MS))
        except ShardUnavailableError:
            for req_id in pending.values():  # late answers to an abandoned call are dropped on arrival
                self._stash.pop(req_id, None)
            raise

    # ---- internals ---------------------------------------------------------------------------
    def _wait_once(self, shards: list[int], timeout_ms: float) -> None:
        poller = zmq.Poller()
        for shard in shards:
            peer = self._peers[shard]
            poller.register(peer.socket, zmq.POLLIN)
            poller.register(peer.monitor, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        for shard in shards:
            peer = self._peers[shard]
            if peer.socket in ready:
                self._read_replies(peer)
            if peer.monitor in ready:
                self._drain_events(shard, peer)
            if peer.broken:
                raise ShardUnavailableError(f"expert shard {shard} went away: {peer.broken}")

    def _read_replies(self, peer: _Peer) -> None:
        sock = peer.socket
        while sock.poll(0):
            header = json.loads(sock.recv())
            if "error" in header:
                self._stash[header["id"]] = header["error"]
            else:
                out = _receive_tensor(sock, header["rows"], header["dim"], header["dtype"])
                from_shard_s = time.time() - header["replied_at"]
                self._stash[header["id"]] = ShardReply(out, header["compute_s"], header["to_shard_s"], from_shard_s)

    def _drain_events(self, shard: int, peer: _Peer) -> None:
        while peer.monitor.poll(0):
            event = recv_monitor_message(peer.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                peer.broken = "connection closed"
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                peer.broken = None

    def _apply_addresses(self, addresses: dict[int, str]) -> None:
        for shard in list(self._peers):
            if addresses.get(shard) != self._peers[shard].address:
                self._close_peer(self._peers.pop(shard))
        for shard, address in addresses.items():
            if shard not in self._peers:
                self._peers[shard] = self._connect(shard, address)

    def _connect(self, shard: int, address: str) -> _Peer:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        peer = _Peer(address, sock, monitor, broken="not connected yet")
        deadline = time.monotonic() + self.connect_timeout_s
        while peer.broken and time.monotonic() < deadline:
            if monitor.poll(POLL_SLICE_MS):
                self._drain_events(shard, peer)
        if peer.broken:
            log.warning("expert shard %d at %s: no connection within %.0fs", shard, address, self.connect_timeout_s)
        return peer

    @staticmethod
    def _close_peer(peer: _Peer) -> None:
        peer.socket.disable_monitor()
        peer.monitor.close(linger=0)
        peer.socket.close(linger=0)
