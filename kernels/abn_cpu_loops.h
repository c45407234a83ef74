// Parallel loops of the CPU kernels (abn_cpu.cpp) over the two layouts of abn.h: fixed-size
// tasks for ATen's parallel_for (the partition depends on the shape only, so results do not
// depend on the thread count), block sizes of the reductions, the merge of block results in
// double, and the generic elementwise and per-channel sum drivers the operators plug into.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "abn.h"

namespace abnexp {
namespace cpu {

constexpr int64_t kTaskElems = 1 << 16;   // values of one channel per parallel task
constexpr int64_t kBlockElems = 1 << 12;  // values per block reduced in acc_t
constexpr int64_t kMaxBlockRows = 256;    // channels-last: rows per block
constexpr int64_t kSerialElems = 1 << 15;  // less work than this runs on one thread
constexpr int64_t kSmallInner = 512;      // channel-major reductions with fewer spatial values
                                          // per channel (S) walk memory in order (reduce_small_inner)

struct Welford {
  double n = 0, mean = 0, m2 = 0;
  // Chan, Golub, LeVeque (1979): merge a block of nb values with mean mb and sum of squared
  // deviations m2b.
  void merge(double nb, double mb, double m2b) {
    if (nb == 0) return;
    const double total = n + nb, delta = mb - mean;
    mean += delta * (nb / total);
    m2 += m2b + delta * delta * (n * nb / total);
    n = total;
  }
  void merge(const Welford& o) { merge(o.n, o.mean, o.m2); }
};

struct Sums {
  double u = 0, v = 0;
  void merge(const Sums& o) { u += o.u; v += o.v; }
};

// Calls f(n, s, len) for the pieces of one channel's values [begin, end) (index n * S + s)
// in channel-major layout; each piece is contiguous in memory.
template <class F>
inline void for_each_run(int64_t begin, int64_t end, int64_t S, const F& f) {
  int64_t n = begin / S, s = begin % S;
  for (int64_t i = begin; i < end; ++n, s = 0) {
    const int64_t len = std::min(S - s, end - i);
    f(n, s, len);
    i += len;
  }
}

// parallel_for grain (in tasks) so that work below kSerialElems is not split across threads.
inline int64_t grain(int64_t tasks, int64_t elems) {
  return std::max<int64_t>(1, tasks * kSerialElems / std::max<int64_t>(elems, 1));
}

// Channels-last blocks: up to kMaxBlockRows rows (each channel's block sum is sequential, so this
// bounds its rounding) and about 128 KiB of float values (pass 2 re-reads them from cache).
inline int64_t rows_per_block(int64_t C) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlockRows, (kBlockElems * 8) / C));
}

// ---- generic elementwise and reduction drivers -------------------------------------------
// An Op provides, for the value at flat index i of channel c,
//   elementwise: `void apply(int64_t i, int64_t c)`;
//   reduction:   `void eval(int64_t i, int64_t c, acc& u, acc& v)` (summed per channel).
// The drivers copy the Op into the task: a local object lets the compiler keep its pointers in
// registers (stores through them cannot modify it), which the loops need to vectorize.
template <class Op>
void elementwise(const Geometry& g, const Op& shared_op) {
  const int64_t C = g.channels, S = g.inner;
  at::parallel_for(0, g.numel(), kTaskElems, [&](int64_t begin, int64_t end) {
    const Op op = shared_op;
    for (int64_t i = begin; i < end;) {
      if (g.channels_last) {
        const int64_t c0 = i % C, len = std::min(C - c0, end - i), base = i - c0;
#pragma omp simd
        for (int64_t c = c0; c < c0 + len; ++c) op.apply(base + c, c);
        i += len;
      } else {  // runs of S values of one channel; the channel advances by one per run
        int64_t c = (i / S) % C, len = std::min(S - i % S, end - i);
        for (; i < end; len = std::min(S, end - i)) {
#pragma omp simd
          for (int64_t j = i; j < i + len; ++j) op.apply(j, c);
          i += len;
          c = c + 1 == C ? 0 : c + 1;
        }
      }
    }
  });
}

// Channel-major sums for small S: one channel's runs lie C * S values apart, too many
// interleaved streams (N runs times the tensors read) for the prefetchers when S is small, so
// each task takes a block of channels [c0, c1) (about kBlockElems values per sample n, contiguous)
// and a range of samples, reads them in memory order and accumulates per (channel, position)
// lanes in acc_t (at most kTaskElems / kBlockElems samples per lane), summed in double per task.
template <typename acc, class Op>
void reduce_small_inner(const Geometry& g, const Op& shared_op, std::vector<Sums>& total) {
  const int64_t C = g.channels, S = g.inner, N = g.outer;
  const int64_t block_c = std::max<int64_t>(1, kBlockElems / S);
  const int64_t blocks = (C + block_c - 1) / block_c;
  const int64_t samples = std::max<int64_t>(1, kTaskElems / (block_c * S));
  const int64_t chunks = (N + samples - 1) / samples;
  std::vector<Sums> partial(chunks * C);
  at::parallel_for(0, blocks * chunks, grain(blocks * chunks, g.numel()), [&](int64_t begin, int64_t end) {
    const Op op = shared_op;
    std::vector<acc> lanes_u(block_c * S), lanes_v(block_c * S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      const int64_t c0 = b * block_c, c1 = std::min(C, c0 + block_c);
      std::fill(lanes_u.begin(), lanes_u.end(), acc(0));
      std::fill(lanes_v.begin(), lanes_v.end(), acc(0));
      for (int64_t n = k * samples; n < std::min(N, (k + 1) * samples); ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t base = (n * C + c) * S;
          acc* __restrict__ pu = lanes_u.data() + (c - c0) * S;
          acc* __restrict__ pv = lanes_v.data() + (c - c0) * S;
#pragma omp simd
          for (int64_t s = 0; s < S; ++s) {
            acc du, dv;
            op.eval(base + s, c, du, dv);
            pu[s] += du;
            pv[s] += dv;
          }
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        Sums sums;
        for (int64_t s = 0; s < S; ++s) {
          sums.u += lanes_u[(c - c0) * S + s];
          sums.v += lanes_v[(c - c0) * S + s];
        }
        partial[k * C + c] = sums;
      }
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < chunks; ++k) total[c].merge(partial[k * C + c]);
}

template <typename acc, class Op>
void reduce_sums(const Geometry& g, const Op& shared_op, acc* out_u, acc* out_v) {
  const int64_t C = g.channels, S = g.inner, m = g.count();
  std::vector<Sums> total(C);
  if (!g.channels_last && S < kSmallInner) {
    reduce_small_inner<acc>(g, shared_op, total);
  } else if (!g.channels_last) {
    const int64_t chunks = std::max<int64_t>(1, (m + kTaskElems - 1) / kTaskElems);
    std::vector<Sums> partial(C * chunks);
    at::parallel_for(0, C * chunks, grain(C * chunks, g.numel()), [&](int64_t begin, int64_t end) {
      const Op op = shared_op;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / chunks, k = task % chunks;
        Sums s;
        for_each_run(k * kTaskElems, std::min(m, (k + 1) * kTaskElems), S,
                     [&](int64_t n, int64_t s0, int64_t len) {
                       const int64_t base = (n * C + c) * S + s0;
                       for (int64_t b = 0; b < len; b += kBlockElems) {
                         const int64_t lo = base + b, hi = base + std::min(len, b + kBlockElems);
                         acc u = 0, v = 0;
#pragma omp simd reduction(+ : u, v)
                         for (int64_t i = lo; i < hi; ++i) {
                           acc du, dv;
                           op.eval(i, c, du, dv);
                           u += du;
                           v += dv;
                         }
                         s.u += u;
                         s.v += v;
                       }
                     });
        partial[task] = s;
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < chunks; ++k) total[c].merge(partial[c * chunks + k]);
  } else {
    const int64_t R = g.outer, rows_task = std::max<int64_t>(1, kTaskElems / C);
    const int64_t tasks = std::max<int64_t>(1, (R + rows_task - 1) / rows_task);
    const int64_t rows_block = rows_per_block(C);
    std::vector<Sums> partial(tasks * C);
    at::parallel_for(0, tasks, grain(tasks, g.numel()), [&](int64_t begin, int64_t end) {
      const Op op = shared_op;
      std::vector<acc> bu(C), bv(C);
      for (int64_t task = begin; task < end; ++task) {
        Sums* s = partial.data() + task * C;
        const int64_t r_end = std::min(R, (task + 1) * rows_task);
        for (int64_t r0 = task * rows_task; r0 < r_end; r0 += rows_block) {
          std::fill(bu.begin(), bu.end(), acc(0));
          std::fill(bv.begin(), bv.end(), acc(0));
          acc* __restrict__ pu = bu.data();
          acc* __restrict__ pv = bv.data();
          for (int64_t r = r0; r < std::min(r_end, r0 + rows_block); ++r) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              acc du, dv;
              op.eval(r * C + c, c, du, dv);
              pu[c] += du;
              pv[c] += dv;
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            s[c].u += pu[c];
            s[c].v += pv[c];
          }
        }
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < tasks; ++k) total[c].merge(partial[k * C + c]);
  }
  for (int64_t c = 0; c < C; ++c) {
    out_u[c] = static_cast<acc>(total[c].u);
    out_v[c] = static_cast<acc>(total[c].v);
  }
}

}  // namespace cpu
}  // namespace abnexp
