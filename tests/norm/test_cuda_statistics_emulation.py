"""The CUDA statistics kernel's order of operations, emulated in float32 on the CPU.

No GPU runs this project's CI, so the accuracy of ``kernels/abn_cuda.cu``'s batch statistics is
shown by replaying, with numpy float32 arithmetic, exactly what its threads compute, in the
same order, and comparing the variance with float64 truth on the project's mean-1e4 check input
(``abnexp kernels check`` / test_kernels.py, tolerance 1e-5 relative). What is mirrored, by
function of kernels/abn_cuda.cu:

* ``splits_for`` / ``reduce_partials``: the (channel groups x splits) grid for a GPU with a given
  number of multiprocessors (108: A100, 132: H100 SXM; 1: long per-thread runs);
* ``reduce_channel_major_kernel`` (thread t of block (c, k) takes values begin + t,
  begin + t + 512, ...) and ``reduce_channels_last_kernel`` (thread (x, y) of block (tile, k)
  takes channel tile * 32 + x, rows r0 + y, r0 + y + 16, ...);
* ``StatsOp::accumulate`` / ``flush`` / ``finish``: d = x - K (K = x[c * shift_stride], the
  channel's first value), s1 = s1 + d, s2 = fma(d, d, s2), every kChunk values the chunk
  (n, s1 / n, fma(-s1, mean, s2)) merged into the thread's state;
* ``WelfordState::merge`` (Chan): mean = fma(d, f, mean), m2 = m2 + fma(d * d * n, f, o.m2);
* ``block_reduce`` (shuffle-down tree of each warp, then of the warps' results in warp 0) and
  the channels-last shared-memory halving over y;
* ``finalize_statistics_kernel``: Chan's merge of the partials in float64 in split order,
  mean = K + mean(d), var = m2 / n rounded to float32.

The fused multiply-adds are the explicit ``fma_rn`` calls of the kernel (``__fmaf_rn``: one
rounding), emulated as the float64 product plus addend rounded to float32 (the product of two
floats is exact in float64; the double rounding differs from one fused rounding with
probability ~2^-29 per operation). The constants (threads, chunk, tile) are read from the .cu,
and the mirrored statements are asserted to be in it, so a change of the kernel fails here
until the emulation follows it.

The counter-example is the kernel's previous method, an unshifted float32 Welford per thread
(``n += 1; d = x - mean; mean += d / n; m2 += d * (x - mean)``, the multiply-add contracted by
nvcc as it does by default), through the same partition and merges: it misses 1e-5.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
CU = "".join((KERNELS / name).read_text() for name in ("abn_cuda_ops.h", "abn_cuda.cu"))  # the CUDA module
TOLERANCE = 1e-5  # abnexp kernels check: float32 statistics, relative
SHAPE = (3, 5, 123, 211)  # (N, C, H, W): C = 5, 77 859 values per channel
F32 = np.float32


def constant(name: str) -> int:
    """``constexpr int <name> = <value>;`` of the CUDA module (kernels/abn_cuda_ops.h, abn_cuda.cu)."""
    return int(re.search(rf"constexpr int {name} = (\d+);", CU).group(1))


THREADS, CHUNK, TILE_C, ROWS_Y = (constant(n) for n in ("kThreads", "kChunk", "kTileC", "kRowsY"))
MIRRORED = (  # the statements emulated below, verbatim
    "const acc d = static_cast<acc>(x[i]) - t.shift;", "t.s1 = t.s1 + d;", "t.s2 = fma_rn(d, d, t.s2);",
    "if (++t.count == kChunk) flush(t);", "const acc n = static_cast<acc>(t.count), mean = t.s1 / n;",
    "t.s.merge(State{n, mean, fma_rn(-t.s1, mean, t.s2)});",
    "const acc total = n + o.n, d = o.mean - mean, f = o.n / total;", "mean = fma_rn(d, f, mean);",
    "const acc w = d * d * n;", "m2 = m2 + fma_rn(w, f, o.m2);",
    "for (int offset = 16; offset > 0; offset >>= 1) s.merge(s.shfl_down(offset));",
    "for (int half = kRowsY / 2; half > 0; half >>= 1) {",
    "const int64_t shift_stride = g.channels_last ? 1 : g.inner;",
    "splits = splits_for(C, g.count(), 8 * kThreads);", "splits = splits_for(tiles, g.outer, 8 * kRowsY);",
    "mean[c] = static_cast<acc>(n > 0 ? shift + mu : CUDART_NAN);",
)


class Arith:
    """The arithmetic of one emulation: float32 (the kernel's acc_t for float inputs) or float64
    (a check of the emulation's bookkeeping: then every value must be counted exactly once)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def fma(self, a, b, c):
        """a * b + c with one rounding (float32: the float64 product is exact)."""
        return (a.astype(np.float64) * b + c).astype(self.dtype)

    def merge(self, a, b):
        """WelfordState::merge of two arrays of states (n, mean, m2): o.n == 0 keeps a,
        a's n == 0 takes b, else Chan's update."""
        (n, mu, m2), (on, omu, om2) = a, b
        total = n + on
        d = omu - mu
        f = on / np.where(total > 0, total, 1).astype(self.dtype)
        new = (total, self.fma(d, f, mu), m2 + self.fma(d * d * n, f, om2))
        keep, take = on == 0, n == 0
        return tuple(np.where(keep, x, np.where(take, y, z)).astype(self.dtype)
                     for x, y, z in zip(a, b, new))


def splits_for(groups: int, values: int, min_per_block: int, sms: int) -> int:
    wanted = max(1, -(-4 * sms // groups))
    useful = max(1, -(-values // min_per_block))
    return min(wanted, useful, 65535)


def thread_values(x: np.ndarray, layout: str, sms: int):
    """The values each thread reads, in its order: (values, valid) of shape (C, splits, threads
    per channel, L), and the number of splits."""
    n, c = x.shape[:2]
    per_channel = x.reshape(n, c, -1).transpose(1, 0, 2).reshape(c, -1)  # channel-major order j = n * S + s
    m = per_channel.shape[1]
    if layout == "contiguous":  # reduce_channel_major_kernel: stride THREADS through [begin, end)
        splits = splits_for(c, m, 8 * THREADS, sms)
        lanes = THREADS
    else:  # reduce_channels_last_kernel: rows r0 + y, r0 + y + ROWS_Y, ... (row r = value j here)
        splits = splits_for(-(-c // TILE_C), m, 8 * ROWS_Y, sms)
        lanes = ROWS_Y
    per_split = -(-m // splits)
    length = -(-per_split // lanes)
    values = np.zeros((c, splits, lanes * length), x.dtype)
    valid = np.zeros(values.shape, bool)
    for k in range(splits):
        part = per_channel[:, k * per_split:min(m, (k + 1) * per_split)]
        values[:, k, :part.shape[1]], valid[:, k, :part.shape[1]] = part, True
    order = (0, 1, 3, 2)  # value begin + lane + lanes * i -> [lane, i]
    return (values.reshape(c, splits, length, lanes).transpose(order),
            valid.reshape(c, splits, length, lanes).transpose(order), splits)


def shifted_chunks(ar: Arith, values, valid, shift):
    """StatsOp::accumulate / flush / finish of every thread at once."""
    dt = ar.dtype
    zeros = np.zeros(values.shape[:-1], dt)
    state, count, s1, s2 = (zeros, zeros, zeros), np.zeros(values.shape[:-1], int), zeros, zeros

    def flush(state, where):
        n = count.astype(dt)
        mean = (s1 / np.where(n > 0, n, 1)).astype(dt)
        chunk = (np.where(where, n, 0).astype(dt), mean, ar.fma(-s1, mean, s2))
        return ar.merge(state, chunk)

    for i in range(values.shape[-1]):
        ok = valid[..., i]
        d = (values[..., i] - shift).astype(dt)
        s1, s2, count = np.where(ok, s1 + d, s1), np.where(ok, ar.fma(d, d, s2), s2), count + ok
        full = count == CHUNK
        state = flush(state, full)
        s1, s2, count = np.where(full, 0, s1).astype(dt), np.where(full, 0, s2).astype(dt), np.where(full, 0, count)
    return flush(state, count > 0)


def unshifted_welford(ar: Arith, values, valid, shift):
    """The counter-example: the previous kernel's WelfordState::add per value, no shift."""
    dt = ar.dtype
    n = mean = m2 = np.zeros(values.shape[:-1], dt)
    for i in range(values.shape[-1]):
        ok, x = valid[..., i], values[..., i]
        n1 = n + dt(1)
        d = x - mean
        mean1 = (mean + d / n1).astype(dt)
        m21 = ar.fma(d, x - mean1, m2)  # nvcc contracts m2 += d * (x - mean)
        n, mean, m2 = np.where(ok, n1, n), np.where(ok, mean1, mean), np.where(ok, m21, m2)
    return n, mean, m2


def block_merge(ar: Arith, state, layout: str):
    """block_reduce (channel-major) or the shared-memory halving over y (channels-last)."""
    def tree(s, width):
        while width > 1:
            width //= 2
            s = ar.merge(tuple(a[..., :width] for a in s), tuple(a[..., width:2 * width] for a in s))
        return tuple(a[..., 0] for a in s)

    if layout == "channels_last":
        return tree(state, ROWS_Y)
    warps = tree(tuple(a.reshape(*a.shape[:-1], THREADS // 32, 32) for a in state), 32)
    padded = tuple(np.concatenate([a, np.zeros((*a.shape[:-1], 32 - a.shape[-1]), ar.dtype)], -1) for a in warps)
    return tree(padded, 32)


def finalize(partials, shift):
    """finalize_statistics_kernel: float64 Chan merge in split order; (mean, var, count)."""
    n = mu = m2 = np.zeros(partials[0].shape[0])
    for k in range(partials[0].shape[1]):
        pn, pmu, pm2 = (a[:, k].astype(np.float64) for a in partials)
        total = n + pn
        d = pmu - mu
        f = pn / np.where(total > 0, total, 1)
        mu, m2, n = mu + d * f, m2 + pm2 + d * d * n * f, total
    return shift.astype(np.float64) + mu, m2 / n, n


def emulate(x: np.ndarray, layout: str, sms: int, method=shifted_chunks):
    """(mean, var, count) per channel as the kernel computes them, with x's dtype as acc_t."""
    ar = Arith(x.dtype.type)
    values, valid, _ = thread_values(x, layout, sms)
    shift = x.reshape(x.shape[0], x.shape[1], -1)[0, :, 0] if method is shifted_chunks else np.zeros(x.shape[1])
    state = method(ar, values, valid, shift.astype(x.dtype)[:, None, None])
    mean, var, n = finalize(block_merge(ar, state, layout), shift)
    return mean.astype(x.dtype), var.astype(x.dtype), n


def large_mean_input(shape=SHAPE, first=0.0) -> np.ndarray:
    """N(1e4, 1) in float32 like abnexp.commands.kernels.make_input(large_mean=True); ``first``
    moves each channel's first value (the kernel's shift K) that many standard deviations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + 1e4
    x[0, :, 0, 0] = 1e4 + first
    return x.float().numpy()


def relative_variance_error(x: np.ndarray, var: np.ndarray) -> float:
    truth = torch.var_mean(torch.from_numpy(x).double(), dim=(0, 2, 3), correction=0)[0].numpy()
    return float(np.abs(var.astype(np.float64) - truth).max() / truth.max())


def test_emulation_mirrors_the_kernel_source():
    missing = [line for line in MIRRORED if line not in CU]
    assert not missing, f"kernels/abn_cuda.cu or abn_cuda_ops.h changed: update this emulation for {missing}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulation_counts_every_value_once(layout):
    """In float64 the emulated kernel is exact to rounding: its partition reads every value
    once and its merges are Chan's formula (a bookkeeping error would show far above 1e-12)."""
    x = large_mean_input((3, 5, 23, 41)).astype(np.float64) - 1e4 + np.arange(5).reshape(1, 5, 1, 1)
    mean, var, n = emulate(x, layout, sms=132)
    ref_var, ref_mean = torch.var_mean(torch.from_numpy(x), dim=(0, 2, 3), correction=0)
    assert (n == 3 * 23 * 41).all()
    np.testing.assert_allclose(mean, ref_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var, ref_var.numpy(), rtol=1e-12)


@pytest.mark.parametrize("sms", [108, 132, 1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("first", [0.0, 4.0], ids=["shift-typical", "shift-4-sigma"])
def test_kernel_statistics_meet_1e5_on_mean_1e4_float32(layout, sms, first):
    x = large_mean_input(first=first)
    mean, var, _ = emulate(x, layout, sms)
    assert relative_variance_error(x, var) <= TOLERANCE / 10  # a margin of 10: measured 1e-7 to 4e-7
    truth_mean = x.astype(np.float64).mean(axis=(0, 2, 3))
    assert np.abs(mean - truth_mean).max() / np.abs(truth_mean).max() <= 1e-7


@pytest.mark.parametrize("sms", [108, 132])
def test_counter_example_unshifted_welford_misses_1e5(sms):
    """The same partition and merges with the previous per-thread accumulation fail the
    tolerance: the test above would catch a return to it."""
    x = large_mean_input()
    _, var, _ = emulate(x, "contiguous", sms, method=unshifted_welford)
    assert relative_variance_error(x, var) > TOLERANCE
