"""Memory accounting: what a training step keeps and peaks at, and what fits a GPU.

- :mod:`~abnexp.memory.saved`: the bytes autograd keeps for backward (saved-tensor hooks), the
  per-layer quantity of the InPlace-ABN paper;
- :mod:`~abnexp.memory.tracker`: every storage a step allocates and frees (a dispatch mode);
- :mod:`~abnexp.memory.allocator`: the GPUs (``DEVICES``) and PyTorch's CUDA caching allocator
  (block rounding, pools, segments) replayed over those allocations;
- :mod:`~abnexp.memory.simulate`: whole steps on fake tensors (no compute, no memory), the
  largest batch at a crop and the largest crop at a batch.
"""
from abnexp.memory.allocator import DEVICES, GIB, MIB, CachingAllocator, Device, OutOfMemory
from abnexp.memory.saved import SavedBytes
from abnexp.memory.simulate import Simulator, StepMemory, StepSpec, max_batch, max_crop, measure_max_batch
from abnexp.memory.tracker import AllocationTracker

__all__ = ["DEVICES", "GIB", "MIB", "AllocationTracker", "CachingAllocator", "Device", "OutOfMemory", "SavedBytes",
           "Simulator", "StepMemory", "StepSpec", "max_batch", "max_crop", "measure_max_batch"]
