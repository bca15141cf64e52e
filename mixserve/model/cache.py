"""Rolling-buffer KV cache pool and the per-step metadata every layer shares.

Each sequence owns one *slot* of a pool fixed at start-up. A slot holds W positions per
layer, where W is the sliding window (or the context limit for full-attention models), and
position p lives at cache index p mod W, overwriting what was there: memory per sequence is
flat however long it runs.

Worked example (W = 3). Two sequences in one step:
  seq A, slot 0: decoding position 7 (8 tokens seen).   cache index 7 % 3 = 1
  seq B, slot 1: prefill chunk of positions 3, 4, 5 after 3 cached tokens (0, 1, 2).

  tokens     = [a7, b3, b4, b5]            (decodes first, then prefill chunks)
  positions  = [7, 3, 4, 5]
  decode:  slots [0], cache_index [1], kv_len 3, mask [[T, T, T]]  (all 3 slots live after wrap)
           A writes its key at index 1 (overwriting position 4), then attends to positions 5, 6, 7.
  prefill: slot 1, cached_len 3, cached positions by index [0, 1, 2]
           query 3 may see keys 1, 2 (cache) and 3 (itself); 0 is outside the window (3 - 3 = 0).
           mask (rows = queries 3, 4, 5; cols = cache 0, 1, 2 | chunk 3, 4, 5):
             3: F T T | T F F
             4: F F T | T T F
             5: F F F | T T T
           after attention the chunk's keys go to indices [0, 1, 2], replacing positions 0, 1, 2.

A chunk may be longer than W (a whole prompt in one step): each query still sees only the W
positions up to itself, from the cache and from the chunk, so it computes exactly what a run
of W-sized chunks would (Mistral's chunked prefill); only the chunk's last W keys are written,
since the earlier ones would be overwritten within the same chunk. Why: a step costs a fixed
overhead, and a 512-token prompt under a 64-token window would otherwise take 8 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixserve.model.args import ModelArgs


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: `length` new tokens starting at absolute position `start`."""

    slot: int
    start: int
    length: int


@dataclass
class WindowBlocks:
    """A chunk of at least 2W tokens, attended W queries at a time. Why: one call over the whole
    chunk scores every query against all Lc + C keys although it may see only W of them; in W-query
    blocks each scores at most 2W - 1 (tiny-mixtral, W = 64, a 512-token prompt: 4x fewer scores,
    and SDPA had taken a quarter of the prefill step). The blocks after the first see no cache
    and share one band mask, so they go as one batch; the first block also sees the cache, and a
    last partial block takes the band mask's top-left corner.

    Block b >= 1 holds queries [bW, bW + W) and keys [bW - W + 1, bW + W) of the chunk: query
    bW + i sees the chunk's keys bW + i - W + 1 .. bW + i, columns i .. i + W - 1 of the block.
    """

    head_bias: torch.Tensor  # [1, 1, W, Lc + W]: the first W queries over the cache and the chunk's first W keys
    band_bias: torch.Tensor  # [1, 1, W, 2W - 1]: 0 where column - row is in [0, W), -inf elsewhere
    n_band: int  # full blocks after the first: C // W - 1
    n_tail: int  # queries in the last, partial block: C % W


@dataclass
class PrefillMeta:
    """Derived tensors for one prefill chunk (attends to its cache, then writes itself)."""

    slot: int
    token_offset: int  # where the chunk's tokens start in the flattened step
    start: int  # absolute position of the chunk's first token
    length: int  # C
    cached_len: int  # Lc = min(start, W) cache entries to attend to
    write_from: int  # max(0, C - W): the chunk rows from here on are written to the cache
    write_index: torch.Tensor  # [C - write_from] long: cache index of each written chunk position
    cached_pos: torch.Tensor  # [Lc] long: the position each cache index holds
    window: int  # W
    # [1, 1, C, Lc + C] in the model's dtype: 0 where `mask` is True, -inf elsewhere; None for a
    # chunk attended in blocks. Why additive: SDPA's CPU flash kernel takes an additive mask as it
    # is but converts a boolean one on every call (measured 5x slower for a 512-token chunk), so
    # the conversion happens once per step here.
    bias: torch.Tensor | None
    blocks: WindowBlocks | None  # for a chunk of 2W tokens or more

    @property
    def mask(self) -> torch.Tensor:
        """[C, Lc + C] bool: True where a query (row) may attend to a key (cache, then chunk)."""
        query_pos = torch.arange(self.start, self.start + self.length, device=self.cached_pos.device)
        return _window_mask(query_pos, torch.cat([self.cached_pos, query_pos]), self.window)


@dataclass
class FreshPrefillGroup:
    """Prompts that start at position 0 and fit in the window: nothing cached, so each one's
    attention is plain causal attention over its own tokens. Why a group: on CPUs one SDPA call
    per prompt costs ~130 us whatever its size (16 prompts of 64 tokens: ~8 ms of a tiny-mixtral
    step over its 4 layers), so a burst of new prompts is attended as one batch [B, C, ...]
    padded at the end to C, the longest. Measured on the 2-core CI machine, interleaved A/B: a
    step of 16 such prompts 72-78 -> 66-71 ms, of 8 prompts 46.6 -> 42.2 ms. Padding is exact:
    under causal attention a real query never sees a later, padded key. Pad keys land in cache
    indices past their prompt's end, which nothing reads before it is overwritten (a decode
    writes its position before reading it; a later chunk reads only the first min(start, W)
    entries).

    Worked example: step rows 0-1 decode, then prompts of 3 and 2 tokens in slots 5 and 7:
      slots [5, 7], length 3, gather [2, 3, 4, 5, 6, 6] (the pad repeats the last real row),
      step_rows [2, 3, 4, 5, 6], padded_rows [0, 1, 2, 3, 4].
    """

    slots: torch.Tensor  # [B] long
    length: int  # C: the longest prompt of the group
    # The group's real rows in the step: a slice when they are B * C contiguous rows (equal
    # lengths, adjacent), which the padded batch then is as it stands.
    step_rows: slice | torch.Tensor
    gather: torch.Tensor | None  # [B * C] long: the step row behind each padded row; None with a slice
    padded_rows: torch.Tensor | None  # [N] long: where each real row sits in the padded batch; None: all rows are real


@dataclass
class StepMetadata:
    """Everything attention needs for one step, computed once and reused by every layer."""

    positions: torch.Tensor  # [T] long: absolute position of every token in the step
    n_decode: int  # the first n_decode tokens are single-token decodes, one per sequence
    decode_slots: torch.Tensor  # [Bd] long
    decode_write_index: torch.Tensor  # [Bd] long: position % W
    decode_kv_len: int  # L: cache entries worth reading (the longest live prefix of any slot)
    decode_mask: torch.Tensor  # [Bd, 1, 1, L] bool
    prefills: list[PrefillMeta]  # every prefill chunk of the step
    # The same chunks, split for backends that batch fresh prompts (SDPA): groups of fresh
    # prompts attended as one padded batch, and the chunks attended one by one.
    fresh_groups: list[FreshPrefillGroup]
    single_prefills: list[PrefillMeta]


def build_step_metadata(
    chunks: list[SequenceChunk], window: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> StepMetadata:
    """Derives the step's tensors. Single-token chunks must come first: they take the batched
    decode path (a one-token prefill is the same computation as a decode)."""
    n_decode = 0
    while n_decode < len(chunks) and chunks[n_decode].length == 1:
        n_decode += 1
    decodes, prefills = chunks[:n_decode], chunks[n_decode:]

    positions: list[int] = [c.start for c in decodes]
    for c in prefills:
        positions.extend(range(c.start, c.start + c.length))
    positions_t = torch.tensor(positions, dtype=torch.long)

    # Decode: write first (the overwritten position p - W is outside the window), then read.
    live = [min(c.start + 1, window) for c in decodes]
    kv_len = max(live, default=0)
    decode_mask = torch.arange(kv_len)[None, :] < torch.tensor(live, dtype=torch.long)[:, None]

    prefill_meta: list[PrefillMeta] = []
    offset = n_decode
    for c in prefills:
        prefill_meta.append(_prefill_meta(c, offset, window, device, dtype))
        offset += c.length

    fresh_groups, single_prefills = _group_fresh_prompts(prefill_meta, window, device)
    return StepMetadata(
        positions=positions_t.to(device),
        n_decode=n_decode,
        decode_slots=torch.tensor([c.slot for c in decodes], dtype=torch.long, device=device),
        decode_write_index=torch.tensor([c.start % window for c in decodes], dtype=torch.long, device=device),
        decode_kv_len=kv_len,
        decode_mask=decode_mask[:, None, None, :].to(device),
        prefills=prefill_meta,
        fresh_groups=fresh_groups,
        single_prefills=single_prefills,
    )


def _group_fresh_prompts(
    prefills: list[PrefillMeta], window: int, device: torch.device | str
) -> tuple[list[FreshPrefillGroup], list[PrefillMeta]]:
    """Groups fresh prompts (start 0, at most W tokens) longest first while the longest is at
    most twice a member's length, so padding at most quadruples a prompt's attention scores
    (C^2 against its own L^2), little beside the per-call cost it saves; everything else, and
    groups of one, stay single."""
    fresh = sorted((p for p in prefills if p.start == 0 and p.length <= window), key=lambda p: -p.length)
    runs: list[list[PrefillMeta]] = []
    for p in fresh:
        if runs and runs[-1][0].length <= 2 * p.length:
            runs[-1].append(p)
        else:
            runs.append([p])
    grouped = {id(p) for run in runs if len(run) > 1 for p in run}
    singles = [p for p in prefills if id(p) not in grouped]
    return [_fresh_group(run, device) for run in runs if len(run) > 1], singles


def _fresh_group(run: list[PrefillMeta], device: torch.device | str) -> FreshPrefillGroup:
    run = sorted(run, key=lambda p: p.token_offset)  # step order: equal lengths in a row need no gather
    c = max(p.length for p in run)
    slots = torch.tensor([p.slot for p in run], dtype=torch.long, device=device)
    first = run[0].token_offset
    if all(p.length == c and p.token_offset == first + i * c for i, p in enumerate(run)):
        return FreshPrefillGroup(slots, c, slice(first, first + c * len(run)), None, None)
    equal = all(p.length == c for p in run)  # rows apart, but no padding
    gather, step_rows, padded_rows = [], [], []
    for i, p in enumerate(run):
        own = list(range(p.token_offset, p.token_offset + p.length))
        gather += own + [own[-1]] * (c - p.length)
        step_rows += own
        padded_rows += range(i * c, i * c + p.length)
    step_rows_t, gather_t = (torch.tensor(xs, dtype=torch.long, device=device) for xs in (step_rows, gather))
    padded_rows_t = None if equal else torch.tensor(padded_rows, dtype=torch.long, device=device)
    return FreshPrefillGroup(slots, c, step_rows_t, gather_t, padded_rows_t)


def _prefill_meta(
    c: SequenceChunk, token_offset: int, window: int, device: torch.device | str, dtype: torch.dtype
) -> PrefillMeta:
    cached_len = min(c.start, window)
    # Position held by each cache index: the latest p < start with p % W == index.
    index = torch.arange(cached_len)
    cached_pos = c.start - 1 - torch.remainder(c.start - 1 - index, window)
    query_pos = torch.arange(c.start, c.start + c.length)
    write_from = max(0, c.length - window)
    bias = blocks = None
    if c.length >= 2 * window:
        head = query_pos[:window]
        # The band in block coordinates: query i sits at key column i + W - 1, the last of its W keys.
        band = _window_mask(torch.arange(window) + window - 1, torch.arange(2 * window - 1), window)  # [W, 2W - 1]
        blocks = WindowBlocks(
            head_bias=_additive(_window_mask(head, torch.cat([cached_pos, head]), window), dtype, device),
            band_bias=_additive(band, dtype, device),
            n_band=c.length // window - 1,
            n_tail=c.length % window,
        )
    else:
        bias = _additive(_window_mask(query_pos, torch.cat([cached_pos, query_pos]), window), dtype, device)
    return PrefillMeta(
        slot=c.slot,
        token_offset=token_offset,
        start=c.start,
        length=c.length,
        cached_len=cached_len,
        write_from=write_from,
        write_index=torch.remainder(query_pos[write_from:], window).to(device),
        cached_pos=cached_pos.to(device),
        window=window,
        bias=bias,
        blocks=blocks,
    )


def _window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[Q, K] bool: key position within the W positions up to the query's own (sliding window
    and causal at once; every query sees at least itself)."""
    return (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)


def _additive(mask: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """[Q, K] bool -> [1, 1, Q, K] in dtype: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))[None, None].to(device)


class RollingKVCache:
    """Fixed pool of per-sequence rolling buffers for every layer.

    Shapes: k, v = [n_layers, n_slots, n_kv_heads, W, head_dim]. Slots are handed out by the
    scheduler; the cache itself never grows.
    """

    def __init__(self, args: ModelArgs, n_slots: int, window: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (args.n_layers, n_slots, args.n_kv_heads, window, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.window = window
        self.n_slots = n_slots

    @property
    def bytes_per_slot(self) -> int:
        per_tensor = self.k[:, 0].numel() * self.k.element_size()
        return 2 * per_tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
