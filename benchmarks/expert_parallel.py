"""Expert parallelism: the disaggregated topology against the single-process engine.

For each model, in one run on a local Ray cluster:
- decode tokens/s at concurrency 1, 8 and 32 (16-token prompts, ignore_eos), for the
  single-process engine and for the attention engine dispatching to expert shard actors
  (TCP channels), with ping-pong micro-batches off and on;
- the per-layer dispatch breakdown (gate, route and pack, send, exposed wait, expert compute
  as the shards report it, send + receive, combine) against the raw round trip of the same
  transport and payload (a round trip through the same shards that computes nothing, measured
  in the same run);
- load balance (max/mean tokens per shard) and tokens/s before and after replicating the
  hottest expert, on a checkpoint whose gates favour one expert (and on the demo checkpoint).

The attention side runs in this process, as the engine inside an attention replica does (with
the replica's environment, GOMP_SPINCOUNT: mixserve/platform/ray_env.py); the
Serve and HTTP layers in front of it are not part of these figures. Decode tokens/s =
N * (new - 1) / (t(new tokens) - t(1 token)).

Run:
    .venv/bin/python benchmarks/expert_parallel.py                 # both models (about 5 min here)
    .venv/bin/python benchmarks/expert_parallel.py --quick         # tiny-mixtral, fewer tokens
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixserve.platform.ray_env import remote_experts_replica_env  # noqa: E402

# This process is the attention side: it gets the environment mixserve gives such replicas, read
# by OpenMP when torch loads (the single-process engine beside it runs with it too).
os.environ.update(remote_experts_replica_env())

import torch  # noqa: E402

from benchmarks.common import ROOT, format_table, median_time, write_results  # noqa: E402
from benchmarks.engine import ensure_checkpoint, prompts  # noqa: E402
from benchmarks.transport import summarize, time_round_trips  # noqa: E402
from mixserve import SamplingParams  # noqa: E402
from mixserve.expert_shards.actors import ShardGroup, start_shard_group  # noqa: E402
from mixserve.expert_shards.channel import TcpTransport  # noqa: E402
from mixserve.expert_shards.dispatch import ShardClient, ShardRequest, remote_feed_forward  # noqa: E402
from mixserve.expert_shards.placement import Placement, max_over_mean  # noqa: E402
from mixserve.model import ModelArgs, load_model  # noqa: E402
from mixserve.model.moe import top_k_gating  # noqa: E402
from mixserve.model.threads import intra_op_threads  # noqa: E402
from mixserve.replicas.engine import LLMEngine  # noqa: E402
from mixserve.replicas.engine_config import EngineConfig  # noqa: E402
from mixserve.replicas.tokenizer import Tokenizer  # noqa: E402

N_SHARDS = 2  # one per core of the CI machine
DEFAULT_THREADS = torch.get_num_threads()
HOT_EXPERT = 3


def run_to_completion(engine: LLMEngine, batch: list[list[int]], new_tokens: int) -> None:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished():
        engine.step()


def decode_tok_s(engine: LLMEngine, n: int, new_tokens: int, repeats: int, threads: int | None = None) -> float:
    """Decode tokens/s at concurrency n, with `threads` torch threads in this process."""
    torch.set_num_threads(threads or DEFAULT_THREADS)
    batch = prompts(n, 16, 2)
    t_full = median_time(lambda: run_to_completion(engine, batch, new_tokens), repeats)
    t_one = median_time(lambda: run_to_completion(engine, batch, 1), repeats)
    return n * (new_tokens - 1) / (t_full - t_one)


def interleaved_decode_tok_s(runs: list[tuple[LLMEngine, int | None]], n: int, new_tokens: int, repeats: int) -> list[float]:
    """decode_tok_s for several engines (each with its torch threads), measured in alternating
    rounds so that the VM's drift over minutes hits them alike; the median round of each."""
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, (engine, threads) in enumerate(runs):
            rates[i].append(decode_tok_s(engine, n, new_tokens, 1, threads))
    return [statistics.median(r) for r in rates]


def engine_config(max_seqs: int, micro_batches: int = 1, heavy_op_threads: int | None = None) -> EngineConfig:
    return EngineConfig(max_model_len=512, max_num_seqs=max_seqs, max_num_batched_tokens=512, micro_batches=micro_batches,
                        heavy_op_threads=heavy_op_threads)


@dataclass
class Topology:
    group: ShardGroup
    client: ShardClient
    engines: dict[int, LLMEngine]  # micro_batches -> engine (one model, one cache each)
    threads: int  # torch threads of the attention side (this process) while it runs

    def close(self) -> None:
        self.client.transport.close()
        self.group.shutdown()


def start_topology(folder: Path, placement: Placement, max_seqs: int, threads: int, heavy_op_threads: int | None) -> Topology:
    group = start_shard_group(folder, placement, cpus_per_shard=1, num_threads=1)
    transport = TcpTransport({sid: info.address for sid, info in group.infos.items()})
    client = ShardClient(placement, transport)
    model = load_model(folder, max_positions=512, feed_forward_factory=remote_feed_forward(client))
    tokenizer = Tokenizer.from_checkpoint(folder)
    engines = {mb: LLMEngine(model, tokenizer, engine_config(max_seqs, mb, heavy_op_threads)) for mb in (1, 2)}
    return Topology(group, client, engines, threads)


def measure_shard_round_trip(topo: Topology, rows: int, dim: int, k: int, iters: int, gap_s: float = 0.0,
                             between: Callable[[], object] | None = None) -> dict[str, float]:
    """The raw round trip of the topology's own transport: the same shard processes (pinned as
    in decode), channels and reply buffers, each shard sent [rows, dim] whose slots all belong
    elsewhere (expert id -1), so it computes nothing and answers zeros. Each sample is the wall
    time less the slowest shard's reported compute (its checks of the ids), the subtraction the
    dispatch overhead makes. With gap_s the sender idles that long first, as between layers; with
    `between` it runs that first (untimed), as its attention does before a layer's dispatch."""
    transport = topo.client.transport
    requests = {shard: ShardRequest(torch.randn(rows, dim), torch.full((rows, k), -1), torch.zeros(rows, k),
                                    reply_into=torch.empty(rows, dim))
                for shard in range(topo.client.placement.n_shards)}
    return summarize(time_round_trips(transport, requests, iters, gap_s, between, less_compute=True))


def gate_ms(folder: Path, engine: LLMEngine, n_tokens: int) -> float:
    """One layer's gate (logits + top-2) on n_tokens rows, as the attention side runs it."""
    args = ModelArgs.from_folder(folder)
    moe = engine.model.layers[0].feed_forward
    x = torch.randn(n_tokens, args.dim)
    with torch.inference_mode():
        return 1e3 * median_time(lambda: top_k_gating(moe.gate(x), args.num_experts_per_tok), 200)


def attention_projections(engine: LLMEngine, dim: int, n_tokens: int, threads: int | None) -> Callable[[], object]:
    """One layer's attention projections (wqkv, then wo) on n_tokens rows, on the threads the
    attention side gives them: most of the bytes a replica streams between two MoE layers, so
    the caches the dispatch code then finds are the ones it finds in decode."""
    attention = engine.model.layers[0].attention
    x = torch.randn(n_tokens, dim)
    heads = torch.randn(n_tokens, attention.n_heads * attention.head_dim)

    def run() -> object:
        with torch.inference_mode(), intra_op_threads(threads):
            return attention.wqkv(x), attention.wo(heads)

    return run


def breakdown(topo: Topology, folder: Path, n: int, new_tokens: int) -> dict[str, float]:
    """Per-layer-call averages (ms) over a decode run at concurrency n, ping-pong off."""
    engine = topo.engines[1]
    torch.set_num_threads(topo.threads)
    run_to_completion(engine, prompts(n, 16, 3), 4)  # warm-up
    stats = topo.client.stats
    stats.reset()
    start = time.perf_counter()
    run_to_completion(engine, prompts(n, 16, 4), new_tokens)
    elapsed = time.perf_counter() - start
    keys = ("route_s", "send_s", "wait_s", "expert_s", "to_shard_s", "from_shard_s", "combine_s")
    per = {k: 1e3 * getattr(stats, k) / stats.calls for k in keys}
    # What the shards idle between layers: all but the waits (the adds of answers are apart from
    # them, and a shard still computing while an earlier answer is added is not idle: left out).
    per["gap_s"] = 1e3 * (elapsed - stats.wait_s - stats.combine_s) / stats.calls
    per["gate_s"] = gate_ms(folder, engine, n)
    per["transfer_s"] = per["wait_s"] - per["expert_s"]
    per["overhead_s"] = per["route_s"] + per["send_s"] + per["transfer_s"] + per["combine_s"]
    per["overhead_median_s"] = 1e3 * statistics.median(stats.overheads_s)
    return per


def balance_run(topo: Topology, n: int, new_tokens: int, repeats: int) -> tuple[float, float, list[int]]:
    """(max/mean tokens per shard, decode tok/s, tokens per expert) at concurrency n."""
    client = topo.client
    shards_before, experts_before = list(client.tokens_sent), list(client.expert_tokens)
    rate = decode_tok_s(topo.engines[1], n, new_tokens, repeats, topo.threads)
    shard_tokens = [a - b for a, b in zip(client.tokens_sent, shards_before)]
    expert_tokens = [a - b for a, b in zip(client.expert_tokens, experts_before)]
    return max_over_mean(shard_tokens), rate, expert_tokens


def replicate_hottest(topo: Topology, expert_tokens: list[int]) -> Placement:
    """What the router's rebalance does: load the copy on its shard, then publish."""
    import ray

    old = topo.client.placement
    new = old.replicate_hottest(expert_tokens, count=1)
    added = [(e, s) for e, holders in enumerate(new.holders) for s in holders if s not in old.holders[e]]
    ray.get([topo.group.actors[s].add_expert.remote(e) for e, s in added])
    topo.client.set_placement(new)
    return new


def skewed_checkpoint(base: str) -> Path:
    """The demo checkpoint with every gate favouring HOT_EXPERT (about half the tokens pick it first)."""
    from mixserve.model.presets import preset
    from mixserve.platform.demo_checkpoint import favour_expert, random_hf_tensors, write_checkpoint

    folder = ROOT / "checkpoints" / f"{base}-skewed"
    if (folder / "config.json").is_file():
        return folder
    args = preset(base)
    return write_checkpoint(folder, args, tensors=favour_expert(random_hf_tensors(args, seed=0), args, HOT_EXPERT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mixtral,small-mixtral")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention-threads", type=int, default=1,
                        help="torch threads of the attention side while the shards run (the shards take the other cores)")
    parser.add_argument("--heavy-op-threads", type=int, default=DEFAULT_THREADS,
                        help="the attention side's threads for its LM head and attention projections, which run "
                        "while the shards wait (EngineConfig.heavy_op_threads); 0 for the attention threads")
    parser.add_argument("--quick", action="store_true", help="tiny-mixtral, c=1,8, 16 tokens, 1 repeat")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ns = parser.parse_args()
    if ns.quick:
        ns.models, ns.concurrency, ns.new_tokens, ns.repeats = "tiny-mixtral", "1,8", 16, 1
    concurrency = [int(c) for c in ns.concurrency.split(",")]
    heavy = ns.heavy_op_threads or None
    top = max(concurrency)

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sections = []
    shard_kernels = set()  # what the shards' default MoE kernel resolved to
    pack_paths = set()  # the replica's pack and add: compiled (dispatch_kernel.py), or numpy and torch without a compiler
    for model_name in ns.models.split(","):
        folder = ensure_checkpoint(model_name)
        args = ModelArgs.from_folder(folder)
        single = LLMEngine.from_checkpoint(folder, engine_config(top))
        run_to_completion(single, prompts(2, 16, 0), 4)  # warm-up
        placement = Placement.contiguous(args.num_experts, N_SHARDS, capacity=args.num_experts // N_SHARDS + 1)
        topo = start_topology(folder, placement, top, ns.attention_threads, heavy)
        shard_kernels.update(info.moe_kernel for info in topo.group.infos.values())
        pack_paths.add("compiled" if topo.client.kernel is not None else "numpy and torch calls")
        try:
            for engine in topo.engines.values():
                run_to_completion(engine, prompts(2, 16, 0), 4)
            rows = []
            for n in concurrency:
                base, off, on = interleaved_decode_tok_s(
                    [(single, None), (topo.engines[1], topo.threads), (topo.engines[2], topo.threads)],
                    n, ns.new_tokens, ns.repeats)
                print(f"  {model_name} c={n}: single {base:.1f}, disaggregated {off:.1f}, ping-pong {on:.1f}", flush=True)
                rows.append([f"decode c={n}", base, off, on, off / base, on / base])
            throughput = format_table(
                ["tokens/s", "single process", "disaggregated", "disaggregated + ping-pong", "x single", "x single (ping-pong)"],
                rows,
            )

            parts = breakdown(topo, folder, top, ns.new_tokens)
            rows_per_shard = top * args.num_experts_per_tok // N_SHARDS
            k = args.num_experts_per_tok
            raw = measure_shard_round_trip(topo, rows_per_shard, args.dim, k, 200)
            raw_gapped = measure_shard_round_trip(topo, rows_per_shard, args.dim, k, 100, gap_s=parts["gap_s"] / 1e3)
            raw_after_attention = measure_shard_round_trip(
                topo, rows_per_shard, args.dim, k, 100, between=attention_projections(topo.engines[1], args.dim, top, heavy))
            labels = [("gate_s", "gate (logits + top-2)"), ("route_s", "route and pack"), ("send_s", "send (hand to the channel)"),
                      ("to_shard_s", "request on the wire (last shard to answer)"),
                      ("expert_s", "expert compute (slowest shard)"),
                      ("from_shard_s", "reply on the wire (last shard to answer)"),
                      ("wait_s", "wait (blocked from send to last answer, less the adds made meanwhile)"),
                      ("transfer_s", "wait - expert compute"),
                      ("combine_s", "combine (each answer added as it arrives)"),
                      ("overhead_s", "dispatch overhead (route + send + wait - compute + combine), mean"),
                      ("overhead_median_s", "dispatch overhead, median layer call")]
            echo = f"[{rows_per_shard}, {args.dim}] to each of the {N_SHARDS} shards and back"
            split = format_table(["per MoE layer, ms", f"c={top}"], [[label, parts[key]] for key, label in labels] + [
                [f"raw round trip, {echo}, back to back: median / mean", f"{raw['median_ms']:.2f} / {raw['mean_ms']:.2f}"],
                ["overhead / raw round trip (back to back): median / median, mean / mean",
                 f"{parts['overhead_median_s'] / raw['median_ms']:.2f} / {parts['overhead_s'] / raw['mean_ms']:.2f}"],
                ["idle gap the shards see between layers in the decode run", parts["gap_s"]],
                ["raw round trip, the same after that idle gap (median)", raw_gapped["median_ms"]],
                ["overhead / raw round trip (after the gap), median / median", parts["overhead_median_s"] / raw_gapped["median_ms"]],
                ["raw round trip, the same right after one layer's attention projections (median)",
                 raw_after_attention["median_ms"]],
                ["overhead / raw round trip (after the projections), median / median",
                 parts["overhead_median_s"] / raw_after_attention["median_ms"]],
            ])
            balance_rows = []
            imbalance, rate, expert_tokens = balance_run(topo, top, ns.new_tokens, 1)
            balance_rows.append([f"{model_name} (demo gates)", "before", imbalance, rate])
            print(f"  {model_name} balance before {imbalance:.2f}", flush=True)
        finally:
            topo.close()
        del single

        if model_name == ns.models.split(",")[0]:
            skewed = skewed_checkpoint(model_name)
            topo = start_topology(skewed, placement, top, ns.attention_threads, heavy)
            try:
                run_to_completion(topo.engines[1], prompts(2, 16, 0), 4)
                imbalance, rate, expert_tokens = balance_run(topo, top, ns.new_tokens, ns.repeats)
                balance_rows.append([f"{model_name}, gates favour expert {HOT_EXPERT}", "before", imbalance, rate])
                new = replicate_hottest(topo, expert_tokens)
                imbalance, rate, _ = balance_run(topo, top, ns.new_tokens, ns.repeats)
                copies = {e: h for e, h in enumerate(new.holders) if len(h) > 1}
                balance_rows.append([f"{model_name}, gates favour expert {HOT_EXPERT}", f"after copying {copies}", imbalance, rate])
            finally:
                topo.close()
        balance = format_table(["checkpoint", "placement", f"max/mean shard load (c={top})", "decode tok/s"], balance_rows)
        text = (f"### {model_name}\n\nDecode tokens/s (the peer: the single-process engine, same run)\n\n{throughput}\n\n"
                f"Per-layer dispatch breakdown (ping-pong off)\n\n{split}\n\nLoad balance\n\n{balance}")
        print("\n" + text, flush=True)
        sections.append(text)
    ray.shutdown()
    if not ns.no_write:
        write_results(
            "Expert parallelism: disaggregated vs single process",
            f"{N_SHARDS} expert shard actors (1 CPU, 1 torch thread each, MoE kernel {'/'.join(sorted(shard_kernels))}; "
            "TCP channels), the attention engine in "
            f"the driver process ({ns.attention_threads} torch thread(s), {ns.heavy_op_threads or ns.attention_threads} for the "
            "LM head and the attention projections, which run while the shards wait; its dispatch's pack and add: "
            f"{'/'.join(sorted(pack_paths))}); the single-process engine in the same process "
            f"({DEFAULT_THREADS} threads), same "
            f"checkpoint, same run. {ns.new_tokens} new tokens, 16-token prompts, medians of {ns.repeats} rounds, "
            "the three engines alternating within each round. "
            "'x single' > 1 means the topology is faster. The dispatch overhead is given as the mean over layer calls "
            "(the sum of the parts above it) and as the median layer call; each is set against the raw round trip's median and "
            "mean (a few calls a hundred that the VM's scheduler delays by milliseconds move a mean, not a median). "
            "The raw round trip goes through the topology's own shards and TCP channels (each shard sent "
            "[rows, dim] with every slot marked as computed elsewhere, so it answers zeros at once; its reported compute, "
            "the checks of the ids, is subtracted as the overhead subtracts the experts' compute). It is measured "
            "three times: back to back "
            "(the transport's best case, all its code and data in cache); after the idle gap the shards really see "
            "between layers (on this VM a core that idled a few ms takes far longer to wake, whatever carries the "
            "bytes); and right after one layer's attention projections, which leave the sender's caches as a decode "
            "layer's dispatch finds them (the same channel code then runs 1.4 to 2 times as long, its Python and the "
            "kernel's socket path starting cold).\n\n" + "\n\n".join(sections),
        )


if __name__ == "__main__":
    main()
