"""Sending each MoE layer's tokens to the shards that hold their experts.

Shape legend: T = tokens, D = model dim, K = experts per token, T_s = tokens shard s computes for.

Per layer and step: the attention replica gates (top-k) and picks, for every token's slot, one
shard holding that expert (a replicated expert's tokens are split over its holders, least
loaded first, under the step's placement). Each shard gets, in one message, the rows of the
tokens it has a slot for, their expert ids (-1 for a slot computed elsewhere) and gate weights;
it runs the engine's own MoE kernel on them and sends back one gate-weighted row per token.
The replica adds the shards' rows. On the CPU the pack and each add are one compiled call
(dispatch_kernel.py), elsewhere numpy and torch calls. The router only publishes placements:
data never goes through it. A placement swap is atomic per step: the model latches the client's
placement at the start of each step (`begin_step`), so a step in flight finishes on the table
it began with.
"""

from __future__ import annotations

import abc
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from mixserve.errors import MixserveError
from mixserve.expert_shards.dispatch_kernel import dispatch_kernel
from mixserve.expert_shards.placement import Placement
from mixserve.expert_shards.shard import ExpertShard
from mixserve.model.moe import MoeLayer


# Layer calls whose load is counted only when read (by the load reporter, about once a second):
# past this many the call that adds one counts them all (~0.1 ms, amortised to well under 1 us a
# call), so a replica whose counts nobody reads holds at most a few MB of them.
MAX_UNCOUNTED_CALLS = 256
# Integer dtypes as wide as a float dtype: the gate weights' bits travel through numpy as these.
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class ShardUnavailableError(MixserveError):
    """A shard failed or timed out; the request is retryable once the shard is back."""


@dataclass
class ShardRequest:
    x: torch.Tensor  # [T_s, D] the tokens with at least one slot on this shard (on x's device)
    expert_ids: torch.Tensor  # [T_s, K] long (CPU): global expert ids, -1 where another shard computes the slot
    weights: torch.Tensor  # [T_s, K] gate weights in x's dtype (CPU), 0 where expert_ids is -1
    # [T_s, D] where the answer should land, if the transport can read it straight in (the
    # replica then adds it back to its tokens from there); a reply elsewhere is copied in.
    reply_into: torch.Tensor | None = None


class PackedRequest(ShardRequest):
    """One shard's request as the compiled pack lays it out (dispatch_kernel.cpp): `frames`, its
    bytes as the TCP channel sends them, and `reply_frame`, where its answer's bytes are read to,
    both memoryviews over the layer call's buffers, which this request keeps alive (never hold
    one without it). Its tensors (x, expert_ids, weights, reply_into) are views made when first
    read: the channel reads none of them, and two shards' two dozen views cost ~50 us with the
    caches cold (a torch call then takes several microseconds)."""

    def __init__(self, call: _CompiledCall, shard: int, rows: int, reply_row: int, block_at: int, ids_at: int,
                 weights_at: int, frames: list[memoryview], reply_frame: memoryview):
        # (no dataclass __init__: the fields are the properties below)
        self.shard, self.rows, self.reply_row = shard, rows, reply_row
        self.dim, self.k, self.dtype = call.dim, call.k, call.dtype
        self.frames, self.reply_frame = frames, reply_frame
        # The buffers, not the call: a call holding its requests and each request its call would
        # be a cycle, and a prefill's buffers (hundreds of MB a layer) would wait for the
        # collector instead of going when the layer is done.
        self._blocks, self._replies = call.blocks, call.replies
        self._layout = (block_at, ids_at, weights_at)
        self._views: tuple[torch.Tensor, ...] | None = None

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._views is None:
            block_at, ids_at, weights_at = self._layout
            block = self._blocks[block_at:]
            row_bytes = self.dim * self.dtype.itemsize
            self._views = (
                block[:self.rows * row_bytes].view(self.dtype).view(self.rows, self.dim),
                block[ids_at:ids_at + self.rows * self.k * 8].view(torch.long).view(self.rows, self.k),
                block[weights_at:weights_at + self.rows * self.k * self.dtype.itemsize].view(self.dtype).view(self.rows, self.k),
                self._replies[self.reply_row:self.reply_row + self.rows],
            )
        return self._views

    x = property(lambda self: self._tensors()[0])
    expert_ids = property(lambda self: self._tensors()[1])
    weights = property(lambda self: self._tensors()[2])
    reply_into = property(lambda self: self._tensors()[3])

    def __repr__(self) -> str:
        return f"PackedRequest(shard={self.shard}, rows={self.rows}, dim={self.dim}, k={self.k}, dtype={self.dtype})"


@dataclass
class ShardReply:
    # [T_s, D] per token, the gate-weighted sum over this shard's slots; None where the transport
    # read it straight into its PackedRequest's reply_frame (its size checked there)
    output: torch.Tensor | None
    compute_s: float  # the shard's own compute time for this request
    to_shard_s: float = 0.0  # request on the wire: sent here -> fully received there
    from_shard_s: float = 0.0  # reply on the wire: sent there -> fully received here


@dataclass
class DispatchStats:
    """Where the time of this replica's remote MoE layers goes, summed over layer calls."""

    calls: int = 0
    route_s: float = 0.0  # pick a shard per slot, gather each shard's token rows
    send_s: float = 0.0  # hand the buffers to the transport
    wait_s: float = 0.0  # blocked until every answer is in (what ping-pong hides)
    expert_s: float = 0.0  # the slowest shard's own compute per call, as the shards report it
    to_shard_s: float = 0.0  # the request's trip to the last shard to answer (wall clocks)
    from_shard_s: float = 0.0  # that shard's reply's trip back
    combine_s: float = 0.0  # add the shards' weighted rows back to their tokens
    # Each recent call's dispatch overhead: route + send + wait - the slowest shard's compute +
    # combine (the sums above give its mean; these its median and tail).
    overheads_s: deque[float] = field(default_factory=lambda: deque(maxlen=8192))

    def reset(self) -> None:
        self.__init__()


class Transport(Protocol):
    """Moves one layer's groups to shards and back. `submit` returns as soon as the requests
    are on their way (the caller may compute meanwhile: ping-pong micro-batches), `collect`
    waits for the answers. Implementations: in-process (tests, and the baseline for
    measuring), TCP channels (the default, see channel.py) and Ray actor calls; a GPU build
    adds NCCL behind the same calls."""

    def submit(self, layer: int, requests: dict[int, ShardRequest]) -> object:
        ...

    def collect(self, pending: object, arrived: Arrived | None = None) -> dict[int, ShardReply]:
        """Every shard's answer. `arrived(shard, reply)` is called once for each: as it comes
        in, before the others, where the transport reads answers one by one (the caller then
        combines while the rest still compute), else once all are in. An exception it raises
        fails the call like a shard's error."""
        ...


Arrived = Callable[[int, ShardReply], None]


def report_arrivals(replies: dict[int, ShardReply], arrived: Arrived | None) -> dict[int, ShardReply]:
    """For transports whose answers all come at once: `arrived` for each, then the answers."""
    if arrived is not None:
        for shard, reply in replies.items():
            arrived(shard, reply)
    return replies


class InProcessTransport:
    """Shards living in this process: no serialisation, no hop (computes at submit)."""

    def __init__(self, shards: Sequence[ExpertShard]):
        self.shards = {s.shard_id: s for s in shards}

    def submit(self, layer, requests):
        replies = {}
        for sid, r in requests.items():
            start = time.perf_counter()
            out = self.shards[sid].compute(layer, r.x, r.expert_ids, r.weights)
            replies[sid] = ShardReply(out, time.perf_counter() - start)
        return replies

    def collect(self, pending, arrived=None):
        return report_arrivals(pending, arrived)


class ShardClient:
    """What an attention replica knows of the expert side: the placement it dispatches by,
    the transport, and per-shard token counts (its share of the load picture)."""

    def __init__(self, placement: Placement, transport: Transport, compiled: bool = True):
        self.placement = placement  # the latest published
        self.step_placement = placement  # the one the current step dispatches by
        self.transport = transport
        # Slots per shard and per expert (this replica's share of the load the router sees),
        # counted when read (about once a second) from the (ids, shard_of) arrays each layer call
        # leaves here: two bincounts and two adds per call cost ~50 us on the dispatch's critical
        # path with its caches cold. A deque: the step thread appends, the reporter pops.
        self._uncounted: deque[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]] = deque()
        self._tokens_sent = np.zeros(placement.n_shards, dtype=np.int64)
        self._expert_tokens = np.zeros(placement.num_experts, dtype=np.int64)
        self._count_lock = threading.Lock()  # one fold at a time
        # Slots `assign` has given each shard so far: its tie-break, kept apart from the counts
        # above so that splitting a replicated expert never waits for a fold.
        self._assigned = [0] * placement.n_shards
        # Per placement: each expert's first holder, and whether any expert has copies.
        self._table: tuple[Placement | None, np.ndarray, torch.Tensor, bool] = (None, np.empty(0, dtype=np.int64), torch.empty(0), False)
        # [S, 1, 1]: the shard ids as a column (shard_of == shard_column broadcasts to [S, T, K]).
        # Placements only add copies of experts, so the shards are the same for the client's life.
        self.shard_column = np.arange(placement.n_shards, dtype=np.int64)[:, None, None]
        # The compiled pack and add (dispatch_kernel.py), or None for the numpy and torch path
        # (without a compiler here, or when the caller asks for it: tests and A/B runs).
        self.kernel = dispatch_kernel() if compiled else None
        self.stats = DispatchStats()

    @property
    def tokens_sent(self) -> list[int]:
        """Slots sent to each shard so far."""
        return self.load_counts()[0]

    @property
    def expert_tokens(self) -> list[int]:
        """Slots routed to each expert so far."""
        return self.load_counts()[1]

    def load_counts(self) -> tuple[list[int], list[int]]:
        """(slots sent to each shard, slots routed to each expert) so far, both over the same
        layer calls (what the load reporter sends the router)."""
        with self._count_lock:
            self._count()
            return self._tokens_sent.tolist(), self._expert_tokens.tolist()

    def _count(self) -> None:
        """Folds the calls waiting to be counted into the totals (the caller holds the lock)."""
        calls = []
        while self._uncounted:
            calls.append(self._uncounted.popleft())
        if calls:
            # (numpy arrays, or CPU tensors from the compiled pack: np.asarray views either)
            ids = np.concatenate([np.asarray(i).reshape(-1) for i, _ in calls])
            shard_of = np.concatenate([np.asarray(s).reshape(-1) for _, s in calls])
            self._expert_tokens += np.bincount(ids, minlength=len(self._expert_tokens))
            self._tokens_sent += np.bincount(shard_of, minlength=len(self._tokens_sent))

    def set_placement(self, placement: Placement) -> None:
        """Takes effect from the next step; the step in flight keeps the table it latched.
        (Placements only ever add copies of experts: the set of shards stays the same.)"""
        self.placement = placement

    def begin_step(self) -> None:
        """Latches the latest placement for the whole step about to run."""
        self.step_placement = self.placement

    def assign(self, placement: Placement, counts: list[int]) -> list[tuple[int, int, int]]:
        """(expert, shard, rows) parts for one layer call. Each expert's group is split evenly
        over the shards holding it (a replicated hot expert spreads its load at every step);
        the remainder rows, and single-holder groups, go to the least-loaded holders first.
        Largest groups are placed first; ties go to the shard `assign` has given the fewest slots."""
        load = [0] * placement.n_shards
        parts = []
        sent = self._assigned
        for expert in sorted((e for e, n in enumerate(counts) if n), key=lambda e: -counts[e]):
            holders = sorted(placement.holders[expert], key=lambda s: (load[s], sent[s], s))
            base, extra = divmod(counts[expert], len(holders))
            for i, shard in enumerate(holders):
                rows = base + (i < extra)
                if rows:
                    parts.append((expert, shard, rows))
                    load[shard] += rows
        for shard, rows in enumerate(load):
            sent[shard] += rows
        return parts

    def route(self, placement: Placement, expert_ids: np.ndarray) -> np.ndarray:
        """The shard that computes each slot of expert_ids [T, K] (an int64 [T, K] array that the
        caller leaves unchanged): an int64 [T, K] array. Counts the load as it goes."""
        first_holder, _, has_copies = self._holders(placement)
        shard_of = first_holder[expert_ids]  # [T, K], right for every expert with a single holder
        if has_copies:
            # C order, so that the flat view _split_replicated writes through is a view and not a
            # copy (ids may come transposed).
            shard_of = np.ascontiguousarray(shard_of)
            counts = np.bincount(expert_ids.reshape(-1), minlength=placement.num_experts)  # [E]
            self._split_replicated(placement, expert_ids, shard_of, counts.tolist())
        self._count_later(expert_ids, shard_of)
        return shard_of

    def _holders(self, placement: Placement) -> tuple[np.ndarray, torch.Tensor, bool]:
        """Each expert's first holder [E] (as numpy and as a tensor over the same memory), and
        whether any expert has copies; cached per placement."""
        if self._table[0] is not placement:
            first = np.array([h[0] for h in placement.holders], dtype=np.int64)
            self._table = (placement, first, torch.from_numpy(first), any(len(h) > 1 for h in placement.holders))
        return self._table[1:]

    def _count_later(self, expert_ids: np.ndarray | torch.Tensor, shard_of: np.ndarray | torch.Tensor) -> None:
        """Leaves one call's slots to be counted when the counts are read."""
        self._uncounted.append((expert_ids, shard_of))
        if len(self._uncounted) > MAX_UNCOUNTED_CALLS:  # read too seldom: keep what waits bounded
            with self._count_lock:
                self._count()

    def _split_replicated(self, placement: Placement, expert_ids: np.ndarray, shard_of: np.ndarray, counts: list[int]) -> None:
        """Rewrites shard_of [T, K] in place for the experts with copies: their slots, in token
        order, go to their holders in the shares `assign` gives."""
        flat, flat_shard = expert_ids.reshape(-1), shard_of.reshape(-1)  # views: writes land in shard_of
        split: dict[int, list[tuple[int, int]]] = {}
        for expert, shard, rows in self.assign(placement, counts):
            split.setdefault(expert, []).append((shard, rows))
        for expert, shares in split.items():
            if len(shares) > 1 or shares[0][0] != placement.holders[expert][0]:  # only replicated experts
                slots = np.flatnonzero(flat == expert)
                start = 0
                for shard, rows in shares:
                    flat_shard[slots[start:start + rows]] = shard
                    start += rows

    def pack(self, placement: Placement, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> LayerCall:
        """Every shard's request for one layer call, routed by `placement`, and where their answers
        are summed. x [T, D], expert_ids [T, K] int64, weights [T, K] in x's dtype. The call's
        requests come the one with the most tokens first (it likely finishes last, so it should
        start first)."""
        if expert_ids.dtype is not torch.int64 or weights.dtype is not x.dtype:  # (attribute checks: cheap, cold)
            raise MixserveError(f"dispatch takes int64 expert ids and weights in x's dtype, not {expert_ids.dtype} "
                                f"and {weights.dtype} for {x.dtype}")
        kernel = self.kernel
        if kernel is None or not (x.is_cpu and expert_ids.is_cpu and weights.is_cpu):
            return self._pack_with_library_calls(placement, x, expert_ids, weights)
        _, first_holder, has_copies = self._holders(placement)
        # A replicated expert's split is rare and Python's (see assign); every other slot goes to
        # its expert's first holder, which the kernel looks up itself.
        shard_of = torch.from_numpy(self.route(placement, expert_ids.numpy())) if has_copies else None
        packed = kernel.pack(x, expert_ids, weights, first_holder, shard_of, placement.n_shards)
        if shard_of is None:
            self._count_later(expert_ids, packed[0])
        return _CompiledCall(kernel, packed, x.shape[1], expert_ids.shape[1], x.dtype)

    def _pack_with_library_calls(self, placement: Placement, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> LayerCall:
        """`pack` through numpy and torch: x may live on an accelerator, and this path needs no
        compiler. Every shard's request in one pass, a fixed number of calls whatever the number
        of shards (8 shards, cold: 0.35-0.37 ms against 0.44-0.47 with a dozen calls per shard).
        The small [T, K] arrays go through numpy views, x through torch (it stays on its device);
        the gate weights as same-width integers (numpy has no bfloat16; all-zero bits are +0.0).
        (`is_cpu` rather than .cpu(): a property costs less than a call, cold.)"""
        ids = (expert_ids if expert_ids.is_cpu else expert_ids.cpu()).numpy()  # [T, K] int64
        weights_cpu = weights if weights.is_cpu else weights.cpu()
        weight_bits = weights_cpu.view(_SAME_WIDTH_INT[weights.dtype.itemsize]).numpy()  # [T, K]
        shard_of = self.route(placement, ids)  # [T, K]
        held = shard_of == self.shard_column  # [S, T, K]
        shard_pos, token = np.nonzero(held.any(axis=2))  # [N], [N]: shard-major, tokens in order
        held_slots = held[shard_pos, token]  # [N, K]
        ids_all = torch.from_numpy(np.where(held_slots, ids[token], -1))  # [N, K]
        weights_all = torch.from_numpy(np.where(held_slots, weight_bits[token], 0)).view(weights.dtype)  # [N, K]
        token_index = torch.from_numpy(token)
        if not x.is_cpu:
            token_index = token_index.to(x.device)
        x_all = x.index_select(0, token_index)  # [N, D]
        replies_all = torch.empty_like(x_all)  # [N, D]
        result = torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # [T, D] (contiguous, as the kernel's)
        rows = np.bincount(shard_pos, minlength=placement.n_shards).tolist()  # [S] (a few items: Python from here)
        starts = list(itertools.accumulate(rows, initial=0))
        requests: dict[int, ShardRequest] = {}
        token_of: dict[int, torch.Tensor] = {}
        for shard in sorted((s for s in range(placement.n_shards) if rows[s]), key=lambda s: -rows[s]):
            part = slice(starts[shard], starts[shard + 1])
            requests[shard] = ShardRequest(x_all[part], ids_all[part], weights_all[part], reply_into=replies_all[part])
            token_of[shard] = token_index[part]
        return _LibraryCall(requests, token_of, result)


class LayerCall(abc.ABC):
    """One layer call's requests, and where their answers are summed: `land(shard, reply)` puts an
    answer in its request's place (refusing one of the wrong size), `add(shard)` adds it to its
    tokens, and `result` [T, D] holds the layer's output once every answer is added."""

    requests: dict[int, ShardRequest]
    result: torch.Tensor

    @abc.abstractmethod
    def token_of(self, shard: int) -> torch.Tensor:
        """The [T_s] tokens of a shard's request, in order."""

    @abc.abstractmethod
    def land(self, shard: int, reply: ShardReply) -> None:
        """Puts a shard's answer where its request's answer belongs."""

    @abc.abstractmethod
    def add(self, shard: int) -> None:
        """Adds a landed answer's rows to their tokens in `result`."""


def _refuse_wrong_size(shard: int, output: torch.Tensor, rows: int, dim: int) -> None:
    if tuple(output.shape) != (rows, dim):  # never add what was not answered
        raise ShardUnavailableError(f"expert shard {shard} answered {list(output.shape)} for {[rows, dim]}")


class _LibraryCall(LayerCall):
    """The numpy and torch path's: requests of tensors, answers summed by index_add_ into zeros."""

    def __init__(self, requests: dict[int, ShardRequest], token_of: dict[int, torch.Tensor], result: torch.Tensor):
        self.requests, self._token_of, self.result = requests, token_of, result

    def token_of(self, shard: int) -> torch.Tensor:
        return self._token_of[shard]

    def land(self, shard: int, reply: ShardReply) -> None:
        into = self.requests[shard].reply_into
        if reply.output is None:  # (only a PackedRequest is answered in place)
            raise ShardUnavailableError(f"expert shard {shard}'s answer went nowhere")
        _refuse_wrong_size(shard, reply.output, *into.shape)
        if reply.output is not into:  # this transport could not read it in place
            into.copy_(reply.output)

    def add(self, shard: int) -> None:
        # (index_add_ sums a repeated token's rows in float before rounding: dispatch never repeats one)
        self.result.index_add_(0, self._token_of[shard], self.requests[shard].reply_into)


class _CompiledCall(LayerCall):
    """The compiled pack's (dispatch_kernel.cpp): PackedRequests over its buffers, answers summed
    by its add; `result` is uninitialised until the first add, which also zeroes the tokens it
    does not hold (one pass, after the requests went out, instead of zeroing before)."""

    def __init__(self, kernel, packed: tuple, dim: int, k: int, dtype: torch.dtype):
        _, self.result, self.blocks, self.replies, self.token, parts = packed
        self.kernel, self.dim, self.k, self.dtype = kernel, dim, k, dtype
        self.requests: dict[int, PackedRequest] = {}
        for part in sorted(parts, key=lambda part: -part[1]):
            self.requests[part[0]] = PackedRequest(self, *part)
        self._first = True
        if not self.requests:  # no slots at all (k = 0): no add will set the rows
            self.result.zero_()

    def token_of(self, shard: int) -> torch.Tensor:
        request = self.requests[shard]
        return self.token[request.reply_row:request.reply_row + request.rows]

    def land(self, shard: int, reply: ShardReply) -> None:
        if reply.output is not None:  # not read into reply_frame (another transport): copied in
            request = self.requests[shard]
            _refuse_wrong_size(shard, reply.output, request.rows, request.dim)
            request.reply_into.copy_(reply.output)

    def add(self, shard: int) -> None:
        request = self.requests[shard]
        self.kernel.add_rows_at(self.result, self.token, self.replies, request.reply_row, request.rows, self._first)
        self._first = False


class RemoteExperts(nn.Module):
    """The Experts of one layer, computed on shards (implements mixserve.model.moe.Experts)."""

    def __init__(self, layer: int, num_experts: int, client: ShardClient):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.client = client

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.start(x, expert_ids, weights)()

    def begin_step(self) -> None:
        self.client.begin_step()

    def start(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Sends this layer's tokens to the shards; the returned call waits and combines.
        x [T, D], expert_ids [T, K], weights [T, K] (x's dtype)."""
        began = time.perf_counter()
        client = self.client
        call = client.pack(client.step_placement, x, expert_ids, weights)

        transport, stats = client.transport, client.stats
        routed = time.perf_counter()
        pending = transport.submit(self.layer, call.requests)
        sent = time.perf_counter()
        stats.calls += 1
        stats.route_s += routed - began
        stats.send_s += sent - routed

        combine_s = 0.0
        added: set[int] = set()
        # Each token gets its (at most K) slots' weighted rows from one or more shards. With two
        # slots a token, adding them to zero in either order gives the same sum, bit for bit, so
        # each answer is added as it comes; with more, the sum could depend on which shard
        # answers first, so they are added after the last, in a fixed order.
        as_they_come = expert_ids.shape[1] <= 2

        def add(shard: int, reply: ShardReply) -> None:
            nonlocal combine_s
            adding = time.perf_counter()
            if shard not in call.requests or shard in added:  # never add rows twice, or rows nobody asked for
                raise ShardUnavailableError(f"an unexpected answer from expert shard {shard}")
            call.land(shard, reply)
            added.add(shard)
            if as_they_come:
                call.add(shard)
            combine_s += time.perf_counter() - adding

        def finish() -> torch.Tensor:
            nonlocal combine_s
            waited = time.perf_counter()
            replies = transport.collect(pending, add)
            for shard in call.requests:  # never return rows that were not answered
                if shard not in added:
                    raise ShardUnavailableError(f"expert shard {shard} answered nothing")
            if not as_they_come:
                adding = time.perf_counter()
                for shard in sorted(call.requests):
                    call.add(shard)
                combine_s += time.perf_counter() - adding
            done = time.perf_counter()
            slowest = max((r.compute_s for r in replies.values()), default=0.0)
            stats.wait_s += done - waited - combine_s
            stats.combine_s += combine_s
            stats.expert_s += slowest
            last = max(replies.values(), key=lambda r: r.to_shard_s + r.compute_s + r.from_shard_s, default=None)
            if last is not None:
                stats.to_shard_s += last.to_shard_s
                stats.from_shard_s += last.from_shard_s
            stats.overheads_s.append((sent - began) + (done - waited) - slowest)
            return call.result

        return finish


def remote_feed_forward(client: ShardClient):
    """The feed-forward factory of a model whose experts live on the shards behind `client`
    (pass it to mixserve.model.load_model)."""

    def build(args, layer: int) -> MoeLayer:
        experts = RemoteExperts(layer, args.num_experts, client)
        return MoeLayer(args.dim, args.num_experts, args.num_experts_per_tok, experts)

    return build
