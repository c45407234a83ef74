"""Tiles, grids and launches of the Triton kernels (kernels/abn_triton.py), and their
ahead-of-time compilation for GPUs this machine does not have.

Tiles: :data:`BLOCK` elements per tile and :data:`WARPS` warps, i.e. 8 elements per thread --
two 16-byte loads per float32 tensor, one per half-precision tensor. Contiguous inputs use
(samples x positions) tiles of one channel (positions first: a plane of S >= BLOCK values is one
row of BLOCK; a small plane, e.g. 7 x 7, is padded to the next power of two and several samples
share a tile); channels-last inputs use (rows x channels) tiles of up to :data:`MAX_CB` channels.
Elementwise grids put the large count on axis 0 (< 2^31) and cap axis 1 at 65535, with
grid-stride loops beyond. Reductions give each program about :data:`TASK` elements (down to
:data:`MIN_TASK` when that leaves fewer than :data:`PROGRAMS` programs; more when a channel would
get over :data:`MAX_PARTIALS` partials), then one merge program per :data:`MAX_CB` channels
combines a channel's partials in float64 in a fixed order. These are fixed choices, not tuned on
a GPU (none was available); see the module's callers for the operators.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from abnexp.errors import AbnexpError

BLOCK = 1024
WARPS = 4
TASK = 32768
MIN_TASK = 4096
PROGRAMS = 1024
MAX_PARTIALS = 1024
MAX_CB = 64
GRID_X, GRID_YZ = 2**31 - 1, 65535
ARCHS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
"""Ahead-of-time targets: name -> triton GPUTarget(backend, arch, warp size)."""


def kernels():
    """The kernel module (``abnexp.kernels.abn_triton``); imports triton."""
    return importlib.import_module("abnexp.kernels.abn_triton")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set in this process's environment."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Geometry:
    """A call's shape in its layout (kernels/abn.h): planes (N, C, S) or rows (R, C, 1)."""

    outer: int
    channels: int
    inner: int
    channels_last: bool

    @property
    def count(self) -> int:
        return self.outer * self.inner


# ---- launches ------------------------------------------------------------------------------
def _pow2(n: int, cap: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), cap)


def _launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args)`` through :func:`torch.library.wrap_triton` (traced by torch.compile
    and torch.export). Interpreted kernels read their tensors' data: with fake tensors (shape
    propagation, torch.export) nothing runs, and torch.compile's functional tracing is refused."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.library import wrap_triton

    if type(kernel).__name__ == "InterpretedFunction":
        if any(isinstance(a, FunctionalTensor) for a in args):
            raise RuntimeError("abnexp: torch.compile cannot trace Triton kernels run by the interpreter "
                               "(TRITON_INTERPRET=1); compile on a GPU, or unset TRITON_INTERPRET")
        if any(isinstance(a, FakeTensor) for a in args):
            return
    wrap_triton(kernel)[grid](*args, num_warps=WARPS, **meta)


@dataclass(frozen=True)
class Plan:
    """One launch: kernel name, grid, the size arguments after the tensors, the constexprs."""

    kernel: str
    grid: tuple[int, ...]
    sizes: tuple[int, ...]
    meta: dict


def reduce_plans(g: Geometry) -> tuple[Plan, Plan]:
    """The partial-sums launch and the merge launch of a reduction over ``g`` (count > 0)."""
    c = g.channels
    task = max(min(TASK, max(MIN_TASK, -(-g.count * c // PROGRAMS))), -(-g.count // MAX_PARTIALS))
    if g.channels_last:
        cb = _pow2(c, MAX_CB)
        rows = BLOCK // cb
        rspan = max(task // cb // rows, -(-g.outer // (MAX_PARTIALS * rows)), 1) * rows
        parts = -(-g.outer // rspan)
        first = Plan("reduce_rows_kernel", (parts * -(-c // cb),), (g.outer, c, rspan), {"ROWS": rows, "CB": cb})
    else:
        n, s = g.outer, g.inner
        bs = _pow2(s, BLOCK)
        grows = BLOCK // bs
        if s > task:
            gn, span = 1, -(-s // -(-s // task) // bs) * bs
        else:
            gn, span = max(grows, task // s // grows * grows), s
        ns = -(-s // span)
        parts = -(-n // gn) * ns
        first = Plan("reduce_planes_kernel", (c * parts,), (n, c, s, gn, span, ns), {"GROWS": grows, "BLOCK_S": bs})
    mcb = _pow2(c, MAX_CB)
    return first, Plan("merge_kernel", (-(-c // mcb),), (parts, c), {"PB": BLOCK // mcb, "CB": mcb})


def elementwise_plan(g: Geometry) -> Plan:
    """The launch of an elementwise kernel over ``g``."""
    c = g.channels
    if g.channels_last:
        cb = _pow2(c, MAX_CB)
        rows = BLOCK // cb
        grid = (min(-(-g.outer // rows), GRID_X), min(-(-c // cb), GRID_YZ))
        return Plan("elementwise_rows_kernel", grid, (g.outer, c), {"ROWS": rows, "CB": cb})
    bs = _pow2(g.inner, BLOCK)
    grows = BLOCK // bs
    grid = (min(-(-g.outer // grows) * c, GRID_X), min(-(-g.inner // bs), GRID_YZ))
    return Plan("elementwise_planes_kernel", grid, (g.outer, c, g.inner), {"GROWS": grows, "BLOCK_S": bs})


def reduce(src: Tensor, z: Optional[Tensor], dz: Optional[Tensor], g: Geometry, p: Tensor, mode: int,
           act: int, out1: Tensor, out2: Tensor) -> None:
    """Per-channel (mean, biased var) (STATS) or (sum dL/dy, sum dL/dy * t) into out1, out2."""
    k = kernels()
    first, merge = reduce_plans(g)
    part = src.new_empty((3, merge.sizes[0], g.channels), dtype=torch.float64)
    z, dz = (src if z is None else z), (src if dz is None else dz)
    _launch(getattr(k, first.kernel), first.grid, src, z, dz, p, part, *first.sizes, MODE=mode, ACT=act,
            **first.meta)
    _launch(k.merge_kernel, merge.grid, part, out1, out2, *merge.sizes, STATS_=mode == k.STATS.value,
            **merge.meta)


def elementwise(src: Tensor, z: Optional[Tensor], dz: Optional[Tensor], out: Tensor, g: Geometry,
                p: Tensor, mode: int, act: int) -> None:
    """z (FORWARD) or dL/dx (backward forms) into ``out`` (may be src or dz themselves)."""
    plan = elementwise_plan(g)
    z, dz = (src if z is None else z), (src if dz is None else dz)
    _launch(getattr(kernels(), plan.kernel), plan.grid, src, z, dz, out, p, *plan.sizes, MODE=mode, ACT=act,
            **plan.meta)


# ---- ahead-of-time compilation --------------------------------------------------------------
POINTERS = {"SRC": "x", "Z": "x", "DZ": "x", "OUT": "x", "PACK": "acc", "OUT1": "acc", "OUT2": "acc",
            "PART": "fp64"}
"""Pointer arguments of the kernels: the input's dtype, the compute dtype, or float64."""
FORMS = {"stats": ("STATS", ("identity",)), "forward": ("FORWARD", ("identity", "leaky_relu", "elu", "relu")),
         "inplace": ("INPLACE", ("identity", "leaky_relu", "elu")),
         "xhat_z": ("XHAT_Z", ("identity", "leaky_relu", "elu", "relu")),
         "xhat": ("XHAT", ("identity", "leaky_relu", "elu", "relu"))}
"""What the operators launch: mode -> (kernel constant, activations it runs with)."""
ACTIVATIONS = {"identity": 0, "leaky_relu": 1, "elu": 2, "relu": 3}
DTYPE_NAMES = ("fp32", "fp64", "fp16", "bf16")


def _tiles(kernel: str) -> list[dict]:
    """Tile constexprs a kernel is launched with, the main one (large inputs) first."""
    if "planes" in kernel:
        return [{"GROWS": BLOCK // bs, "BLOCK_S": bs} for bs in (BLOCK, 64, 1)]
    if "rows" in kernel:
        return [{"ROWS": BLOCK // cb, "CB": cb} for cb in (MAX_CB, 2)]
    return [{"PB": BLOCK // cb, "CB": cb} for cb in (MAX_CB, 1)]


def specializations(full: bool = False) -> list[tuple[str, dict, str, Optional[str]]]:
    """(kernel, constexprs, input dtype, size argument passed as int64 or None) to compile: every
    mode x activation in float32 (every dtype with ``full``), each other dtype with the stats /
    forward and the ELU x-hat-with-z bodies, each tile shape once (tile sizes do not change the
    code, only its layout), and once with the long axis (S or R) beyond 2^31 (Triton passes such
    sizes as int64)."""
    k, specs = kernels(), []
    for kernel, modes in (("reduce_planes_kernel", ("stats", "inplace", "xhat_z", "xhat")),
                          ("reduce_rows_kernel", ("stats", "inplace", "xhat_z", "xhat")),
                          ("elementwise_planes_kernel", ("forward", "inplace", "xhat_z", "xhat")),
                          ("elementwise_rows_kernel", ("forward", "inplace", "xhat_z", "xhat"))):
        main, *others = _tiles(kernel)
        for mode in modes:
            for act in FORMS[mode][1]:
                wide = full or (act == FORMS[mode][1][0] and mode in ("stats", "forward")) or \
                    (mode, act) == ("xhat_z", "elu")
                for dtype in DTYPE_NAMES if wide else DTYPE_NAMES[:1]:
                    const = getattr(k, FORMS[mode][0]).value
                    specs.append((kernel, {"MODE": const, "ACT": ACTIVATIONS[act], **main}, dtype, None))
        first = FORMS[modes[0]][0]
        specs += [(kernel, {"MODE": getattr(k, first).value, "ACT": 0, **t}, "fp32", None) for t in others]
        long_axis = "S" if "planes" in kernel else "R"
        specs.append((kernel, {"MODE": k.XHAT.value, "ACT": ACTIVATIONS["elu"], **main}, "fp32", long_axis))
    specs += [("merge_kernel", {"STATS_": stats, **t}, dtype, None) for stats in (True, False)
              for t in _tiles("merge") for dtype in ("fp32", "fp64")]
    return specs


def _resources(compiled, backend: str) -> tuple[Optional[int], Optional[int]]:
    """(registers per thread, spills) of a compiled kernel: NVIDIA: cuobjdump's REG and LOCAL
    (bytes of local memory per thread, where spills go); AMD: VGPRs and spilled VGPRs + SGPRs."""
    if backend == "hip":
        text = compiled.asm["amdgcn"]
        get = lambda key: int(re.search(rf"\.{key}:\s+(\d+)", text).group(1))  # noqa: E731
        return get("vgpr_count"), get("vgpr_spill_count") + get("sgpr_spill_count")
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*LOCAL:(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


def _compile(kernel: str, const: dict, dtype: str, wide: Optional[str], arch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernels(), kernel)
    kinds = {"x": dtype, "acc": "fp64" if dtype == "fp64" else "fp32", "fp64": "fp64"}
    sig = {a: "constexpr" if a in const else f"*{kinds[POINTERS[a]]}" if a in POINTERS else
           "i64" if a == wide else "i32" for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if a in POINTERS or a in ("C", "S", "SPAN")}  # as Triton specializes aligned sizes
    label = ",".join(f"{n}={v}" for n, v in const.items())
    row = {"kernel": f"{kernel}[{label},{dtype}{f',{wide}:i64' if wide else ''}]", "arch": arch, "ok": False, "registers": None,
           "spills": None, "shared_bytes": None, "error": None}
    backend, target, warp = ARCHS[arch]
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=aligned),
                                  target=GPUTarget(backend, target, warp), options={"num_warps": WARPS})
    except Exception as err:  # triton raises CompilationError, PTXASError, RuntimeError, ...
        row["error"] = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        return row
    row["registers"], row["spills"] = _resources(compiled, backend)
    row.update(ok=True, shared_bytes=compiled.metadata.shared)
    return row


def compile_ahead(archs: list[str], full: bool = False) -> list[dict]:
    """Compile the kernels' specializations (:func:`specializations`) for each target of
    :data:`ARCHS` with Triton's own compiler, without a GPU.

    Returns:
        one row per kernel specialization and arch: {kernel, arch, ok, registers (per thread),
        spills (NVIDIA: local-memory bytes per thread; AMD: spilled registers), shared_bytes
        (what a launch requests), error (the compiler's last line, or None)}.

    Raises:
        AbnexpError: an unknown arch name, or triton cannot be imported.
    """
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise AbnexpError(f"unknown Triton target(s) {', '.join(unknown)}; valid: {', '.join(ARCHS)}")
    if interpreting():  # the interpreter replaces the kernels at import: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-m", __name__, ",".join(archs), str(int(full))], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise AbnexpError(f"ahead-of-time compilation failed: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    try:
        specs = specializations(full)
    except ImportError as err:
        raise AbnexpError(f"triton cannot be imported ({err}); install it with `pip install triton`") from err
    return [_compile(*spec, arch) for arch in archs for spec in specs]
