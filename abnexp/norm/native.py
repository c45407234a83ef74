"""The native kernel module (kernels/: C++ for CPU, CUDA for GPU) under the normalization layers.

The operators (``torch.ops.abnexp.*``, registered with TORCH_LIBRARY in kernels/ops.cpp) replace
the reference functions of :mod:`abnexp.norm.functional` one for one:

=================================  ================================================================
operator                           reference
=================================  ================================================================
``statistics``                     :func:`~abnexp.norm.functional.batch_statistics` (+ the count)
``merge_statistics``               :func:`~abnexp.norm.functional.merge_statistics`
``forward`` / ``forward_``         :func:`~abnexp.norm.functional.forward` (``out=None`` / ``out=x``)
``inplace_backward_reduce``        :func:`~abnexp.norm.functional.inplace_backward_reduce` (sums)
``inplace_backward_elementwise``   :func:`~abnexp.norm.functional.grad_input_xhat` / ``grad_input_y``
``xhat_backward_reduce``           :func:`~abnexp.norm.functional.checkpoint_backward_reduce` (sums)
``xhat_backward_elementwise``      :func:`~abnexp.norm.functional.grad_input_xhat`
``linear_backward_reduce``         :func:`~abnexp.norm.functional.linear_backward_reduce` (sums)
``linear_backward_elementwise``    :func:`~abnexp.norm.functional.linear_grad_input`
=================================  ================================================================

The ``linear_*`` operators serve the layers whose elementwise parts are linear in x with
per-channel coefficients (MABN, CBN, the statistics' backward): t = x, dL/dy = phi'(z) dL/dz
from the saved output z (no z: identity), sums (sum dL/dy, sum dL/dy * x) and
dL/dx = a * dL/dy + b * x + c with the caller's coefficients. With dL/dz = x the reduction
gives (sum x, sum x^2), MABN's second moment. All operators run the same CPU and CUDA kernels.

The backward operators take the *saved* tensors (z, or x / xhat) and dL/dz and recompute dL/dy
and xhat (or y) per element, so no full-size temporary is materialised; the ``*_`` variants write
dL/dx into the dL/dz buffer (callers use them only when that buffer is exclusively theirs).

The module is built just in time on first use with ``torch.utils.cpp_extension`` (ninja; cached
in torch's extensions folder, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). CUDA
sources are built when a GPU is visible or when asked (``abnexp kernels build --cuda``), with the
toolkit of :mod:`abnexp.norm.cuda_toolkit` (``$CUDA_HOME``, else PATH's nvcc followed to the real
binary, else ``/usr/local/cuda``); when a GPU is visible and the CUDA kernels cannot be built
(no toolkit, a CUDA major version other than torch's, a failed compile) a RuntimeWarning says why
and how to fix it, and the CPU kernels are built alone. Whether this module or another backend serves a tensor is decided
by the backend table of :mod:`abnexp.norm.backends` (``ABNEXP_KERNELS``), through :func:`probe`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from abnexp.errors import AbnexpError
from abnexp.norm import cuda_toolkit
from abnexp.norm.cuda_toolkit import cuda_archs, cuda_home, gencode_flags, nvcc  # noqa: F401 (this module's API)
from abnexp.progress import announced

HOW_TO_GET = ("install a C++20 compiler (g++ >= 10 or clang++) and ninja (pip install ninja), "
              "then run `abnexp kernels build` (and `abnexp kernels check`); set ABNEXP_KERNELS=torch "
              "(or ABNEXP_NATIVE=0) to use the PyTorch reference path without this warning")


class KernelBuildError(AbnexpError, RuntimeError):
    """The native module could not be built or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class BuildInfo:
    """What :func:`build` built: extension name, library path, devices, CUDA archs and flags."""

    name: str
    library: str
    cuda: bool
    cuda_archs: tuple[str, ...]
    cflags: tuple[str, ...]
    seconds: float
    toolkit: str = ""  # "CUDA 13.0 at /usr/local/cuda-13.0" when built with CUDA


_BUILT: Optional[BuildInfo] = None
_FAILED: Optional[str] = None


def kernels_dir() -> Path:
    """The folder holding the C++/CUDA sources: the packaged ``abnexp.kernels`` (a normal
    install), else the repository's ``kernels/`` (a source checkout / editable install)."""
    spec = importlib.util.find_spec("abnexp.kernels")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "kernels"


def sources(cuda: bool) -> list[Path]:
    """The translation units: ops.cpp and abn_cpu.cpp, plus abn_cuda.cu when ``cuda``."""
    names = ["ops.cpp", "abn_cpu.cpp"] + (["abn_cuda.cu"] if cuda else [])
    return [kernels_dir() / n for n in names]


def source_digest(cuda: bool) -> str:
    """First 10 hex digits of the SHA-256 of the sources and headers: part of the extension
    name, so checkouts with different sources keep separate cached builds instead of rebuilding
    (and replacing the library under) each other."""
    digest = hashlib.sha256()
    for path in sources(cuda) + sorted(kernels_dir().glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def extension_name(cuda: bool) -> str:
    """The extension's name: CPU capability, "_cuda" when built with CUDA, source digest."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return f"abnexp_kernels_{cap}" + ("_cuda" if cuda else "") + f"_{source_digest(cuda)}"


def cpu_flags() -> list[str]:
    """Host compiler flags: -O3, OpenMP (ATen's parallel_for), no FP-exception traps (lets GCC
    turn the activations' selects into vector blends; results are unchanged) and AVX2/FMA/F16C
    where the CPU has them (the capability is part of the extension name, so each kind of CPU
    builds its own)."""
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def cpp_extension_module():
    """torch.utils.cpp_extension with CUDA_HOME taken from :func:`cuda_home` (torch guesses it
    from the nvcc on PATH at import, which is wrong for a wrapper script)."""
    home = cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its "No CUDA runtime is found" on CPU machines
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    cpp_extension.CUDA_HOME = home
    return cpp_extension


def missing_tools(cuda: bool) -> list[str]:
    """What the build needs and this machine lacks (compiler, ninja; with ``cuda``, a toolkit
    that can build for this torch: :func:`abnexp.norm.cuda_toolkit.problem`)."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"C++ compiler {cxx!r}")
    if shutil.which("ninja") is None:
        missing.append("ninja")
    if cuda and (problem := cuda_toolkit.problem()) is not None:
        missing.append(problem)
    return missing


def _not_built_warning(reason: str) -> None:
    """The loud message of a GPU machine whose native module is built without CUDA kernels."""
    warnings.warn(f"abnexp: a CUDA GPU is visible but the native CUDA kernels were not built: {reason}. "
                  f"Building the CPU kernels only: CUDA tensors run the Triton kernels or the PyTorch reference "
                  f"path (slower, more memory), not kernels/abn_cuda.cu; after the fix, run `abnexp kernels build "
                  f"--cuda` in a fresh process", RuntimeWarning, stacklevel=3)


def build(cuda: Optional[bool] = None, verbose: bool = False) -> BuildInfo:
    """Build (or reuse the cached build of) the native module and load it into this process.

    Args:
        cuda: also compile kernels/abn_cuda.cu. Default: when a GPU is visible; then a toolkit
            that cannot build (:func:`abnexp.norm.cuda_toolkit.problem`) or a failed CUDA compile
            raises no error but a RuntimeWarning with the reason and the fix, and the CPU
            kernels are built alone (CUDA tensors then use another backend).
        verbose: print the compiler commands and output.

    Returns:
        :class:`BuildInfo` of the loaded module (the same object on later calls).

    Raises:
        KernelBuildError: missing compiler / ninja / CUDA toolkit, a compile error, or a
            request for CUDA after the CPU-only module was loaded in this process.
    """
    global _BUILT
    auto = cuda is None
    cuda = torch.cuda.is_available() if auto else bool(cuda)
    if _BUILT is not None:
        if cuda and not _BUILT.cuda and not auto:
            raise KernelBuildError("the CPU-only native module is already loaded in this process; "
                                   "build with CUDA in a fresh process (abnexp kernels build --cuda)")
        return _BUILT
    if auto and cuda and (problem := cuda_toolkit.problem()) is not None:
        _not_built_warning(problem)
        cuda = False
    try:
        _BUILT = _load(cuda, verbose)
    except KernelBuildError as err:
        if not (auto and cuda):
            raise
        _not_built_warning(f"compiling them failed ({err})")
        _BUILT = _load(False, verbose)
    _register_fakes()
    return _BUILT


def _load(cuda: bool, verbose: bool) -> BuildInfo:
    """:func:`build`'s compile-and-load step for one choice of ``cuda``."""
    missing = missing_tools(cuda)
    if missing:
        raise KernelBuildError(f"cannot build the native kernels: {'; '.join(missing)}; {HOW_TO_GET}")
    cpp_extension = cpp_extension_module()
    cflags = cpu_flags()
    archs = cuda_archs() if cuda else ()
    name = extension_name(cuda)
    start = time.perf_counter()
    try:
        library = cpp_extension.load(
            name=name, sources=[str(s) for s in sources(cuda)], extra_cflags=cflags,
            extra_cuda_cflags=["-O3"] + gencode_flags(archs) if cuda else None,
            extra_ldflags=["-fopenmp"], extra_include_paths=[str(kernels_dir())],
            with_cuda=cuda, is_python_module=False, verbose=verbose)
    except Exception as err:  # compiler errors come as RuntimeError / CalledProcessError
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise KernelBuildError(f"building the native kernels ({name}) failed: {last}; run "
                               f"`abnexp kernels build --verbose` to see the compiler output") from err
    return BuildInfo(name, str(library), cuda, tuple(archs), tuple(cflags), time.perf_counter() - start,
                     cuda_toolkit.describe() if cuda else "")


def probe(device_type: str) -> Optional[str]:
    """None when the native module serves tensors of ``device_type`` ("cpu", "cuda"), else why
    not (what is missing and how to get it). Builds the module on the first call; the
    backend table :mod:`abnexp.norm.backends` asks this."""
    global _FAILED
    if _BUILT is None and _FAILED is None:
        try:
            with announced("building the native kernels for this machine, once, about a minute (with CUDA: "
                           "several); later starts load the cached build", "native kernels built", after=3.0):
                build()
        except KernelBuildError as err:
            _FAILED = str(err)
    if _FAILED is not None:
        return _FAILED
    if device_type == "cuda" and not _BUILT.cuda:
        return (f"the native module was built without CUDA kernels ({_BUILT.name}); set CUDA_HOME to "
                f"the CUDA toolkit and run `abnexp kernels build --cuda` in a fresh process")
    return None if device_type in ("cpu", "cuda") else f"no native kernels for {device_type} tensors"


def ops():
    """``torch.ops.abnexp`` (after :func:`build`)."""
    return torch.ops.abnexp


# --------------------------------------------------------------------------------------
# writing dL/dx into the incoming gradient buffer
# --------------------------------------------------------------------------------------
_EXCLUSIVE: Optional[tuple[int, int]] = None  # (Python refs, storage refs) of an exclusive grad


def _storage_refs(t: torch.Tensor) -> int:
    """References to t's storage (t's and the temporary storage object's); large when the
    private counter is missing in this torch, so that nothing is written in place."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(t.untyped_storage()._cdata) if count is not None else sys.maxsize


class _Probe(torch.autograd.Function):
    """Same call shape as the layers' backward: measures the references the autograd engine
    itself holds on a gradient nobody else has (the output of the next node's backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        refs = 0 if torch.compiler.is_compiling() else sys.getrefcount(dz)
        global _EXCLUSIVE
        _EXCLUSIVE = (refs, _storage_refs(dz))
        return dz


def grad_writable(dz: torch.Tensor, refs: int) -> bool:
    """Whether a backward may write dL/dx into the gradient ``dz`` it received.

    ``refs`` is ``sys.getrefcount(dz)`` taken as the first statement of a
    ``@once_differentiable`` backward. True only in eager mode without grad mode (no double
    backward) for a tensor that is exactly its own storage (no expanded gradient such as
    ``out.sum()``'s, no view of a larger buffer) and that nothing else references: not the
    caller (an explicit ``grad_output``), not another node (an add handing one gradient to two
    branches), not a hook that kept it. The engine's own references are measured once with a
    probe backward of the same shape.
    """
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or dz.requires_grad:
        return False
    if dz._base is not None or getattr(dz, "_use_count", lambda: 2)() != 1 or dz.storage_offset() != 0:
        return False
    if dz.untyped_storage().nbytes() != dz.numel() * dz.element_size():
        return False
    if _EXCLUSIVE is None:
        with torch.enable_grad():
            leaf = torch.zeros(2, requires_grad=True)
            (_Probe.apply(leaf * 1.0) * 1.0).sum().backward()
    return refs <= _EXCLUSIVE[0] and _storage_refs(dz) <= _EXCLUSIVE[1]


# --------------------------------------------------------------------------------------
# fake (meta) implementations: shapes, dtypes and strides of the outputs for torch.compile
# and torch.export; the full-size outputs have the layout of the (first) saved input.
# --------------------------------------------------------------------------------------
def _channel_vectors(x: torch.Tensor, k: int):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return tuple(x.new_empty(x.shape[1], dtype=dtype) for _ in range(k))


def _register_fakes() -> None:
    lib = "abnexp::"
    reg = torch.library.register_fake

    @reg(lib + "statistics")
    def _(x):
        mean, var = _channel_vectors(x, 2)
        return mean, var, mean.new_empty(())

    @reg(lib + "forward")
    def _(x, mean, invstd, gamma, beta, activation, param):
        return torch.empty_like(x)

    @reg(lib + "inplace_backward_reduce")
    def _(z, dz, gamma, beta, activation, param, variant):
        return _channel_vectors(z, 2)

    @reg(lib + "inplace_backward_elementwise")
    def _(z, dz, *args):
        return torch.empty_like(z)

    @reg(lib + "xhat_backward_reduce")
    def _(x, dz, z, mean, invstd, gamma, beta, activation, param):
        return _channel_vectors(x, 2)

    @reg(lib + "xhat_backward_elementwise")
    def _(x, dz, *args):
        return torch.empty_like(x)

    @reg(lib + "linear_backward_reduce")
    def _(x, dz, z, activation, param):
        return _channel_vectors(x, 2)

    @reg(lib + "linear_backward_elementwise")
    def _(x, dz, *args):
        return torch.empty_like(x)
