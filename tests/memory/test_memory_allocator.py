"""The CUDA caching allocator model against block and segment sizes computed by hand from
c10/cuda/CUDACachingAllocator.cpp's constants (512-byte blocks; 2 MiB small segments for
requests up to 1 MiB; 20 MiB segments below 10 MiB; 2 MiB rounding above)."""
from __future__ import annotations

import pytest

from abnexp.memory.allocator import CachingAllocator, OutOfMemory, round_size, segment_size

MIB = 2**20


def test_block_and_segment_sizes():
    assert [round_size(n) for n in (1, 512, 513, 1500)] == [512, 512, 1024, 1536]
    assert segment_size(1 * MIB) == 2 * MIB and segment_size(1 * MIB + 512) == 20 * MIB
    assert segment_size(10 * MIB) == 10 * MIB and segment_size(10 * MIB + 512) == 12 * MIB


def test_small_requests_share_a_2_mib_segment():
    a = CachingAllocator().replay([(0, 1000), (1, 1000), (2, 1)])
    assert a.allocated == 1024 + 1024 + 512 and a.reserved == 2 * MIB


def test_large_requests_split_a_20_mib_segment_then_open_another():
    a = CachingAllocator().replay([(k, 5 * MIB) for k in range(4)])  # 4 × 5 MiB: one 20 MiB segment
    assert a.reserved == 20 * MIB and a.allocated == 20 * MIB
    a.alloc(4, 5 * MIB)
    assert a.reserved == 40 * MIB


def test_freed_blocks_merge_and_are_reused():
    a = CachingAllocator().replay([(0, 5 * MIB), (1, 5 * MIB), (2, 5 * MIB), (0, -1), (1, -1), (2, -1)])
    assert a.allocated == 0 and a.reserved == 20 * MIB  # cached, not returned to the device
    a.alloc(3, 18 * MIB)  # fits the merged 20 MiB block: no new segment
    assert a.reserved == 20 * MIB and a.peak_reserved == 20 * MIB


def test_out_of_memory_releases_cached_segments_first():
    events = [(0, 1000), (0, -1), (1, 22 * MIB)]  # a cached 2 MiB segment, then a 22 MiB request
    assert CachingAllocator().replay(events).peak_reserved == 24 * MIB
    assert CachingAllocator(capacity=23 * MIB).replay(events).reserved == 22 * MIB
    with pytest.raises(OutOfMemory):
        CachingAllocator(capacity=21 * MIB).replay(events)
