"""Triton kernels of abnexp's BN + activation operators (the ``abnexp_triton`` backend).

The full-size work of every operator of ``torch.ops.abnexp`` (kernels/ops.cpp) in five kernel
bodies; :mod:`abnexp.norm.triton_backend` computes the per-channel coefficients and launches them.
Notation and layouts as in kernels/abn.h (InPlace-ABN, Rota Bulo et al., CVPR 2018, and its
supplementary): a call's tensors are dense in one of two layouts,

* planes (NCHW contiguous): element (n, c, s) at (n * C + c) * S + s; tiles of (GROWS samples n
  of one channel) x (BLOCK_S consecutive s), so the channel is one scalar per tile;
* rows (channels-last, also (N, C) and S == 1): element (r, c) at r * C + c; tiles of
  (ROWS rows) x (CB consecutive channels).

No per-element integer division: program ids are split into (tile, channel) once per program.
Offsets are int64 (rows are cast before they are multiplied by strides). Arithmetic is in the
dtype of ``PACK`` (float64 for float64 inputs, float32 otherwise); full-size inputs are upcast on
load and results are rounded to the output's dtype on store.

``PACK`` holds the activation parameter and the per-channel vectors of one call:
``PACK[0] = param`` (LeakyReLU slope / ELU alpha; then padding up to HEAD) and vector ``k`` of
length C at ``PACK[HEAD + k * C]``, with k = SHIFT (mean, or tshift of the in-place forms), MUL
(invstd, tmul, or the forward's invstd * gamma), GAMMA, BETA, A, B, K (dL/dx = A * dL/dy + B * t
+ K).

What a kernel computes is ``MODE``: STATS (per-channel mean / M2), FORWARD
(z = act((x - mean) * scale + beta)), or a backward form giving (dL/dy, t): INPLACE (src = z:
dL/dy = act'(z) dz, t = (act^-1(z) - tshift) * tmul), XHAT_Z (src = x, z saved:
t = (x - mean) * invstd, dL/dy = act'(z) dz) and XHAT (z recomputed as act(gamma * t + beta)).
Reductions write per-program partials to ``PART`` (float64, (3, P, C): count, then mean and M2
or the two sums) that :func:`merge_kernel` combines in a fixed order: results do not depend on
scheduling (no atomics).
"""
import triton
import triton.language as tl

# activations (abnexp/norm/activations.py, kernels/abn_math.h)
IDENTITY = tl.constexpr(0)
LEAKY_RELU = tl.constexpr(1)
ELU = tl.constexpr(2)
RELU = tl.constexpr(3)
# what a kernel computes (see the module docstring)
STATS = tl.constexpr(0)
FORWARD = tl.constexpr(1)
INPLACE = tl.constexpr(2)
XHAT_Z = tl.constexpr(3)
XHAT = tl.constexpr(4)
# PACK's layout
HEAD = tl.constexpr(4)
SHIFT = tl.constexpr(0)
MUL = tl.constexpr(1)
GAMMA = tl.constexpr(2)
BETA = tl.constexpr(3)
A = tl.constexpr(4)
B = tl.constexpr(5)
K = tl.constexpr(6)


# Kernels use no triton.language @jit helpers (tl.sum, tl.cdiv, tl.zeros) -- tl.reduce with tl.sum's
# combine function, (a + b - 1) // b and tl.full instead -- so that, imported under
# TRITON_INTERPRET=1, they run even when triton was imported before it was set (as under pytest);
# nested calls are few, each costs the interpreter a patch of triton.language.
_ADD = tl.standard._sum_combine  # tl.sum's combine function (the interpreter sums it with numpy)


# ---- activations: forward, dL/dy from the output, inverse ----------------------------------
@triton.jit
def _act_forward(y, p, ACT: tl.constexpr):
    if ACT == LEAKY_RELU:
        r = tl.where(y > 0, y, y * p)
    elif ACT == ELU:
        r = tl.where(y > 0, y, p * (tl.exp(y) - 1))
    elif ACT == RELU:
        r = tl.where(y > 0, y, 0.0)
    else:
        r = y
    return r


@triton.jit
def _act_backward(z, dz, p, ACT: tl.constexpr):
    if ACT == LEAKY_RELU:
        r = tl.where(z > 0, dz, dz * p)
    elif ACT == ELU:
        r = tl.where(z > 0, dz, dz * (z + p))
    elif ACT == RELU:
        r = tl.where(z > 0, dz, 0.0)
    else:
        r = dz
    return r


@triton.jit
def _act_inverse(z, inv_p, elu_min, ACT: tl.constexpr):
    if ACT == LEAKY_RELU:
        r = tl.where(z >= 0, z, z * inv_p)
    elif ACT == ELU:
        r = tl.where(z > 0, z, tl.log(1 + tl.maximum(z * inv_p, elu_min)))
    else:
        r = z
    return r


# ---- one tile ------------------------------------------------------------------------------
@triton.jit
def _vectors(PACK, C, c, cmask, MODE: tl.constexpr):
    """What MODE reads of the per-channel vectors at channel(s) c -- scalars (planes) or (1, CB)
    rows (rows) -- and of the activation constants, 0 for the rest: (SHIFT, MUL, GAMMA, BETA, A,
    B, K, param, 1 / param, -1 + eps)."""
    v = PACK + HEAD + c
    gamma, beta, a, b, k, inv_p, elu_min = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if MODE == FORWARD or MODE == XHAT:
        beta = tl.load(v + BETA * C, mask=cmask, other=0)
    if MODE == XHAT:
        gamma = tl.load(v + GAMMA * C, mask=cmask, other=0)
    p = tl.load(PACK)
    if MODE == INPLACE:  # 1 / p (0 for p == 0) and the ELU inverse's clamp -1 + eps(acc), as abn_math.h
        inv_p = tl.where(p != 0, 1 / tl.where(p != 0, p, 1.0), 0.0)
        if PACK.dtype.element_ty == tl.float64:
            elu_min = p * 0 - 1 + 2.220446049250313e-16
        else:
            elu_min = p * 0 - 1 + 1.1920928955078125e-07
    if MODE != FORWARD:
        a = tl.load(v + A * C, mask=cmask, other=0)
        b = tl.load(v + B * C, mask=cmask, other=0)
        k = tl.load(v + K * C, mask=cmask, other=0)
    return (tl.load(v + SHIFT * C, mask=cmask, other=0), tl.load(v + MUL * C, mask=cmask, other=0),
            gamma, beta, a, b, k, p, inv_p, elu_min)


@triton.jit
def _dy_t(src, Z, DZ, off, mask, shift, mul, gamma, beta, p, inv_p, elu_min, MODE: tl.constexpr,
          ACT: tl.constexpr):
    """(dL/dy, t) of a backward form on one tile; src is the tile of the saved input."""
    dz = tl.load(DZ + off, mask=mask, other=0).to(src.dtype)
    if MODE == INPLACE:
        dy = _act_backward(src, dz, p, ACT)
        t = (_act_inverse(src, inv_p, elu_min, ACT) - shift) * mul
    else:
        t = (src - shift) * mul
        if MODE == XHAT_Z:
            z = tl.load(Z + off, mask=mask, other=0).to(src.dtype)
        else:
            z = _act_forward(gamma * t + beta, p, ACT)
        dy = _act_backward(z, dz, p, ACT)
    return dy, t


@triton.jit
def _reduce_terms(SRC, Z, DZ, off, mask, PACK, C, c, cmask, center, MODE: tl.constexpr,
                  ACT: tl.constexpr):
    """The two summed terms of a tile: (x - center, its square) or (dL/dy, dL/dy * t)."""
    src = tl.load(SRC + off, mask=mask, other=0).to(PACK.dtype.element_ty)
    if MODE == STATS:
        u = tl.where(mask, src - center, 0.0)
        w = u * u
    else:
        shift, mul, gamma, beta, a, b, k, p, inv_p, elu_min = _vectors(PACK, C, c, cmask, MODE)
        dy, t = _dy_t(src, Z, DZ, off, mask, shift, mul, gamma, beta, p, inv_p, elu_min, MODE, ACT)
        u = tl.where(mask, dy, 0.0)
        w = u * t
    return u, w


@triton.jit
def _element(SRC, Z, DZ, OUT, off, mask, PACK, C, c, cmask, MODE: tl.constexpr, ACT: tl.constexpr):
    """Write one tile of z (FORWARD) or dL/dx (backward forms)."""
    src = tl.load(SRC + off, mask=mask, other=0).to(PACK.dtype.element_ty)
    shift, mul, gamma, beta, a, b, k, p, inv_p, elu_min = _vectors(PACK, C, c, cmask, MODE)
    if MODE == FORWARD:
        r = _act_forward((src - shift) * mul + beta, p, ACT)
    else:
        dy, t = _dy_t(src, Z, DZ, off, mask, shift, mul, gamma, beta, p, inv_p, elu_min, MODE, ACT)
        r = a * dy + b * t + k
    tl.store(OUT + off, r.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _store_partial(PART, P, C, k, c, cmask, count, su, sw, center, MODE: tl.constexpr):
    """Partial k of channel(s) c: (count, mean, M2) for STATS, else (count, sum u, sum w)."""
    n = count.to(tl.float64)
    s1 = su.to(tl.float64)
    s2 = sw.to(tl.float64)
    if MODE == STATS:
        s2 = s2 - s1 * s1 / n
        s1 = center.to(tl.float64) + s1 / n
    base = PART + k * C + c
    tl.store(base, n, mask=cmask)
    tl.store(base + P * C, s1, mask=cmask)
    tl.store(base + 2 * P * C, s2, mask=cmask)


# ---- the kernels ---------------------------------------------------------------------------
@triton.jit
def reduce_planes_kernel(SRC, Z, DZ, PACK, PART, N, C, S, GN, SPAN, NS, MODE: tl.constexpr,
                         ACT: tl.constexpr, GROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Planes layout, grid (C * P,): program (c, k) sums samples [n0, n0 + GN) x positions
    [s0, s0 + SPAN) of channel c, partial k = (sample group, position chunk) of P."""
    P = (N + GN - 1) // GN * NS
    pid = tl.program_id(0)
    c = pid // P
    k = pid - c * P
    g = k // NS
    n0 = g * GN
    n1 = tl.minimum(n0 + GN, N)
    s0 = (k - g * NS) * SPAN
    s1 = tl.minimum(s0 + SPAN, S)
    center = 0.0
    if MODE == STATS:  # shifted sums: center on the mean of the program's first tile
        n_first = n0 + tl.arange(0, GROWS)
        s_first = s0 + tl.arange(0, BLOCK_S)
        off = ((n_first.to(tl.int64) * C + c) * S)[:, None] + s_first[None, :]
        in_first = (n_first < n1)[:, None] & (s_first < s1)[None, :]
        first = tl.load(SRC + off, mask=in_first, other=0).to(PACK.dtype.element_ty)
        count = tl.minimum(n1 - n0, GROWS) * tl.minimum(s1 - s0, BLOCK_S)
        center = tl.reduce(first, None, _ADD) / count
    su = tl.full([GROWS, BLOCK_S], 0, PACK.dtype.element_ty)
    sw = tl.full([GROWS, BLOCK_S], 0, PACK.dtype.element_ty)
    for n in range(n0, n1, GROWS):
        rows = n + tl.arange(0, GROWS)
        base = (rows.to(tl.int64) * C + c) * S
        for s in range(s0, s1, BLOCK_S):
            cols = s + tl.arange(0, BLOCK_S)
            mask = (rows < n1)[:, None] & (cols < s1)[None, :]
            u, w = _reduce_terms(SRC, Z, DZ, base[:, None] + cols[None, :], mask, PACK, C, c, c < C,
                                 center, MODE, ACT)
            su += u
            sw += w
    _store_partial(PART, P, C, k, c, c < C, (n1 - n0) * (s1 - s0), tl.reduce(su, None, _ADD),
                   tl.reduce(sw, None, _ADD), center, MODE)


@triton.jit
def reduce_rows_kernel(SRC, Z, DZ, PACK, PART, R, C, RSPAN, MODE: tl.constexpr, ACT: tl.constexpr,
                       ROWS: tl.constexpr, CB: tl.constexpr):
    """Rows layout, grid (P * cdiv(C, CB),): program (k, channel block) sums rows
    [k * RSPAN, (k + 1) * RSPAN) of CB channels into partial k of P."""
    ncb = (C + CB - 1) // CB
    pid = tl.program_id(0)
    k = pid // ncb
    cols = (pid - k * ncb) * CB + tl.arange(0, CB)
    cmask = cols < C
    r0 = k * RSPAN
    r1 = tl.minimum(r0 + RSPAN, R)
    c2 = cols[None, :]
    cm2 = cmask[None, :]
    center = tl.full([1, CB], 0, PACK.dtype.element_ty)
    if MODE == STATS:  # shifted sums: center each channel on the mean of the first tile
        r_first = r0 + tl.arange(0, ROWS)
        in_first = (r_first < r1)[:, None] & cm2
        first = tl.load(SRC + r_first.to(tl.int64)[:, None] * C + c2, mask=in_first, other=0)
        center = tl.reduce(first.to(PACK.dtype.element_ty), 0, _ADD)[None, :] / tl.minimum(r1 - r0, ROWS)
    su = tl.full([ROWS, CB], 0, PACK.dtype.element_ty)
    sw = tl.full([ROWS, CB], 0, PACK.dtype.element_ty)
    for r in range(r0, r1, ROWS):
        rows = r + tl.arange(0, ROWS)
        mask = (rows < r1)[:, None] & cm2
        u, w = _reduce_terms(SRC, Z, DZ, rows.to(tl.int64)[:, None] * C + c2, mask, PACK, C, c2,
                             cm2, center, MODE, ACT)
        su += u
        sw += w
    _store_partial(PART, (R + RSPAN - 1) // RSPAN, C, k, cols, cmask, r1 - r0, tl.reduce(su, 0, _ADD),
                   tl.reduce(sw, 0, _ADD), tl.reduce(center, 0, _ADD), MODE)


@triton.jit
def merge_kernel(PART, OUT1, OUT2, P, C, STATS_: tl.constexpr, PB: tl.constexpr,
                 CB: tl.constexpr):
    """Grid (cdiv(C, CB),): combine the P partials of CB channels in float64, in a fixed order.
    Statistics: (mean, biased variance) around partial 0's mean (Chan et al.'s pairwise formula
    in closed form); sums: (sum u, sum w)."""
    cols = tl.program_id(0) * CB + tl.arange(0, CB)
    cmask = cols < C
    ref = tl.full([CB], 0, tl.float64)
    if STATS_:
        ref = tl.load(PART + P * C + cols, mask=cmask, other=0)
    a0 = tl.full([PB, CB], 0, tl.float64)
    a1 = tl.full([PB, CB], 0, tl.float64)
    a2 = tl.full([PB, CB], 0, tl.float64)
    for k in range(0, P, PB):
        ks = k + tl.arange(0, PB)
        mask = (ks < P)[:, None] & cmask[None, :]
        off = ks[:, None] * C + cols[None, :]
        n = tl.load(PART + off, mask=mask, other=0)
        v1 = tl.load(PART + P * C + off, mask=mask, other=0)
        v2 = tl.load(PART + 2 * P * C + off, mask=mask, other=0)
        if STATS_:
            d = tl.where(mask, v1 - ref[None, :], 0.0)
            a0 += n
            a1 += n * d
            a2 += v2 + n * d * d
        else:
            a1 += v1
            a2 += v2
    s1 = tl.reduce(a1, 0, _ADD)
    s2 = tl.reduce(a2, 0, _ADD)
    if STATS_:
        n = tl.where(cmask, tl.reduce(a0, 0, _ADD), 1.0)
        s2 = tl.maximum(s2 - s1 * s1 / n, 0.0) / n
        s1 = ref + s1 / n
    tl.store(OUT1 + cols, s1.to(OUT1.dtype.element_ty), mask=cmask)
    tl.store(OUT2 + cols, s2.to(OUT2.dtype.element_ty), mask=cmask)


@triton.jit
def elementwise_planes_kernel(SRC, Z, DZ, OUT, PACK, N, C, S, MODE: tl.constexpr,
                              ACT: tl.constexpr, GROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Planes layout, grid (<= cdiv(N, GROWS) * C, <= cdiv(S, BLOCK_S)) with grid-stride loops:
    axis 0 runs over (sample group, channel), axis 1 over position blocks."""
    nsb = (S + BLOCK_S - 1) // BLOCK_S
    for q in range(tl.program_id(0), tl.cast((N + GROWS - 1) // GROWS, tl.int64) * C, tl.num_programs(0)):
        g = q // C
        c = q - g * C
        rows = g * GROWS + tl.arange(0, GROWS)
        base = (rows.to(tl.int64) * C + c) * S
        for sb in range(tl.program_id(1), nsb, tl.num_programs(1)):
            cols = sb * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = (rows < N)[:, None] & (cols < S)[None, :]
            _element(SRC, Z, DZ, OUT, base[:, None] + cols[None, :], mask, PACK, C, c, c < C, MODE,
                     ACT)


@triton.jit
def elementwise_rows_kernel(SRC, Z, DZ, OUT, PACK, R, C, MODE: tl.constexpr, ACT: tl.constexpr,
                            ROWS: tl.constexpr, CB: tl.constexpr):
    """Rows layout, grid (<= cdiv(R, ROWS), <= cdiv(C, CB)) with grid-stride loops."""
    for rb in range(tl.program_id(0), (R + ROWS - 1) // ROWS, tl.num_programs(0)):
        rows = rb * ROWS + tl.arange(0, ROWS)
        for cb in range(tl.program_id(1), (C + CB - 1) // CB, tl.num_programs(1)):
            cols = cb * CB + tl.arange(0, CB)
            mask = (rows < R)[:, None] & (cols < C)[None, :]
            _element(SRC, Z, DZ, OUT, rows.to(tl.int64)[:, None] * C + cols[None, :], mask, PACK, C,
                     cols[None, :], (cols < C)[None, :], MODE, ACT)
