"""The continuous-batching engine: step() = schedule -> run the model -> post-process.

Single-threaded by design: callers (the LLM facade, the Serve replica) own concurrency and
call add_request / abort / step from one thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mixserve.errors import ContextLengthError, InvalidRequestError
from mixserve.model import (
    MicroBatch,
    ModelArgs,
    RollingKVCache,
    SequenceChunk,
    Transformer,
    build_step_metadata,
    load_model,
)
from mixserve.model.allocator import keep_freed_memory
from mixserve.model.attention_backends import make_backend
from mixserve.model.factory import DTYPES
from mixserve.model.weights_source import WeightsSource, as_weights_source
from mixserve.replicas.detokenizer import IncrementalDetokenizer
from mixserve.replicas.engine_config import EngineConfig
from mixserve.replicas.sampler import sample, token_logprobs
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.scheduler import ScheduledChunk, Scheduler, split_micro_batches
from mixserve.replicas.sequence import RequestOutput, Sequence, Status
from mixserve.replicas.tokenizer import Tokenizer

# A step with more tokens than this carries prompt chunks (decodes are one token per sequence).
WIDE_STEP_TOKENS = 64


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig):
        keep_freed_memory()  # the process's step temporaries reuse its heap (mixserve/model/allocator.py)
        self.model = model
        self.args: ModelArgs = model.args
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        if self.max_model_len > model.rope.cos.shape[0]:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the {model.rope.cos.shape[0]} positions the model "
                "was built for (max_position_embeddings)"
            )
        # Sliding-window models keep W positions; full-attention ones keep the whole context.
        self.window = min(self.args.sliding_window or self.max_model_len, self.max_model_len)
        dtype = DTYPES[config.dtype]
        bytes_per_slot = 2 * self.args.n_layers * self.args.n_kv_heads * self.window * self.args.head_dim
        bytes_per_slot *= torch.finfo(dtype).bits // 8
        n_slots = min(config.max_num_seqs, int(config.kv_cache_memory_gb * 1024**3 // bytes_per_slot))
        if n_slots < 1:
            raise ValueError(
                f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds no sequence of {self.window} "
                f"positions ({bytes_per_slot / 1024**2:.0f} MiB each); raise it or lower max_model_len"
            )
        self.cache = RollingKVCache(self.args, n_slots, self.window, dtype, config.device)
        # A chunk may span several windows (mixserve.model.cache): the step budget bounds it.
        chunk = config.prefill_chunk_size or config.max_num_batched_tokens
        self.scheduler = Scheduler(n_slots, max(config.max_num_batched_tokens, n_slots), chunk)
        self.model.backend = make_backend(config.attention_backend, config.device, dtype)
        self.model.heavy_op_threads = config.heavy_op_threads
        # Cleared by a front end while a caller waits for its first token (see AsyncEngine): the
        # heavy ops then keep the step's own thread count and leave a core to the event loop.
        self.widen_heavy_ops = True
        self._requests: dict[str, Sequence] = {}
        self._generator = torch.Generator().manual_seed(config.seed)
        self._threads_now: int | None = None  # intra-op threads set by the last step (prefill_num_threads)
        self._decode_threads: int | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | WeightsSource, config: EngineConfig | None = None) -> LLMEngine:
        config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        source = as_weights_source(checkpoint)
        args = ModelArgs.from_folder(source.folder())
        max_len = config.max_model_len or args.max_position_embeddings
        if max_len > args.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings ({args.max_position_embeddings})"
            )
        model = load_model(
            source, max_positions=max_len, dtype=DTYPES[config.dtype], device=config.device, moe_kernel=config.moe_kernel
        )
        return cls(model, Tokenizer.from_checkpoint(source.folder()), config)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        tenant: str = "",
        weight: float = 1.0,
    ) -> None:
        """Validates and queues a request; raises InvalidRequestError and queues nothing if bad.

        A text prompt gets BOS prepended; a token-id prompt is used exactly as given. With
        chat=True the first streamed piece loses its leading space (answers follow "[/INST] ").
        """
        params = params or SamplingParams()
        params.validate()  # SamplingParams is mutable: check again what actually runs
        if not weight > 0:
            raise InvalidRequestError(f"weight must be > 0, got {weight}", "weight")
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        prompt_ids = self._prompt_ids(prompt)
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the model's context of {self.max_model_len} tokens",
                "max_tokens",
            )
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, strip_leading_space=chat),
            generator=generator,
            arrival=time.monotonic(),
            tenant=tenant,
            weight=weight,
        )
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", "prompt")
            return self.tokenizer.encode(prompt, bos=True)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string or list of token ids", "prompt")
        vocab = self.args.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt has {len(bad)} token ids outside the vocabulary [0, {vocab}), e.g. {bad[0]!r}", "prompt"
            )
        return list(prompt)

    def abort(self, request_id: str) -> bool:
        """Ends the request now and frees its cache slot; False if it is unknown or already done."""
        seq = self._requests.pop(request_id, None)
        if seq is None or seq.status is Status.FINISHED:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_request(self, request_id: str) -> bool:
        """True while the request is queued or running."""
        return request_id in self._requests

    def request_ids(self) -> list[str]:
        """The requests not finished yet (waiting or running)."""
        return list(self._requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Runs one model step over the scheduled batch; returns the requests that advanced."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        self._choose_threads(chunks)
        groups = split_micro_batches(chunks, self.config.micro_batches)
        chunks = [c for group in groups for c in group]  # logits come back in this order
        batches: list[MicroBatch] = []
        row_spans: list[tuple[int, int]] = []  # per chunk: its rows in the logits tensor
        for group in groups:
            batch, spans = self._micro_batch(group, first_row=row_spans[-1][1] if row_spans else 0)
            batches.append(batch)
            row_spans.extend(spans)
        if len(batches) == 1:
            logits = self.model(batches[0].tokens, batches[0].meta, self.cache, batches[0].logit_rows)
        else:
            logits = self.model.forward_micro_batches(batches, self.cache)
        logits = logits.cpu()

        # Everything that can fail (sampling, log-probs) runs before any sequence state changes,
        # so an exception leaves every request where it was and the caller can abort cleanly.
        sampling = [(c, end - 1) for c, (_, end) in zip(chunks, row_spans) if c.completes_prompt]
        seqs = [c.seq for c, _ in sampling]
        rows = _rows_of(logits, [row for _, row in sampling])
        new_tokens = sample(rows, [s.params for s in seqs], [s.generator for s in seqs], self._generator)
        wants_lp = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        token_lps = token_logprobs(
            rows[wants_lp], [new_tokens[i] for i in wants_lp], [seqs[i].params.logprobs for i in wants_lp]
        ) if wants_lp else []
        prompt_lps = [
            self._prompt_logprobs(c, logits[first:end]) if c.seq.wants_prompt_logprobs and c.seq.in_prefill else []
            for c, (first, end) in zip(chunks, row_spans)
        ]

        for chunk, lps in zip(chunks, prompt_lps):
            chunk.seq.num_computed += chunk.length
            if lps:
                chunk.seq.prompt_logprobs.extend(lps)
        for i, lp in zip(wants_lp, token_lps):
            seqs[i].logprobs.append(lp)
        outputs = []
        for seq, token in zip(seqs, new_tokens):
            self._append_token(seq, token)
            outputs.append(seq.snapshot())
            if seq.status is Status.FINISHED:
                self._requests.pop(seq.request_id, None)
        return outputs

    def _choose_threads(self, chunks: list[ScheduledChunk]) -> None:
        """prefill_num_threads for a prefill-heavy step, else num_threads. Measured with 16 clients
        streaming 64-token completions on the 2-core CI machine, the engine alone: 1 decode thread
        and 2 prefill threads gave time to first token p50 37-44 ms and p99 71-79 ms against 50-71
        and 101-133 ms with 1 thread throughout, at equal or better tokens/s (2 threads throughout
        halves tokens/s there: the event loop's thread preempts an OpenMP worker at every barrier).
        Set in the stepping thread: torch's thread count applies to the thread that sets it."""
        self.model.heavy_op_threads = self.config.heavy_op_threads if self.widen_heavy_ops else None
        wide = self.config.prefill_num_threads
        if wide is None:
            return
        tokens = sum(c.length for c in chunks)
        if self._decode_threads is None:  # read in the stepping thread, at its first step
            self._decode_threads = self.config.num_threads or torch.get_num_threads()
        want = wide if tokens > WIDE_STEP_TOKENS else self._decode_threads
        if want != self._threads_now:
            torch.set_num_threads(want)
            self._threads_now = want

    def _micro_batch(self, chunks: list[ScheduledChunk], first_row: int) -> tuple[MicroBatch, list[tuple[int, int]]]:
        """Model inputs of one micro-batch, and each chunk's logit rows (numbered from first_row)."""
        tokens: list[int] = []
        seq_chunks: list[SequenceChunk] = []
        logit_rows: list[int] = []
        spans = []
        for chunk in chunks:
            seq = chunk.seq
            offset = len(tokens)
            tokens.extend(seq.next_input(chunk.length))
            seq_chunks.append(SequenceChunk(seq.slot, seq.num_computed, chunk.length))
            first = len(logit_rows)
            if seq.wants_prompt_logprobs and seq.in_prefill:
                logit_rows.extend(range(offset, offset + chunk.length))
            elif chunk.completes_prompt:
                logit_rows.append(offset + chunk.length - 1)
            spans.append((first_row + first, first_row + len(logit_rows)))
        device = self.config.device
        batch = MicroBatch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            meta=build_step_metadata(seq_chunks, self.window, device, self.cache.k.dtype),
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
        )
        return batch, spans

    @staticmethod
    def _prompt_logprobs(chunk: ScheduledChunk, logits: torch.Tensor) -> list:
        """Row r of the chunk predicts the prompt token at position start + r + 1."""
        seq, start = chunk.seq, chunk.seq.num_computed
        targets = [seq.prompt_ids[p + 1] for p in range(start, start + chunk.length) if p + 1 < seq.prompt_len]
        if not targets:
            return []
        return token_logprobs(logits[: len(targets)], targets, [seq.params.prompt_logprobs] * len(targets))

    def _append_token(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        seq.output_ids.append(token)
        stop_token = token in params.stop_token_ids or (token == self.args.eos_token_id and not params.ignore_eos)
        if not stop_token:
            before = len(seq.text)
            seq.text += seq.detokenizer.add(token)
            if params.stop and self._cut_at_stop_string(seq, before):
                self.scheduler.finish(seq, "stop")
                return
        if stop_token:
            seq.text += seq.detokenizer.flush()
            self.scheduler.finish(seq, "stop")
        elif len(seq.output_ids) >= params.max_tokens:
            seq.text += seq.detokenizer.flush()
            self.scheduler.finish(seq, "length")

    @staticmethod
    def _cut_at_stop_string(seq: Sequence, before: int) -> bool:
        """Truncates the text at the earliest stop string that the new text completed."""
        search_from = max(0, before - seq.params.max_stop_len + 1)
        hits = [i for i in (seq.text.find(s, search_from) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[: min(hits)]
        seq.emitted_text_len = min(seq.emitted_text_len, len(seq.text))
        return True


def _rows_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows]; a view when the rows are consecutive, as in every decode-only step. Why:
    the gathered copy of [16, 32000] float32 took 1.1 ms of a 13 ms tiny-mixtral decode step on
    one thread of the 2-core CI machine (a fresh 2 MB tensor, its pages faulted in)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0]:rows[0] + len(rows)]
    return logits[rows]
