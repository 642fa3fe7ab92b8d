"""FAISS partitions: search within a partition only, removal, and the flat → IVF rebuild that replays
operations made while it ran."""

import asyncio

import numpy as np

from services.cache.index import VectorIndex

DIMENSIONS = 16


def unit(seed: int, count: int = 1) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSIONS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_search_stays_inside_its_partition_and_removal_is_immediate():
    index = VectorIndex(DIMENSIONS)
    first, second = unit(1, 2)
    index.add("a", 1, first)
    index.add("b", 2, first)
    index.add("a", 3, second)
    assert [entry for entry, _ in index.search("a", first, 4)] == [1, 3]
    assert (
        index.search("a", first, 4)[0][1] == np.float32(1.0)
        or abs(index.search("a", first, 4)[0][1] - 1) < 1e-5
    )
    index.remove(1)
    assert [entry for entry, _ in index.search("a", first, 4)] == [3]
    assert [entry for entry, _ in index.search("b", first, 4)] == [2]
    index.remove(2)
    assert index.search("b", first, 4) == [] and index.partition_size("b") == 0
    assert len(index) == 1


async def test_a_large_partition_becomes_ivf_and_keeps_operations_made_meanwhile():
    index = VectorIndex(DIMENSIONS, ivf_min_entries=2000, nprobe=64)
    vectors = unit(2, 3000)
    for entry_id in range(2000):
        index.add("p", entry_id, vectors[entry_id])
    await asyncio.sleep(0)  # the rebuild task takes its snapshot and starts training in a thread
    part = index._partitions["p"]
    assert part.pending is not None and not part.ivf
    # The IVF copy is being built from the snapshot now; these must survive the swap.
    index.remove(5)
    for entry_id in range(2000, 2100):
        index.add("p", entry_id, vectors[entry_id])
    await index.drain()
    assert part.ivf and part.pending is None and part.index.ntotal == 2099
    assert index.search("p", vectors[2050], 1)[0][0] == 2050
    assert all(entry != 5 for entry, _ in index.search("p", vectors[5], 4))
    index.remove(2050)
    assert index.search("p", vectors[2050], 1)[0][0] != 2050
