"""Splitting a step into ping-pong micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mixserve.replicas.scheduler import split_micro_batches


@dataclass
class Chunk:  # split_micro_batches only reads .length
    name: str
    length: int


def test_split_balances_tokens_keeps_decodes_first_and_loses_nothing():
    chunks = [Chunk(f"d{i}", 1) for i in range(5)] + [Chunk("p40", 40), Chunk("p30", 30), Chunk("p12", 12)]
    groups = split_micro_batches(chunks, 2)
    assert len(groups) == 2
    assert sorted(c.name for g in groups for c in g) == sorted(c.name for c in chunks)
    totals = [sum(c.length for c in g) for g in groups]
    assert abs(totals[0] - totals[1]) <= 1 + 1  # 87 tokens: 44 / 43 at best, one decode of slack
    for group in groups:
        lengths = [c.length for c in group]
        n_decode = lengths.count(1)
        assert lengths[:n_decode] == [1] * n_decode  # decodes first, as the step metadata needs
        decodes = [c.name for c in group if c.length == 1]
        assert decodes == sorted(decodes)  # schedule order kept


@pytest.mark.parametrize("parts, n, expected", [(1, 4, 1), (2, 1, 1), (4, 3, 3), (2, 6, 2)])
def test_split_never_makes_empty_parts(parts, n, expected):
    groups = split_micro_batches([Chunk(str(i), 1) for i in range(n)], parts)
    assert len(groups) == expected and all(groups)
