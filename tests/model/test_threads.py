from __future__ import annotations

import threading

import pytest
import torch

from mixserve.model.threads import intra_op_threads


def in_own_thread(fn):
    """Runs fn in a fresh thread (torch's thread count is per thread) and returns what it returned."""
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", fn()))
    worker.start()
    worker.join()
    return box["out"]


def test_the_block_runs_on_n_threads_and_the_count_comes_back_even_after_an_error():
    def run():
        torch.set_num_threads(1)
        seen = []
        with intra_op_threads(2):
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())
        with pytest.raises(ValueError), intra_op_threads(2):
            raise ValueError("inside")
        seen.append(torch.get_num_threads())
        with intra_op_threads(None):
            seen.append(torch.get_num_threads())
        return seen

    assert in_own_thread(run) == [2, 1, 1, 1]
