"""Attention over the rolling cache, behind one small interface.

A backend receives one layer's projected, rotated q, k, v for the whole step and the step
metadata, writes the new keys and values into the cache and returns the attention output.
PyTorch SDPA is the default and runs everywhere; flash-attn is the GPU extra.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from mixserve.model.cache import RollingKVCache, StepMetadata


class AttentionBackend(Protocol):
    name: str

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,  # [T, H, Dh]
        k: torch.Tensor,  # [T, KV, Dh]
        v: torch.Tensor,  # [T, KV, Dh]
        meta: StepMetadata,
        cache: RollingKVCache,
    ) -> torch.Tensor:  # [T, H, Dh]
        ...


class SdpaBackend:
    """torch.nn.functional.scaled_dot_product_attention, with GQA done by grouping queries.

    Why grouping instead of repeating K/V: the G = H / KV query heads that share a KV head
    are folded into the query-length axis ([KV, G*C, Dh] against [KV, L, Dh]), so the cache
    is read once and never copied G times.
    """

    name = "sdpa"

    def __call__(self, layer, q, k, v, meta, cache):
        out = torch.empty_like(q)
        n_dec = meta.n_decode
        if n_dec:
            out[:n_dec] = self._decode(layer, q[:n_dec], k[:n_dec], v[:n_dec], meta, cache)
        for g in meta.fresh_groups:
            attended = self._fresh_prompts(layer, q, k, v, g, cache)  # [B * C, H, Dh]
            out[g.step_rows] = attended if g.padded_rows is None else attended[g.padded_rows]
        for p in meta.single_prefills:
            rows = slice(p.token_offset, p.token_offset + p.length)
            out[rows] = self._prefill(layer, q[rows], k[rows], v[rows], p, cache)
        return out

    @staticmethod
    def _decode(layer, q, k, v, meta, cache):
        # Bd = decoding sequences, L = live cache length, G = query heads per KV head
        k_pool, v_pool = cache.k[layer], cache.v[layer]  # [S, KV, W, Dh]
        k_pool[meta.decode_slots, :, meta.decode_write_index] = k
        v_pool[meta.decode_slots, :, meta.decode_write_index] = v
        length = meta.decode_kv_len
        keys = k_pool[:, :, :length].index_select(0, meta.decode_slots)  # [Bd, KV, L, Dh]
        values = v_pool[:, :, :length].index_select(0, meta.decode_slots)
        bd, h, dh = q.shape
        kv = keys.shape[1]
        grouped = q.view(bd, kv, h // kv, dh)  # [Bd, KV, G, Dh]
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=meta.decode_mask)
        return out.reshape(bd, h, dh)

    @staticmethod
    def _fresh_prompts(layer, q, k, v, g, cache):
        # B = prompts in the group, C = the longest (shorter ones padded at the end)
        rows = g.step_rows if g.gather is None else g.gather
        b, c = g.slots.shape[0], g.length
        qh = q[rows].view(b, c, *q.shape[1:]).transpose(1, 2)  # [B, H, C, Dh]
        kh = k[rows].view(b, c, *k.shape[1:]).transpose(1, 2)  # [B, KV, C, Dh]
        vh = v[rows].view(b, c, *v.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)  # [B, H, C, Dh]
        cache.k[layer][g.slots, :, :c] = kh  # positions 0..C-1 sit at cache indices 0..C-1 (C <= W)
        cache.v[layer][g.slots, :, :c] = vh
        return out.transpose(1, 2).reshape(b * c, *q.shape[1:])

    @staticmethod
    def _prefill(layer, q, k, v, p, cache):
        # C = chunk tokens, Lc = cached entries, KV = key/value heads
        k_slot, v_slot = cache.k[layer, p.slot], cache.v[layer, p.slot]  # [KV, W, Dh]
        if p.blocks is not None:
            out = SdpaBackend._prefill_blocks(q, k, v, p, k_slot, v_slot)
        else:
            keys = torch.cat([k_slot[:, : p.cached_len], k.transpose(0, 1)], dim=1)  # [KV, Lc+C, Dh]
            values = torch.cat([v_slot[:, : p.cached_len], v.transpose(0, 1)], dim=1)
            # 4-D with enable_gqa: SDPA's CPU flash kernel reads each KV head for its H/KV query
            # heads without copying it (3-D inputs fall back to the math path, ~4x slower here).
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys[None], values[None], attn_mask=p.bias, enable_gqa=True
            )[0].transpose(0, 1)  # [C, H, Dh]
        # Write after attending: the chunk's own writes may overwrite entries its first queries need.
        k_slot.index_copy_(1, p.write_index, k[p.write_from :].transpose(0, 1))
        v_slot.index_copy_(1, p.write_index, v[p.write_from :].transpose(0, 1))
        return out

    @staticmethod
    def _prefill_blocks(q, k, v, p, k_slot, v_slot):
        """A chunk of 2W tokens or more in W-query blocks (mixserve.model.cache.WindowBlocks):
        the first over the cache, the full ones after it as one batch, then the partial last."""
        # N = full blocks after the first, R = queries in the partial last block
        w, n, r = p.window, p.blocks.n_band, p.blocks.n_tail
        heads, dh = q.shape[1], q.shape[2]
        out = torch.empty_like(q)  # [C, H, Dh]
        kc, vc = k.transpose(0, 1), v.transpose(0, 1)  # [KV, C, Dh]
        keys = torch.cat([k_slot[:, : p.cached_len], kc[:, :w]], dim=1)  # [KV, Lc + W, Dh]
        values = torch.cat([v_slot[:, : p.cached_len], vc[:, :w]], dim=1)
        out[:w] = F.scaled_dot_product_attention(
            q[:w].transpose(0, 1)[None], keys[None], values[None], attn_mask=p.blocks.head_bias, enable_gqa=True
        )[0].transpose(0, 1)
        # Block b's keys are chunk rows bW - W + 1 .. bW + W - 1: windows of 2W - 1 rows every W rows.
        span = slice(1, (n + 1) * w)
        kb = kc[:, span].unfold(1, 2 * w - 1, w).permute(1, 0, 3, 2)  # [N, KV, 2W - 1, Dh]
        vb = vc[:, span].unfold(1, 2 * w - 1, w).permute(1, 0, 3, 2)
        qb = q[w:(n + 1) * w].view(n, w, heads, dh).transpose(1, 2)  # [N, H, W, Dh]
        out[w:(n + 1) * w] = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=p.blocks.band_bias, enable_gqa=True
        ).transpose(1, 2).reshape(n * w, heads, dh)
        if r:
            first_key = n * w + 1  # the tail's first query (N + 1) W sees back to (N + 1) W - W + 1
            out[(n + 1) * w:] = F.scaled_dot_product_attention(
                q[(n + 1) * w:].transpose(0, 1)[None], kc[None, :, first_key:], vc[None, :, first_key:],
                attn_mask=p.blocks.band_bias[:, :, :r, : w - 1 + r], enable_gqa=True,
            )[0].transpose(0, 1)
        return out


class FlashAttentionBackend:
    """flash-attn 2 on CUDA (the `gpu` extra), fp16/bf16 only.

    Decode: keys and values are written at position % W, then flash_attn_with_kvcache reads the
    first min(pos + 1, W) cache entries of each slot (their order does not matter: every cached
    position is inside the window). Prefill: the cached part is rolled into position order and
    the chunk appended, so causal attention aligned bottom-right with window_size = (W - 1, 0)
    is exactly sliding-window attention.
    """

    name = "flash"

    def __init__(self):
        from flash_attn import flash_attn_func, flash_attn_with_kvcache

        self._func, self._with_kvcache = flash_attn_func, flash_attn_with_kvcache

    def __call__(self, layer, q, k, v, meta, cache):
        out = torch.empty_like(q)
        k_pool = cache.k[layer].transpose(1, 2)  # [S, W, KV, Dh] view, head dim contiguous
        v_pool = cache.v[layer].transpose(1, 2)
        n_dec = meta.n_decode
        if n_dec:
            k_pool[meta.decode_slots, meta.decode_write_index] = k[:n_dec]
            v_pool[meta.decode_slots, meta.decode_write_index] = v[:n_dec]
            live = meta.decode_mask[:, 0, 0].sum(-1, dtype=torch.int32)  # [Bd]
            out[:n_dec] = self._with_kvcache(
                q[:n_dec, None], k_pool, v_pool, cache_seqlens=live,
                cache_batch_idx=meta.decode_slots.to(torch.int32), causal=False,
            )[:, 0]
        for p in meta.prefills:
            rows = slice(p.token_offset, p.token_offset + p.length)
            start = p.start % cache.window
            cached_k, cached_v = k_pool[p.slot, : p.cached_len], v_pool[p.slot, : p.cached_len]
            if p.cached_len == cache.window:  # wrapped: the oldest position sits at start % W
                cached_k, cached_v = cached_k.roll(-start, 0), cached_v.roll(-start, 0)
            keys = torch.cat([cached_k, k[rows]])[None]  # [1, Lc + C, KV, Dh]
            values = torch.cat([cached_v, v[rows]])[None]
            out[rows] = self._func(q[rows][None], keys, values, causal=True, window_size=(cache.window - 1, 0))[0]
            written = slice(p.token_offset + p.write_from, p.token_offset + p.length)  # the chunk's last W
            k_pool[p.slot, p.write_index] = k[written]
            v_pool[p.slot, p.write_index] = v[written]
        return out


def make_backend(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """Picks the attention backend at start-up: 'sdpa', 'flash' (GPU extra) or 'auto'
    (flash-attn on CUDA with fp16/bf16 when it is installed, SDPA otherwise)."""
    flash_fits = torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name == "sdpa":
        return SdpaBackend()
    if name == "auto":
        if flash_fits:
            try:
                return FlashAttentionBackend()
            except ImportError:
                pass
        return SdpaBackend()
    if name == "flash":
        if not flash_fits:
            raise ValueError("attention_backend='flash' needs device='cuda' and dtype bfloat16 or float16")
        try:
            return FlashAttentionBackend()
        except ImportError:
            raise ValueError("attention_backend='flash' needs flash-attn: pip install 'mixserve[gpu]'") from None
    raise ValueError(f"unknown attention backend {name!r}; choose 'auto', 'sdpa' or 'flash'")
