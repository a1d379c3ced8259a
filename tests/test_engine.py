"""Engine plumbing that needs no engine: per-request seeds, data-parallel splits and
device slices."""

from __future__ import annotations

import pytest

from length_control.engine import EngineError, _split, replica_devices, request_seed


def test_request_seeds_are_stable_and_distinct() -> None:
    seeds = {request_seed(0, f"p{i}", s) for i in range(200) for s in range(4)}
    assert len(seeds) == 800
    assert request_seed(0, "p1", 0) == request_seed(0, "p1", 0) != request_seed(1, "p1", 0)
    assert all(0 <= seed < 2**31 for seed in seeds)


@pytest.mark.parametrize("n, parts", [(0, 3), (7, 3), (8, 2), (3, 4)])
def test_split_is_contiguous_and_balanced(n: int, parts: int) -> None:
    chunks = _split(list(range(n)), parts)
    assert len(chunks) == parts
    assert [x for chunk in chunks for x in chunk] == list(range(n))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_replicas_get_their_own_devices() -> None:
    assert [replica_devices(r, 2, None) for r in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert [replica_devices(r, 1, "3,5") for r in range(2)] == ["3", "5"]
    with pytest.raises(EngineError, match="lower data_parallel_size"):
        replica_devices(1, 2, "0,1,2")
