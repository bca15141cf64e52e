"""Start-up settings of one engine (one attention replica, or the whole model in one process)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(
        32, ge=1, description="Most sequences running at once; each holds one rolling-cache slot."
    )
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="Longest prompt + output in tokens. Defaults to the model's max_position_embeddings.",
    )
    max_num_batched_tokens: int = Field(
        1024, ge=1, description="Token budget of one step, shared by decodes and prefill chunks."
    )
    prefill_chunk_size: int | None = Field(
        None,
        ge=1,
        description="Longest prompt chunk per sequence per step (it may span several sliding "
        "windows: each token still attends to exactly its window). Defaults to the token budget.",
    )
    kv_cache_memory_gb: float = Field(
        4.0,
        gt=0,
        description="Memory for the rolling KV cache pool; bounds the number of slots so load "
        "can never exhaust memory.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight and activation dtype (float32 on CPUs without bf16 units)."
    )
    device: str = Field("cpu", description="torch device for weights and caches, e.g. 'cpu' or 'cuda'.")
    attention_backend: Literal["auto", "sdpa", "flash"] = Field(
        "auto", description="Attention kernel: PyTorch SDPA, or flash-attn on GPUs (the 'gpu' extra)."
    )
    moe_kernel: Literal["auto", "torch", "zentorch"] = Field(
        "auto",
        description="Kernel for in-process experts: 'torch' the grouped oneDNN GEMMs; 'zentorch' each MoE layer as "
        "one fused kernel (AMD's ZenDNN plugin, the 'amd' extra; 10 to 60% faster decode and prefill than the "
        "grouped GEMMs on the EPYC machines measured, see mixserve/model/moe_kernels.py); 'auto' takes zentorch "
        "when it is installed and passes its start-up check, else the grouped GEMMs.",
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; default leaves torch's own choice."
    )
    prefill_num_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads for prefill-heavy steps (more than 64 tokens); other steps use "
        "num_threads. Lets a replica that shares its cores with its event loop decode on one thread (no "
        "oversubscribed thread barriers) yet prefill arriving prompts on more, which cuts time to first token. "
        "None: every step uses num_threads.",
    )
    heavy_op_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads for each step's heaviest ops, the LM head and the in-process "
        "experts (or dense MLP), or with the experts on shards the LM head and the attention projections, which "
        "stream most of a decode step's weights in a few large parallel regions; "
        "the step's other ops keep num_threads. Lets a replica that decodes on one thread beside its event "
        "loop still use a second core where it pays most (mixserve/model/threads.py). None: no change.",
    )
    micro_batches: int = Field(
        1,
        ge=1,
        le=8,
        description="Ping-pong: split each step's batch into this many micro-batches so that one's "
        "attention runs while the expert shards compute another's (MegaScale-Infer). Helps only with "
        "remote experts; 1 turns it off.",
    )
    step_loop: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="Where a serving replica steps its engine: 'process' in a child process of its own, so the "
        "replica's event loop (HTTP, gRPC, streaming, all Python) never holds the GIL that every torch op of a "
        "step needs back (mixserve/replicas/engine_process.py); 'thread' in a thread of the replica, which "
        "remote experts need (the child is no Ray worker and cannot call the shards); 'auto' takes 'process' "
        "when the experts are in-process and 'thread' otherwise. The Python LLM API always steps in its caller.",
    )
    arrival_wait_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="Most an idle engine waits, once requests reach it, for the ones its front door has received and "
        "not handed over yet (the front door says how many), so a burst shares one prefill step instead of queueing "
        "behind a first, lone one. A request arriving alone waits nothing. 0 turns it off.",
    )
    seed: int = Field(0, description="Seed of the generator used by sampled requests that set no seed.")

    @model_validator(mode="after")
    def _budget_covers_decodes(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so that every running sequence can decode each step"
            )
        return self
