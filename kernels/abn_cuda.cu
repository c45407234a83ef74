// CUDA kernels of the BN + activation operators (see abn.h for layouts and notation).
//
// Reductions run in two stages: stage 1 launches a (channel groups x splits) grid, every block
// reducing one slice of its channel(s) -- per-thread accumulators, then warp shuffles / shared
// memory with Chan's merge -- and writes one partial per (channel, split); stage 2 merges the
// partials of each channel in a fixed order (float64 for the statistics), so results are
// deterministic (no float atomics). Access is coalesced in both layouts:
//   * channel-major: a block walks one channel's runs of S contiguous values, consecutive
//     threads on consecutive addresses;
//   * channels-last: a block is 32 channels (one warp reads 32 consecutive values of a row)
//     x kRowsY rows.
// Statistics are shifted: every thread subtracts its channel's first value K (exact in float32
// when x and K are within a factor 2 of each other, Sterbenz) and sums d = x - K and d^2 over
// chunks of kChunk values, folding each chunk into a Welford state (count, mean, M2 of d) with
// Chan's formula; mean = K + mean(d) at the end (float64). An unshifted float32 Welford loses
// digits on large-mean inputs: 1.7e-5 relative variance error on the mean-1e4 check input,
// 2e-7 with the shift (tests/norm/test_cuda_statistics_emulation.py emulates both orders of
// operations on the CPU). Their multiply-adds are written as explicit fma so that nvcc's
// contraction leaves the order of rounding as the emulation has it.
// Elementwise kernels run over (plane, element) grids in channel-major layout (a plane is one
// (n, c) run of S values; the channel is computed once per plane, never per element) and over
// (channel tile, rows) grids in channels-last layout, with 16-byte vector loads and stores when
// the run length and every pointer allow it (4 floats, 8 halfs / bfloat16s, 2 doubles), 64-bit
// indices throughout. The activation is a runtime switch (uniform per launch) to keep the number
// of instantiations, and the build, small. Written for sm_80 and newer (sm_90 / Hopper); block
// shapes are conservative choices, not tuned on hardware.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <initializer_list>

#include "abn.h"
#include "abn_math.h"

namespace abnexp {
namespace {

constexpr int kThreads = 512;  // threads per block
constexpr int kTileC = 32;     // channels-last reductions: channels per block
constexpr int kRowsY = 16;     // channels-last reductions: rows in flight per block
constexpr int kChunk = 16;     // statistics: values summed per thread before a Chan merge
constexpr int kVecBytes = 16;  // elementwise: bytes of one vector load / store

// Vector width of T for 16-byte accesses.
template <typename T>
constexpr int kVec = kVecBytes / static_cast<int>(sizeof(T));

template <typename T>
__device__ __forceinline__ T act_forward_rt(Act act, T y, const ActParam<T>& a) {
  switch (act) {
    case Act::LeakyRelu: return act_forward<Act::LeakyRelu>(y, a);
    case Act::Elu: return act_forward<Act::Elu>(y, a);
    case Act::Relu: return act_forward<Act::Relu>(y, a);
    default: return y;
  }
}

template <typename T>
__device__ __forceinline__ T act_backward_rt(Act act, T z, T dz, const ActParam<T>& a) {
  switch (act) {
    case Act::LeakyRelu: return act_backward<Act::LeakyRelu>(z, dz, a);
    case Act::Elu: return act_backward<Act::Elu>(z, dz, a);
    case Act::Relu: return act_backward<Act::Relu>(z, dz, a);
    default: return dz;
  }
}

template <typename T>
__device__ __forceinline__ T act_inverse_rt(Act act, T z, const ActParam<T>& a) {
  switch (act) {
    case Act::LeakyRelu: return act_inverse<Act::LeakyRelu>(z, a);
    case Act::Elu: return act_inverse<Act::Elu>(z, a);
    default: return z;
  }
}

// fma rounded once, never contracted differently by the compiler.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// ---- vector access --------------------------------------------------------------------------
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load(const T* p, int64_t i) {
  return *reinterpret_cast<const Vec<T, V>*>(p + i);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, int64_t i, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p + i) = v;
}

bool all_aligned(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % kVecBytes != 0) return false;
  return true;
}

// ---- reduction states -----------------------------------------------------------------------
// Count, mean and sum of squared deviations (M2) of the shifted values d = x - K.
template <typename acc>
struct WelfordState {
  acc n, mean, m2;
  __device__ static WelfordState identity() { return {acc(0), acc(0), acc(0)}; }
  __device__ void merge(const WelfordState& o) {  // Chan et al.
    if (o.n == acc(0)) return;
    if (n == acc(0)) {
      *this = o;
      return;
    }
    const acc total = n + o.n, d = o.mean - mean, f = o.n / total;
    mean = fma_rn(d, f, mean);
    const acc w = d * d * n;
    m2 = m2 + fma_rn(w, f, o.m2);
    n = total;
  }
  __device__ WelfordState shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, n, offset), __shfl_down_sync(0xffffffffu, mean, offset),
            __shfl_down_sync(0xffffffffu, m2, offset)};
  }
};

template <typename acc>
struct SumState {
  acc u, v;
  __device__ static SumState identity() { return {acc(0), acc(0)}; }
  __device__ void merge(const SumState& o) {
    u += o.u;
    v += o.v;
  }
  __device__ SumState shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, u, offset), __shfl_down_sync(0xffffffffu, v, offset)};
  }
};

// ---- element functions ----------------------------------------------------------------------
// A reduction's op: Thread = one thread's accumulator of channel c (start(c, any): `any` is
// false for a thread without values, which must not read memory), accumulate(t, i) adds
// element i, finish(t) gives the State merged across threads and splits.
template <typename T>
struct StatsOp {
  using acc = acc_t<T>;
  using State = WelfordState<acc>;
  struct Thread {
    acc shift, s1, s2;  // K, sum of d, sum of d^2 over the current chunk
    int count;          // values in the current chunk
    State s;            // the chunks so far
  };
  const T* x;
  int64_t shift_stride;  // x[c * shift_stride] is channel c's first value: K

  __device__ Thread start(int64_t c, bool any) const {
    return {any ? static_cast<acc>(x[c * shift_stride]) : acc(0), acc(0), acc(0), 0, State::identity()};
  }
  __device__ void flush(Thread& t) const {
    if (t.count == 0) return;
    const acc n = static_cast<acc>(t.count), mean = t.s1 / n;
    t.s.merge(State{n, mean, fma_rn(-t.s1, mean, t.s2)});
    t.s1 = t.s2 = acc(0);
    t.count = 0;
  }
  __device__ void accumulate(Thread& t, int64_t i) const {
    const acc d = static_cast<acc>(x[i]) - t.shift;
    t.s1 = t.s1 + d;
    t.s2 = fma_rn(d, d, t.s2);
    if (++t.count == kChunk) flush(t);
  }
  __device__ State finish(Thread& t) const {
    flush(t);
    return t.s;
  }
};

// dL/dy and t of the backward forms (abn.h, struct Channel), for V consecutive elements from i;
// P holds one channel's vectors.
template <typename T>
struct InplaceForm {
  using acc = acc_t<T>;
  struct P {
    acc tshift, tmul;
  };
  const T* z;
  const T* dz;
  const acc *tshift, *tmul;
  ActParam<acc> ap;
  Act act;
  __device__ P params(int64_t c) const { return {tshift[c], tmul[c]}; }
  bool aligned() const { return all_aligned({z, dz}); }
  template <int V>
  __device__ void dy_t(int64_t i, const P (&p)[V], acc (&dy)[V], acc (&t)[V]) const {
    const auto zv = load<V>(z, i), dzv = load<V>(dz, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc zi = static_cast<acc>(zv.v[k]);
      dy[k] = act_backward_rt(act, zi, static_cast<acc>(dzv.v[k]), ap);
      t[k] = (act_inverse_rt(act, zi, ap) - p[k].tshift) * p[k].tmul;
    }
  }
};

template <typename T>
struct XhatForm {
  using acc = acc_t<T>;
  struct P {
    acc mean, invstd, gamma, beta;
  };
  const T* x;
  const T* dz;
  const T* z;  // nullptr: recompute z = act(gamma * xhat + beta)
  const acc *mean, *invstd, *gamma, *beta;
  ActParam<acc> ap;
  Act act;
  __device__ P params(int64_t c) const { return {mean[c], invstd[c], gamma[c], beta[c]}; }
  bool aligned() const { return all_aligned({x, dz, z}); }
  template <int V>
  __device__ void dy_t(int64_t i, const P (&p)[V], acc (&dy)[V], acc (&t)[V]) const {
    const auto xv = load<V>(x, i), dzv = load<V>(dz, i);
    Vec<T, V> zv;
    if (z != nullptr) zv = load<V>(z, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      t[k] = (static_cast<acc>(xv.v[k]) - p[k].mean) * p[k].invstd;
      const acc zk = z != nullptr ? static_cast<acc>(zv.v[k])
                                  : act_forward_rt(act, p[k].gamma * t[k] + p[k].beta, ap);
      dy[k] = act_backward_rt(act, zk, static_cast<acc>(dzv.v[k]), ap);
    }
  }
};

template <class Form>
struct SumsOp {
  using acc = typename Form::acc;
  using State = SumState<acc>;
  struct Thread {
    typename Form::P p;
    State s;
  };
  Form f;
  __device__ Thread start(int64_t c, bool any) const {
    return {any ? f.params(c) : typename Form::P{}, State::identity()};
  }
  __device__ void accumulate(Thread& t, int64_t i) const {
    const typename Form::P p[1] = {t.p};
    acc dy[1], tt[1];
    f.template dy_t<1>(i, p, dy, tt);
    t.s.u += dy[0];
    t.s.v += dy[0] * tt[0];
  }
  __device__ State finish(Thread& t) const { return t.s; }
};

// An elementwise op: P = one channel's vectors (params(c)); apply<V>(i, p) writes elements
// [i, i + V), p[k] being element i + k's channel.
template <typename T>
struct ForwardOp {
  using value_t = T;
  using acc = acc_t<T>;
  struct P {
    acc mean, scale, beta;
  };
  const T* x;
  T* out;
  const acc *mean, *scale, *beta;
  ActParam<acc> ap;
  Act act;
  __device__ P params(int64_t c) const { return {mean[c], scale[c], beta[c]}; }
  bool aligned() const { return all_aligned({x, out}); }
  template <int V>
  __device__ void apply(int64_t i, const P (&p)[V]) const {
    const auto xv = load<V>(x, i);
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc y = (static_cast<acc>(xv.v[k]) - p[k].mean) * p[k].scale + p[k].beta;
      o.v[k] = static_cast<T>(act_forward_rt(act, y, ap));
    }
    store<V>(out, i, o);
  }
};

template <class Form, typename T>
struct GradInputOp {
  using value_t = T;
  using acc = typename Form::acc;
  struct P {
    typename Form::P f;
    acc a, b, k;
  };
  Form f;
  T* dx;
  const acc *a, *b, *k;
  __device__ P params(int64_t c) const { return {f.params(c), a[c], b[c], k[c]}; }
  bool aligned() const { return f.aligned() && all_aligned({dx}); }
  template <int V>
  __device__ void apply(int64_t i, const P (&p)[V]) const {
    typename Form::P fp[V];
#pragma unroll
    for (int j = 0; j < V; ++j) fp[j] = p[j].f;
    acc dy[V], t[V];
    f.template dy_t<V>(i, fp, dy, t);
    Vec<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(p[j].a * dy[j] + p[j].b * t[j] + p[j].k);
    store<V>(dx, i, o);
  }
};

// ---- kernels --------------------------------------------------------------------------------
// Channel-major: block (tx, ty) holds ty planes (plane = n * C + c: values [plane * S, plane *
// S + S)), tx threads along each; grid (plane groups, element blocks), the y axis striding over
// planes longer than gridDim.y blocks. Needs S % V == 0 (every plane starts vector-aligned).
template <class Op, int V>
__global__ void elementwise_planes_kernel(Op op, int64_t planes, int64_t C, int64_t S) {
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (plane >= planes) return;
  const typename Op::P one = op.params(plane % C);  // once per thread, not per element
  typename Op::P p[V];
#pragma unroll
  for (int k = 0; k < V; ++k) p[k] = one;
  const int64_t base = plane * S, step = static_cast<int64_t>(gridDim.y) * blockDim.x * V;
  for (int64_t s = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V; s < S; s += step)
    op.template apply<V>(base + s, p);
}

// Channels-last: thread x of a block holds channels [c0, c0 + V) (V consecutive values of a
// row), threads y stride over rows; grid (channel tiles, row blocks). Needs C % V == 0.
template <class Op, int V>
__global__ void elementwise_rows_kernel(Op op, int64_t R, int64_t C) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  typename Op::P p[V];
#pragma unroll
  for (int k = 0; k < V; ++k) p[k] = op.params(c0 + k);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < R; r += step)
    op.template apply<V>(r * C + c0, p);
}

// Block-wide reduction of a 1-D block; the result is valid in thread 0.
template <class State>
__device__ State block_reduce(State s) {
  __shared__ State warp_results[32];
  for (int offset = 16; offset > 0; offset >>= 1) s.merge(s.shfl_down(offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_results[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>((blockDim.x + 31) / 32) ? warp_results[lane] : State::identity();
    for (int offset = 16; offset > 0; offset >>= 1) s.merge(s.shfl_down(offset));
  }
  return s;
}

// Channel-major: block (c, k) reduces values [k * per_split, (k + 1) * per_split) of channel c
// (value j = n * S + s at address (n * C + c) * S + s); thread t takes values j = begin + t,
// begin + t + blockDim.x, ...
template <class Op>
__global__ void reduce_channel_major_kernel(Op op, int64_t C, int64_t S, int64_t m, int64_t per_split,
                                            typename Op::State* partial) {
  const int64_t c = blockIdx.x, begin = blockIdx.y * per_split;
  const int64_t end = min(m, begin + per_split);
  int64_t j = begin + threadIdx.x;
  typename Op::Thread t = op.start(c, j < end);
  if (j < end) {
    int64_t n = j / S, r = j - n * S;
    const int64_t step_n = blockDim.x / S, step_r = blockDim.x % S;
    for (; j < end; j += blockDim.x) {
      op.accumulate(t, (n * C + c) * S + r);
      n += step_n;
      r += step_r;
      if (r >= S) {
        r -= S;
        ++n;
      }
    }
  }
  const auto s = block_reduce(op.finish(t));
  if (threadIdx.x == 0) partial[c * gridDim.y + blockIdx.y] = s;
}

// Channels-last: block (tile, k) reduces rows [k * per_split, (k + 1) * per_split) of channels
// tile * kTileC + threadIdx.x (value (r, c) at address r * C + c); thread y takes rows r0 + y,
// r0 + y + kRowsY, ...; the kRowsY states of a channel are merged by halving in shared memory.
template <class Op>
__global__ void reduce_channels_last_kernel(Op op, int64_t R, int64_t C, int64_t per_split,
                                            typename Op::State* partial) {
  using State = typename Op::State;
  __shared__ State tile[kRowsY][kTileC];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + threadIdx.x;
  const int64_t r0 = blockIdx.y * per_split, r1 = min(R, r0 + per_split);
  const bool any = c < C && r0 + threadIdx.y < r1;
  typename Op::Thread t = op.start(c, any);
  if (any)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsY) op.accumulate(t, r * C + c);
  tile[threadIdx.y][threadIdx.x] = op.finish(t);
  __syncthreads();
  for (int half = kRowsY / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) tile[threadIdx.y][threadIdx.x].merge(tile[threadIdx.y + half][threadIdx.x]);
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) partial[c * gridDim.y + blockIdx.y] = tile[0][threadIdx.x];
}

// Chan's merge of each channel's partials in float64, in split order; mean = K + mean(d).
template <typename T>
__global__ void finalize_statistics_kernel(const WelfordState<acc_t<T>>* partial, int splits, int64_t C,
                                           const T* x, int64_t shift_stride, acc_t<T>* mean, acc_t<T>* var) {
  using acc = acc_t<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0, mu = 0, m2 = 0;
  for (int k = 0; k < splits; ++k) {
    const WelfordState<acc> p = partial[c * splits + k];
    if (p.n == acc(0)) continue;
    const double total = n + p.n, d = static_cast<double>(p.mean) - mu, f = p.n / total;
    mu += d * f;
    m2 += static_cast<double>(p.m2) + d * d * n * f;
    n = total;
  }
  const double shift = n > 0 ? static_cast<double>(static_cast<acc>(x[c * shift_stride])) : 0.0;
  mean[c] = static_cast<acc>(n > 0 ? shift + mu : CUDART_NAN);
  var[c] = static_cast<acc>(n > 0 ? fmax(0.0, m2 / n) : CUDART_NAN);
}

template <typename acc>
__global__ void finalize_sums_kernel(const SumState<acc>* partial, int splits, int64_t C, acc* u, acc* v) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double su = 0, sv = 0;
  for (int k = 0; k < splits; ++k) {
    su += partial[c * splits + k].u;
    sv += partial[c * splits + k].v;
  }
  u[c] = static_cast<acc>(su);
  v[c] = static_cast<acc>(sv);
}

// ---- host side ------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits per channel group: enough blocks to fill the GPU, at least `min_per_block` values each.
int64_t multiprocessors() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

int splits_for(int64_t groups, int64_t values, int64_t min_per_block) {
  const int64_t sms = multiprocessors();
  const int64_t wanted = std::max<int64_t>(1, ceil_div(4 * sms, groups));
  const int64_t useful = std::max<int64_t>(1, ceil_div(values, min_per_block));
  return static_cast<int>(std::min<int64_t>({wanted, useful, 65535}));
}

// Stage 1 of a reduction; returns the partials ((C, splits) states) and sets splits.
template <class Op>
at::Tensor reduce_partials(const Op& op, const Geometry& g, const at::Tensor& like, int& splits) {
  using State = typename Op::State;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = g.channels;
  at::Tensor ws;
  if (!g.channels_last) {
    splits = splits_for(C, g.count(), 8 * kThreads);
    const int64_t per_split = ceil_div(g.count(), splits);
    ws = at::empty({static_cast<int64_t>(C * splits * sizeof(State))}, like.options().dtype(at::kByte));
    reduce_channel_major_kernel<<<dim3(C, splits), kThreads, 0, stream>>>(
        op, C, g.inner, g.count(), per_split, reinterpret_cast<State*>(ws.data_ptr()));
  } else {
    const int64_t tiles = ceil_div(C, kTileC);
    splits = splits_for(tiles, g.outer, 8 * kRowsY);
    const int64_t per_split = ceil_div(g.outer, splits);
    ws = at::empty({static_cast<int64_t>(C * splits * sizeof(State))}, like.options().dtype(at::kByte));
    reduce_channels_last_kernel<<<dim3(tiles, splits), dim3(kTileC, kRowsY), 0, stream>>>(
        op, g.outer, C, per_split, reinterpret_cast<State*>(ws.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ws;
}

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Elementwise launch in the layout's grid (see the kernels) with vector width V.
template <int V, class Op>
void launch_elementwise_v(const Op& op, const Geometry& g) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (!g.channels_last) {
    // tx threads along a plane (a power of 2 in [32, kThreads]), ty = kThreads / tx planes per block
    const int64_t tx = std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(ceil_div(g.inner, V))));
    const int64_t ty = kThreads / tx, planes = g.outer * g.channels;
    const int64_t gy = std::min<int64_t>(ceil_div(g.inner, tx * V), 65535);
    elementwise_planes_kernel<Op, V><<<dim3(ceil_div(planes, ty), gy), dim3(tx, ty), 0, stream>>>(
        op, planes, g.channels, g.inner);
  } else {
    // tx threads along the channels (whole rows when C / V <= 32), ty rows per block; about
    // 8 blocks per multiprocessor, each thread striding over rows with its channels' vectors
    const int64_t tx = std::min<int64_t>(32, next_pow2(ceil_div(g.channels, V)));
    const int64_t ty = kThreads / tx, tiles = ceil_div(g.channels, tx * V);
    const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({ceil_div(g.outer, ty), ceil_div(8 * multiprocessors(), tiles),
                                                               65535}));
    elementwise_rows_kernel<Op, V><<<dim3(tiles, gy), dim3(tx, ty), 0, stream>>>(op, g.outer, g.channels);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte vectors when the run length (S, or C in channels-last) is a multiple of the vector
// width and every pointer is 16-byte aligned; one element per access otherwise.
template <class Op>
void launch_elementwise(const Op& op, const Geometry& g) {
  constexpr int V = kVec<typename Op::value_t>;
  if (g.numel() == 0) return;
  if ((g.channels_last ? g.channels : g.inner) % V == 0 && op.aligned())
    launch_elementwise_v<V>(op, g);
  else
    launch_elementwise_v<1>(op, g);
}

template <typename acc>
const acc* vec(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc>() : nullptr;
}

void statistics_cuda(const at::Tensor& x, const Geometry& g, at::Tensor& mean, at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "abnexp_statistics_cuda", [&] {
    using acc = acc_t<scalar_t>;
    int splits = 1;
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const int64_t shift_stride = g.channels_last ? 1 : g.inner;  // channel c's first value: x[c * stride]
    const auto ws = reduce_partials(StatsOp<scalar_t>{data, shift_stride}, g, x, splits);
    finalize_statistics_kernel<<<ceil_div(g.channels, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const WelfordState<acc>*>(ws.const_data_ptr()), splits, g.channels, data, shift_stride,
        mean.data_ptr<acc>(), var.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void forward_cuda(const at::Tensor& x, const Geometry& g, const Channel& ch, Act act, double param,
                  at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "abnexp_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    launch_elementwise(ForwardOp<scalar_t>{x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), vec<acc>(ch.mean),
                                           vec<acc>(ch.scale), vec<acc>(ch.beta), make_act_param<acc>(param), act},
                       g);
  });
}

// Calls f(form) with the backward form of this call.
template <typename T, class F>
void with_form(const Saved& s, const Channel& ch, Act act, double param, bool inplace, const F& f) {
  using acc = acc_t<T>;
  const auto ap = make_act_param<acc>(param);
  const T* dz = s.dz.const_data_ptr<T>();
  if (inplace) {
    f(InplaceForm<T>{s.src.const_data_ptr<T>(), dz, vec<acc>(ch.tshift), vec<acc>(ch.tmul), ap, act});
  } else {
    f(XhatForm<T>{s.src.const_data_ptr<T>(), dz, s.z.defined() ? s.z.const_data_ptr<T>() : nullptr,
                  vec<acc>(ch.mean), vec<acc>(ch.scale), vec<acc>(ch.gamma), vec<acc>(ch.beta), ap, act});
  }
}

void backward_reduce_cuda(const Saved& s, const Geometry& g, const Channel& ch, Act act, double param,
                          bool inplace, at::Tensor& sum_dy, at::Tensor& sum_dy_t) {
  const c10::cuda::CUDAGuard guard(s.src.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.src.scalar_type(), "abnexp_backward_reduce_cuda", [&] {
    using acc = acc_t<scalar_t>;
    with_form<scalar_t>(s, ch, act, param, inplace, [&](const auto& form) {
      int splits = 1;
      const auto ws = reduce_partials(SumsOp<std::decay_t<decltype(form)>>{form}, g, s.src, splits);
      finalize_sums_kernel<<<ceil_div(g.channels, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const SumState<acc>*>(ws.const_data_ptr()), splits, g.channels,
          sum_dy.data_ptr<acc>(), sum_dy_t.data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_elementwise_cuda(const Saved& s, const Geometry& g, const Channel& ch, Act act, double param,
                               bool inplace, at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(s.src.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.src.scalar_type(), "abnexp_backward_elementwise_cuda", [&] {
    using acc = acc_t<scalar_t>;
    with_form<scalar_t>(s, ch, act, param, inplace, [&](const auto& form) {
      launch_elementwise(GradInputOp<std::decay_t<decltype(form)>, scalar_t>{form, dx.data_ptr<scalar_t>(),
                                                                            vec<acc>(ch.a), vec<acc>(ch.b),
                                                                            vec<acc>(ch.c)},
                         g);
    });
  });
}

const Launchers kCudaLaunchers{statistics_cuda, forward_cuda, backward_reduce_cuda, backward_elementwise_cuda};

// Registers the CUDA kernels when the library is loaded (the operators dispatch CUDA tensors to
// them; see ops.cpp).
const bool kRegistered = (set_cuda_launchers(&kCudaLaunchers), true);

}  // namespace
}  // namespace abnexp
