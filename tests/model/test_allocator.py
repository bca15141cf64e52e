"""The engine's allocator setting: freed temporaries are reused, not faulted in afresh."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import pytest

from mixserve.model.allocator import is_glibc

# Run in a fresh interpreter: the setting is per process. The script first pins glibc's mmap
# threshold low, the state a process's own history can leave it in, where every 8 MiB tensor is
# a fresh mapping; then it counts the page faults of 40 such allocations.
# Transparent huge pages are off for it: with THP 'always', a fresh 8 MiB mapping faults in a
# few huge pages, not thousands of small ones, and the count would say nothing.
SCRIPT = textwrap.dedent("""
    import ctypes, resource, sys
    import torch
    from mixserve.model.allocator import keep_freed_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD: 128 KiB
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    torch.empty(2 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        torch.empty(2 << 20).fill_(1.0)  # 8 MiB, touched, freed
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not is_glibc(), reason="glibc's malloc is what is tuned")
def test_freed_step_temporaries_are_reused_instead_of_faulted_in_again():
    pages_per_tensor = (8 << 20) // resource.getpagesize()
    assert faults("untuned") > 20 * pages_per_tensor  # the state the setting must undo
    # Reused: a few tensors' pages at most (the host may reclaim idle heap pages, as this VM's
    # DAMON did once: 3 tensors' worth), against all 40 when every one is a fresh mapping.
    assert faults("tuned") < 8 * pages_per_tensor
