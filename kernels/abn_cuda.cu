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

#include "abn_cuda_ops.h"  // the device-side building blocks: constants, vector access, states, ops

namespace abnexp {
namespace {

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
