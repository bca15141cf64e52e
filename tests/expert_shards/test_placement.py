"""Expert placement: contiguous split, replication into spare capacity, the balance figure."""

from __future__ import annotations

import pytest

from mixserve.expert_shards.placement import Placement, PlacementError


def test_contiguous_split_of_8_experts_on_4_shards():
    p = Placement.contiguous(8, 4)
    assert [p.experts_of(s) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert p.capacity == 2 and p.version == 0


def test_uneven_split_and_spare_capacity():
    p = Placement.contiguous(8, 3, capacity=4)
    assert [p.experts_of(s) for s in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.spare(s) for s in range(3)] == [1, 1, 2]


def test_replicating_the_hot_expert_lowers_max_over_mean():
    p = Placement.contiguous(8, 4, capacity=3)
    tokens = [100, 10, 10, 10, 10, 10, 10, 10]  # expert 0 is hot: shard 0 carries 110 of 170
    before = p.balance(tokens)
    q = p.replicate_hottest(tokens, count=1)
    assert q.version == 1 and len(q.holders[0]) == 2
    assert q.balance(tokens) < before
    assert p.holders[0] == (0,)  # the old placement is untouched


def test_replication_stops_when_it_no_longer_helps():
    p = Placement.contiguous(8, 4, capacity=4)
    even = [10] * 8
    assert p.replicate_hottest(even, count=3) == p


@pytest.mark.parametrize(
    "call",
    [
        lambda: Placement.contiguous(8, 0),
        lambda: Placement.contiguous(4, 8),
        lambda: Placement.contiguous(8, 4, capacity=1),
        lambda: Placement.contiguous(8, 4).with_replica(0, 1),  # shard 1 is full
        lambda: Placement.contiguous(8, 4, capacity=3).with_replica(0, 0),  # already there
        lambda: Placement.contiguous(8, 4, capacity=3).with_replica(9, 0),
    ],
)
def test_impossible_placements_raise(call):
    with pytest.raises(PlacementError):
        call()
