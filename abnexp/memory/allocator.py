"""GPUs and a model of PyTorch's CUDA caching allocator, replayed over a step's allocations.

PyTorch never hands a tensor exactly its bytes: ``c10/cuda/CUDACachingAllocator.cpp`` rounds
every request up to a multiple of 512 bytes (``kMinBlockSize``), serves requests of at most
1 MiB (``kSmallSize``) from a pool of 2 MiB segments (``kSmallBuffer``) and larger ones from a
second pool whose segments are 20 MiB (``kLargeBuffer``) for requests under 10 MiB
(``kMinLargeAlloc``) and the request rounded up to 2 MiB (``kRoundLarge``) above. A free block
is reused best-fit within its pool and split when the rest is at least 512 bytes (small pool) or
more than 1 MiB (large pool); freed blocks merge with free neighbours of their segment.
Segments are kept (cached) after their blocks are freed; when ``cudaMalloc`` fails, the
allocator releases every wholly free segment and retries once, then raises out-of-memory.
:class:`CachingAllocator` replays that (one stream, default ``PYTORCH_CUDA_ALLOC_CONF``: no
``max_split_size_mb``, no ``expandable_segments``, no power-of-two rounding).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Optional

MIB = 2**20
GIB = 2**30

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 * MIB  # kSmallSize: requests up to this size use the small pool
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: segment size of the small pool
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc
LARGE_BUFFER = 20 * MIB  # kLargeBuffer: segment size for large requests under kMinLargeAlloc
ROUND_LARGE = 2 * MIB  # kRoundLarge


@dataclass(frozen=True)
class Device:
    """A GPU model: its memory as ``nvidia-smi`` / ``cudaMemGetInfo`` report it (MiB)."""

    name: str
    total_mib: int

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MIB


DEVICES: dict[str, Device] = {
    "titan_xp": Device("NVIDIA TITAN Xp (12 GB, InPlace-ABN's GPUs)", 12196),
    "v100_16": Device("Tesla V100 16 GB", 16160),
    "a100_40": Device("A100 40 GB", 40536),
    "a100_80": Device("A100 80 GB", 81920),
    "h100_80": Device("H100 80 GB HBM3", 81559),
    "h200": Device("H200 141 GB", 143771),
}
"""``memory.device=<key>``; ``memory.device_gb`` overrides the size."""


def round_size(nbytes: int) -> int:
    """A request's block size: at least 512 bytes, a multiple of 512 (``round_size``)."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """Bytes ``cudaMalloc``-ed for a new segment serving a block of ``size`` (``get_allocation_size``)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class OutOfMemory(Exception):
    """The replay needed more than the capacity, even after releasing the cached segments."""


class _Block:
    __slots__ = ("size", "offset", "segment", "prev", "next", "free")

    def __init__(self, size: int, offset: int, segment: int):
        self.size, self.offset, self.segment = size, offset, segment
        self.prev: Optional[_Block] = None
        self.next: Optional[_Block] = None
        self.free = True


class CachingAllocator:
    """Replays ``alloc`` / ``free`` of tensor storages; tracks allocated and reserved bytes.

    Args:
        capacity: bytes ``cudaMalloc`` may reserve in all (None = unlimited); beyond it the
            cached free segments are released and the request retried, then OutOfMemory.
    """

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = capacity
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self._pools: dict[bool, list[tuple[int, int, int, _Block]]] = {True: [], False: []}  # small? -> free blocks
        self._segments: dict[int, tuple[bool, _Block]] = {}  # id -> (small pool?, first block)
        self._live: dict[int, _Block] = {}
        self._next_segment = 0

    def _insert(self, small: bool, b: _Block) -> None:
        bisect.insort(self._pools[small], (b.size, b.segment, b.offset, b))

    def _remove(self, small: bool, b: _Block) -> None:
        pool = self._pools[small]
        del pool[bisect.bisect_left(pool, (b.size, b.segment, b.offset))]

    def _new_segment(self, small: bool, size: int) -> _Block:
        nbytes = segment_size(size)
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            self.release_cached()
            if self.reserved + nbytes > self.capacity:
                raise OutOfMemory(f"{nbytes} bytes more with {self.reserved} reserved of {self.capacity}")
        sid, self._next_segment = self._next_segment, self._next_segment + 1
        block = _Block(nbytes, 0, sid)
        self._segments[sid] = (small, block)
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def release_cached(self) -> None:
        """Frees every segment none of whose bytes is in use (``release_cached_blocks``)."""
        for sid, (small, first) in list(self._segments.items()):
            if first.free and first.next is None:
                self._remove(small, first)
                self.reserved -= first.size
                del self._segments[sid]

    def alloc(self, key: int, nbytes: int) -> None:
        """Allocates the storage ``key`` of ``nbytes`` (0 bytes: nothing, like a null pointer)."""
        if nbytes == 0:
            return
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            block = pool.pop(i)[3]
        else:
            block = self._new_segment(small, size)
        rest = block.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
            tail = _Block(rest, block.offset + size, block.segment)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._insert(small, tail)
        block.free = False
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        """Returns the storage ``key``'s block to its pool, merged with free neighbours."""
        block = self._live.pop(key, None)
        if block is None:
            return
        small = self._segments[block.segment][0]
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(small, neighbour)
                first, second = (neighbour, block) if neighbour is block.prev else (block, neighbour)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                block = first
        self._insert(small, block)

    def replay(self, events: Iterable[tuple[int, int]]) -> "CachingAllocator":
        """Applies ``(key, nbytes)`` events: nbytes ≥ 0 allocates, −1 frees. Returns self.

        Raises:
            OutOfMemory: with a capacity, a request that does not fit.
        """
        for key, nbytes in events:
            if nbytes < 0:
                self.free(key)
            else:
                self.alloc(key, nbytes)
        return self
