"""The kernel backends of the normalization layers: one table, one choice per device type.

Every layer of :mod:`abnexp.norm` computes its statistics, forward and backward through the
operators listed in :mod:`abnexp.norm.native` (``statistics``, ``forward`` / ``forward_``, the
``*_backward_reduce`` / ``*_backward_elementwise`` forms). A backend is one implementation of
all of them; :data:`BACKENDS` is the table, and the only place that knows backend names:

==========  =====================================================  ===============================
backend     what runs                                              serves
==========  =====================================================  ===============================
``native``  kernels/*.cpp, kernels/abn_cuda.cu, built just in      CPU tensors; CUDA tensors when
            time (``torch.ops.abnexp``, :mod:`~abnexp.norm.native`) built with the CUDA toolkit
``triton``  kernels/abn_triton.py (``torch.ops.abnexp_triton``,    GPU tensors (CUDA, ROCm); CPU
            :mod:`~abnexp.norm.triton_backend`), no build step      tensors under TRITON_INTERPRET=1
``torch``   the PyTorch reference path (:mod:`abnexp.norm.functional`)  every tensor
==========  =====================================================  ===============================

``ABNEXP_KERNELS=auto|native|triton|torch`` picks one (``ABNEXP_NATIVE=0`` keeps meaning
``torch``). ``auto`` tries :data:`AUTO` in order for the tensor's device type: the C++ kernels
for CPU tensors; Triton, then the CUDA module, then the PyTorch path for GPU tensors. A GPU
tensor that ends on the PyTorch path, or a CPU tensor without the C++ module, warns once (rank
0) with what was missing; a backend asked for by name that cannot serve a tensor raises
:class:`KernelBackendError` with that reason instead of falling back.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from abnexp.errors import AbnexpError
from abnexp.norm import native
from abnexp.norm.activations import negative_param

log = logging.getLogger(__name__)

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the kernel backends take (statistics in float64 for float64, else float32)."""


class KernelBackendError(AbnexpError, RuntimeError):
    """A backend asked for by name (``ABNEXP_KERNELS``) cannot serve a tensor; says why."""


@dataclass(frozen=True)
class Backend:
    """One implementation of the normalization operators.

    Attributes:
        summary: what runs, one line that reads after "tensors use" (logs, ``abnexp kernels``).
        probe: device type ("cpu", "cuda") -> None when this backend serves tensors of that
            type now (building or registering its operators on the first call), else the
            reason it cannot, naming what to install or set.
        namespace: ``torch.ops`` namespace of its operators; None for the reference path.
        build: (archs, cuda, verbose) -> (report lines, ok): ``abnexp kernels build``; archs
            like ("sm_90", "gfx942"), empty for the backend's default; None: nothing to build.
    """

    summary: str
    probe: Callable[[str], Optional[str]]
    namespace: Optional[str]
    build: Optional[Callable[[tuple[str, ...], Optional[bool], bool], tuple[list[str], bool]]] = None


def _triton_probe(device_type: str) -> Optional[str]:
    """:func:`abnexp.norm.triton_backend.probe`, imported on first use (importing Triton takes
    a second; CPU-only runs never need it)."""
    from abnexp.norm import triton_backend

    return triton_backend.probe(device_type)


def _native_build(archs: tuple[str, ...], cuda: Optional[bool], verbose: bool) -> tuple[list[str], bool]:
    """Build (or reuse) the C++/CUDA module; ``archs`` (sm_XY) set TORCH_CUDA_ARCH_LIST and imply
    ``cuda``. Raises :class:`~abnexp.norm.native.KernelBuildError` on failure."""
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = " ".join(f"{a[3:-1]}.{a[-1]}" for a in archs)
        cuda = True
    info = native.build(cuda=cuda, verbose=verbose)
    devices = ("CPU + CUDA (" + ", ".join(f"sm_{a.replace('.', '')}" for a in info.cuda_archs) + ")"
               if info.cuda else "CPU")
    return [f"built {info.name}: {devices} kernels from {native.kernels_dir()}",
            f"  library: {info.library}", f"  host flags: {' '.join(info.cflags)}",
            f"  build/load time: {info.seconds:.1f} s (cached builds only reload)"], True


def _triton_build(archs: tuple[str, ...], cuda: Optional[bool], verbose: bool) -> tuple[list[str], bool]:
    """Compile every Triton kernel ahead of time for ``archs`` (default sm_80, sm_90, gfx942)."""
    from abnexp.norm import triton_backend

    rows = triton_backend.compile_ahead(list(archs or ("sm_80", "sm_90", "gfx942")))
    lines = [f"{'kernel':72s} {'arch':7s} {'registers':>9s} {'spills':>6s} {'shared B':>8s}"]
    for r in rows:
        lines.append(f"{r['kernel']:72s} {r['arch']:7s} " + (
            f"{r['registers']:9d} {r['spills']:6d} {r['shared_bytes']:8d}" if r["ok"] else f"FAILED: {r['error']}"))
    failed = sum(not r["ok"] for r in rows)
    lines.append(f"abnexp kernels build --backend triton: {len(rows) - failed} of {len(rows)} kernels compiled")
    return lines, failed == 0 and bool(rows)


BACKENDS: dict[str, Backend] = {
    "native": Backend("the native module (C++ kernels for CPU tensors, CUDA kernels for CUDA tensors; "
                      "kernels/, built just in time)", native.probe, "abnexp", _native_build),
    "triton": Backend("the Triton kernels (kernels/abn_triton.py, compiled by Triton on first use)",
                      _triton_probe, "abnexp_triton", _triton_build),
    "torch": Backend("the PyTorch reference path of the normalization layers (abnexp.norm.functional)",
                     lambda device_type: None, None),
}
AUTO: dict[str, tuple[str, ...]] = {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")}
"""``auto``'s order per device type; other device types use the reference path."""


def requested_from_env() -> str:
    """``$ABNEXP_KERNELS`` (default ``auto``); ``torch`` when ``ABNEXP_NATIVE=0``.

    Raises:
        KernelBackendError: an unknown name.
    """
    name = os.environ.get("ABNEXP_KERNELS", "").strip().lower() or "auto"
    if os.environ.get("ABNEXP_NATIVE") == "0":
        name = "torch"
    if name != "auto" and name not in BACKENDS:
        raise KernelBackendError(f"ABNEXP_KERNELS={name!r} is not a kernel backend; valid: auto, "
                                 f"{', '.join(BACKENDS)}")
    return name


REQUESTED = requested_from_env()
"""The backend asked for ("auto" or a :data:`BACKENDS` key); tests may set it."""
_CHOSEN: dict[tuple[str, str], str] = {}
_WARNED: set[str] = set()


def choose(device_type: str, requested: Optional[str] = None) -> str:
    """The backend that serves tensors of ``device_type`` (cached per request and device type).

    Raises:
        KernelBackendError: a backend asked for by name cannot serve ``device_type``.
    """
    requested = REQUESTED if requested is None else requested
    key = (requested, device_type)
    if key not in _CHOSEN:
        _CHOSEN[key] = _choose(device_type, requested)
    return _CHOSEN[key]


def _choose(device_type: str, requested: str) -> str:
    if requested != "auto":
        reason = BACKENDS[requested].probe(device_type)
        if reason is not None:
            raise KernelBackendError(f"ABNEXP_KERNELS={requested} cannot run {device_type} tensors: "
                                     f"{reason}; set ABNEXP_KERNELS=auto to pick what runs here")
        return requested
    reasons = []
    for name in AUTO.get(device_type, ("torch",)):
        reason = BACKENDS[name].probe(device_type)
        if reason is None:
            if reasons:
                _report(device_type, name, reasons)
            return name
        reasons.append(f"{name}: {reason}")
    return "torch"


def _report(device_type: str, name: str, reasons: list[str]) -> None:
    """Once per process, on rank 0: which backend serves ``device_type`` and why not the ones
    before it (a warning when that is the reference path, an info line otherwise)."""
    message = (f"abnexp: {device_type} tensors use {BACKENDS[name].summary} "
               f"({'; '.join(reasons)})")
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0
    if message in _WARNED or not rank0:
        return
    _WARNED.add(message)
    if name == "torch":
        warnings.warn(message, RuntimeWarning, stacklevel=5)
    log.info(message)


@torch.compiler.assume_constant_result
def _kernels_serve(device_type: str) -> bool:
    return choose(device_type) != "torch"


def enabled(x: torch.Tensor, activation: str, param: float) -> bool:
    """Whether a layer runs ``x`` through a kernel backend (else the reference path): x is a
    float64/32/16 or bfloat16 tensor, dL/dy can be computed from the output (no negative
    LeakyReLU slope / ELU alpha: those layers always take the reference path) and a backend
    other than ``torch`` serves x's device type.

    Raises:
        KernelBackendError: a backend asked for by name cannot serve x's device type.
    """
    if x.dtype not in DTYPES or negative_param(activation, param):
        return False
    return _kernels_serve(x.device.type)


def ops(x: torch.Tensor):
    """The operator namespace (``torch.ops.abnexp`` / ``torch.ops.abnexp_triton``) serving x;
    call only after :func:`enabled` returned True for x."""
    return getattr(torch.ops, BACKENDS[choose(x.device.type)].namespace)


def describe(device_type: str) -> str:
    """The backend name serving ``device_type`` for this run (train.log, TensorBoard HParams)."""
    return choose(device_type)
