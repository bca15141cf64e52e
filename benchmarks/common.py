"""Helpers shared by the benchmark scripts: timing, machine facts, tables, RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wait_until_idle(max_busy: float = 0.15, window_s: float = 0.1, timeout_s: float = 10.0) -> None:
    """Block until the machine's CPUs were at most `max_busy` busy over the last `window_s`.

    Engines kept loaded side by side do not go quiet when a run returns (vLLM's engine process
    keeps a core busy for about a second afterwards), and on 2 cores that lands on whichever
    engine runs next. Linux only; elsewhere it returns at once."""
    deadline = time.monotonic() + timeout_s
    previous = _cpu_times()
    while previous is not None and time.monotonic() < deadline:
        time.sleep(window_s)
        current = _cpu_times()
        busy, total = current[0] - previous[0], current[1] - previous[1]
        if total > 0 and busy / total <= max_busy:
            return
        previous = current


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def copy_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB copied per second (each byte read once and written once), best of `repeats`."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return n_bytes / best / 1e9


def read_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB read per second by torch's threads summing a buffer far larger than any cache, best of
    `repeats`: what weight-streaming decode can reach at best. (On the 2-core CI VM it is about
    2.4x the copy figure: a copy also writes, and one thread alone does not saturate memory.)"""
    src = torch.ones(n_bytes // 4)
    src.sum()
    best = min(_timed(src.sum) for _ in range(repeats))
    return n_bytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine_description() -> str:
    """CPU model, vector units, last-level cache, cores, memory and software: machines of one name
    differ (this project's CI class has been both AMD EPYC and Intel Xeon), and a last-level cache
    of hundreds of MiB holds a small model's whole weights."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first core's lines are enough
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cpu = model or platform.processor() or "unknown CPU"
    units = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
             if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    if units:
        cpu += f" ({', '.join(units)})"
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()  # e.g. "491520K"
        cpu += f", L3 {int(size[:-1]) // 1024} MiB" if size.endswith("K") else f", L3 {size}"
    except (OSError, ValueError):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, rule, *body])


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_results(section: str, body: str) -> None:
    """Replaces this benchmark's section of RESULTS.md (between its markers) with `body`."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- {section}:start -->\n## {section}\n\n"
        f"- command: `{command}`\n- machine: {machine_description()}\n- revision: {git_revision()}, {stamp}\n\n"
        f"{body.strip()}\n<!-- {section}:end -->"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nLatest figures of each script in benchmarks/, rewritten by the script itself.\n"
    pattern = re.compile(rf"<!-- {re.escape(section)}:start -->.*?<!-- {re.escape(section)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
