"""The CUDA toolkit that builds kernels/abn_cuda.cu: where it is and whether it can build here.

The toolkit is found as :mod:`torch.utils.cpp_extension` finds it, except that an ``nvcc`` on PATH
is followed to the real compiler:

1. ``$CUDA_HOME`` (or ``$CUDA_PATH``);
2. the ``nvcc`` on PATH, through symlinks and wrapper scripts (``exec /usr/local/cuda-13.0/bin/nvcc
   "$@"``, conda or module shims) to the binary: a binary's toolkit is the parent of its folder;
   for a script, nvcc itself says where it runs from (``nvcc --dryrun`` prints ``_HERE_=<bin>``).
   torch takes the parent of PATH's nvcc as it is, which for a wrapper in /usr/local/bin is
   /usr/local, without a compiler;
3. ``/usr/local/cuda``.

:func:`problem` says why that toolkit cannot build CUDA kernels for this torch, with the fix:
none found, a torch without CUDA (CPU-only or ROCm), an nvcc whose CUDA major version differs
from ``torch.version.cuda``'s (torch refuses to build then; a minor difference is fine), or no
requested architecture that nvcc can compile. :func:`cuda_archs` drops from the requested
architectures (``TORCH_CUDA_ARCH_LIST``, else the visible GPUs', else sm_80 and sm_90) those that
``nvcc --list-gpu-arch`` does not list, with a warning naming them.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import warnings
from typing import Optional

import torch

DEFAULT_CUDA_ARCHS = ("8.0", "9.0")
"""Architectures compiled when no GPU is visible (``TORCH_CUDA_ARCH_LIST`` overrides)."""
NO_TOOLKIT_FIX = ("set CUDA_HOME to a CUDA toolkit whose major version is torch's (torch.version.cuda), "
                  "or use the Triton kernels, which need no toolkit (ABNEXP_KERNELS=triton)")
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _run(cmd: list[str]) -> Optional[str]:
    """stdout + stderr of ``cmd`` (30 s at most), or None when it cannot run or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


def real_nvcc_bin(path: str) -> Optional[str]:
    """The folder of the nvcc binary that ``path`` (a symlink, a wrapper script or the binary)
    runs, or None when that cannot be told."""
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return os.path.dirname(real)
    except OSError:
        return None
    out = _run([path, "--dryrun", "-x", "cu", "-E", os.devnull]) or ""
    here = re.search(r"^#\$ _HERE_=(.+)$", out, re.M)
    return here.group(1).strip() if here and os.path.isfile(os.path.join(here.group(1).strip(), "nvcc")) else None


def cuda_home() -> Optional[str]:
    """``$CUDA_HOME`` (or ``$CUDA_PATH``), else the toolkit of the nvcc on PATH (followed to the
    real binary), else ``/usr/local/cuda`` if it exists, else None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    on_path = shutil.which("nvcc")
    folder = real_nvcc_bin(on_path) if on_path else None
    if folder:
        return os.path.dirname(folder)
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def nvcc() -> Optional[str]:
    """The toolkit's ``bin/nvcc`` under :func:`cuda_home`, or None."""
    home = cuda_home()
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.exists(path) else None


@functools.lru_cache(maxsize=None)
def release(nvcc_path: str) -> Optional[str]:
    """The CUDA release of ``nvcc --version`` ("13.0"), or None."""
    found = re.search(r"release (\d+\.\d+)", _run([nvcc_path, "--version"]) or "")
    return found.group(1) if found else None


@functools.lru_cache(maxsize=None)
def buildable_archs(nvcc_path: str) -> Optional[frozenset[str]]:
    """Architectures nvcc compiles, as "80", "90", ... (``nvcc --list-gpu-arch``); None when
    this nvcc cannot tell (before CUDA 11.0)."""
    found = re.findall(r"compute_(\d+)", _run([nvcc_path, "--list-gpu-arch"]) or "")
    return frozenset(found) or None


def _number(arch: str) -> str:
    """"9.0" / "9.0a" / "8.6+PTX" -> "90" / "90" / "86"."""
    return re.sub(r"[^0-9]", "", arch.replace("+PTX", "").rstrip("af"))


def requested_archs() -> tuple[str, ...]:
    """``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs' capabilities, else the defaults."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return tuple(a for a in env.replace(";", " ").split() if a)
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return tuple(f"{a}.{b}" for a, b in sorted(caps))
    return DEFAULT_CUDA_ARCHS


def cuda_archs() -> tuple[str, ...]:
    """:func:`requested_archs` less those :func:`nvcc` cannot compile (a warning names them);
    empty when none is left."""
    archs, path = requested_archs(), nvcc()
    known = buildable_archs(path) if path else None
    if known is None:
        return archs
    kept = tuple(a for a in archs if _number(a) in known)
    dropped = [a for a in archs if a not in kept]
    if dropped:
        oldest, newest = (f"{n[:-1]}.{n[-1]}" for n in (min(known, key=int), max(known, key=int)))
        _warn_once(f"abnexp: CUDA {release(path)} at {path} cannot compile for {', '.join(dropped)} (it compiles "
                   f"{oldest} to {newest}); building the CUDA kernels for {', '.join(kept) or 'nothing'}" +
                   ("" if os.environ.get("TORCH_CUDA_ARCH_LIST") is None else
                    "; remove them from TORCH_CUDA_ARCH_LIST to silence this"))
    return kept


def gencode_flags(archs) -> list[str]:
    """nvcc ``-gencode`` flags for archs like "9.0" (PTX of the newest one for later GPUs)."""
    nums = [a.replace("+PTX", "").replace(".", "") for a in archs]
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    return flags + [f"-gencode=arch=compute_{nums[-1]},code=compute_{nums[-1]}"]


def problem() -> Optional[str]:
    """None when the toolkit can build the CUDA kernels for this torch, else why not and the fix."""
    if torch.version.cuda is None:
        runtime = f"ROCm (HIP {torch.version.hip})" if getattr(torch.version, "hip", None) else "the CPU only"
        return (f"torch {torch.__version__} is built for {runtime}, so the native CUDA kernels cannot be built "
                f"for it; the Triton kernels serve its GPUs (ABNEXP_KERNELS=triton)")
    path = nvcc()
    if path is None:
        on_path = shutil.which("nvcc")
        where = (f"the nvcc on PATH ({on_path}) is a wrapper whose toolkit could not be found" if on_path and not
                 os.environ.get("CUDA_HOME") else f"no bin/nvcc under CUDA_HOME={cuda_home()!r}, none on PATH")
        return f"no CUDA toolkit: {where}; {NO_TOOLKIT_FIX}"
    found = release(path)
    if found is None:
        return f"{path} --version does not name a CUDA release; {NO_TOOLKIT_FIX}"
    if found.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc at {path} is CUDA {found} but torch {torch.__version__} was built with CUDA "
                f"{torch.version.cuda}, and their major versions must match; {NO_TOOLKIT_FIX}")
    if not cuda_archs():
        return (f"CUDA {found} at {path} compiles none of the architectures {', '.join(requested_archs())}; "
                f"set TORCH_CUDA_ARCH_LIST to architectures it lists in `nvcc --list-gpu-arch`, or use a "
                f"toolkit that still supports these GPUs")
    return None


def describe() -> str:
    """"CUDA 13.0 at /usr/local/cuda-13.0" (or why there is none), for build reports."""
    path = nvcc()
    return f"CUDA {release(path)} at {os.path.dirname(os.path.dirname(path))}" if path else "no CUDA toolkit"
