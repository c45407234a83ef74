// CUDA kernels of the BN + activation operators (see abn.h for layouts and notation).
//
// Reductions run in two stages: stage 1 launches a (channel groups x splits) grid, every block
// reducing one slice of its channel(s) -- per-thread Welford (statistics) or sums in acc_t,
// then warp shuffles / shared memory with Chan's merge -- and writes one partial per
// (channel, split); stage 2 merges the partials of each channel in a fixed order (float64 for
// the statistics), so results are deterministic. Access is coalesced in both layouts:
//   * channel-major: a block walks one channel's runs of S contiguous values, consecutive
//     threads on consecutive addresses;
//   * channels-last: a block is 32 channels (one warp reads 32 consecutive values of a row)
//     x kRowsY rows.
// Elementwise kernels are grid-stride loops over the flat index. The activation is a runtime
// switch (uniform per launch) to keep the number of instantiations, and the build, small.
// Written for sm_80 and newer (sm_90 / Hopper); block shapes are conservative choices, not
// tuned on hardware.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "abn.h"
#include "abn_math.h"

namespace abnexp {
namespace {

constexpr int kThreads = 512;  // 1-D blocks
constexpr int kTileC = 32;     // channels-last reductions: channels per block
constexpr int kRowsY = 16;     // channels-last reductions: rows in flight per block

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

// ---- reduction states -----------------------------------------------------------------------
template <typename acc>
struct WelfordState {
  acc n, mean, m2;
  __device__ static WelfordState identity() { return {acc(0), acc(0), acc(0)}; }
  __device__ void add(acc x) {
    n += acc(1);
    const acc d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ void merge(const WelfordState& o) {  // Chan et al.
    if (o.n == acc(0)) return;
    if (n == acc(0)) {
      *this = o;
      return;
    }
    const acc total = n + o.n, d = o.mean - mean, f = o.n / total;
    mean += d * f;
    m2 += o.m2 + d * d * n * f;
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
template <typename T>
struct StatsOp {
  using acc = acc_t<T>;
  using State = WelfordState<acc>;
  const T* x;
  __device__ void accumulate(State& s, int64_t i, int64_t) const { s.add(static_cast<acc>(x[i])); }
};

template <typename T>
struct ForwardOp {
  using acc = acc_t<T>;
  const T* x;
  T* out;
  const acc *mean, *scale, *beta;
  ActParam<acc> ap;
  Act act;
  __device__ void apply(int64_t i, int64_t c) const {
    const acc y = (static_cast<acc>(x[i]) - mean[c]) * scale[c] + beta[c];
    out[i] = static_cast<T>(act_forward_rt(act, y, ap));
  }
};

// dL/dy and t of the backward forms (abn.h, struct Channel).
template <typename T>
struct InplaceForm {
  using acc = acc_t<T>;
  const T* z;
  const T* dz;
  const acc *tshift, *tmul;
  ActParam<acc> ap;
  Act act;
  __device__ void dy_t(int64_t i, int64_t c, acc& dy, acc& t) const {
    const acc zi = static_cast<acc>(z[i]);
    dy = act_backward_rt(act, zi, static_cast<acc>(dz[i]), ap);
    t = (act_inverse_rt(act, zi, ap) - tshift[c]) * tmul[c];
  }
};

template <typename T>
struct XhatForm {
  using acc = acc_t<T>;
  const T* x;
  const T* dz;
  const T* z;  // nullptr: recompute z = act(gamma * xhat + beta)
  const acc *mean, *invstd, *gamma, *beta;
  ActParam<acc> ap;
  Act act;
  __device__ void dy_t(int64_t i, int64_t c, acc& dy, acc& t) const {
    t = (static_cast<acc>(x[i]) - mean[c]) * invstd[c];
    const acc zi = z != nullptr ? static_cast<acc>(z[i]) : act_forward_rt(act, gamma[c] * t + beta[c], ap);
    dy = act_backward_rt(act, zi, static_cast<acc>(dz[i]), ap);
  }
};

template <class Form>
struct SumsOp {
  using acc = typename Form::acc;
  using State = SumState<acc>;
  Form f;
  __device__ void accumulate(State& s, int64_t i, int64_t c) const {
    acc dy, t;
    f.dy_t(i, c, dy, t);
    s.u += dy;
    s.v += dy * t;
  }
};

template <class Form, typename T>
struct GradInputOp {
  using acc = typename Form::acc;
  Form f;
  T* dx;
  const acc *a, *b, *k;
  __device__ void apply(int64_t i, int64_t c) const {
    acc dy, t;
    f.dy_t(i, c, dy, t);
    dx[i] = static_cast<T>(a[c] * dy + b[c] * t + k[c]);
  }
};

// ---- kernels --------------------------------------------------------------------------------
template <class Op>
__global__ void elementwise_kernel(Op op, int64_t numel, int64_t C, int64_t S, bool channels_last) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride)
    op.apply(i, channels_last ? i % C : (i / S) % C);
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
// (value j = n * S + s at address (n * C + c) * S + s).
template <class Op>
__global__ void reduce_channel_major_kernel(Op op, int64_t C, int64_t S, int64_t m, int64_t per_split,
                                            typename Op::State* partial) {
  using State = typename Op::State;
  const int64_t c = blockIdx.x, begin = blockIdx.y * per_split;
  const int64_t end = min(m, begin + per_split);
  State s = State::identity();
  int64_t j = begin + threadIdx.x;
  if (j < end) {
    int64_t n = j / S, r = j - n * S;
    const int64_t step_n = blockDim.x / S, step_r = blockDim.x % S;
    for (; j < end; j += blockDim.x) {
      op.accumulate(s, (n * C + c) * S + r, c);
      n += step_n;
      r += step_r;
      if (r >= S) {
        r -= S;
        ++n;
      }
    }
  }
  s = block_reduce(s);
  if (threadIdx.x == 0) partial[c * gridDim.y + blockIdx.y] = s;
}

// Channels-last: block (tile, k) reduces rows [k * per_split, (k + 1) * per_split) of channels
// tile * kTileC + threadIdx.x (value (r, c) at address r * C + c).
template <class Op>
__global__ void reduce_channels_last_kernel(Op op, int64_t R, int64_t C, int64_t per_split,
                                            typename Op::State* partial) {
  using State = typename Op::State;
  __shared__ State tile[kRowsY][kTileC];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + threadIdx.x;
  const int64_t r0 = blockIdx.y * per_split, r1 = min(R, r0 + per_split);
  State s = State::identity();
  if (c < C)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsY) op.accumulate(s, r * C + c, c);
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  for (int half = kRowsY / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) tile[threadIdx.y][threadIdx.x].merge(tile[threadIdx.y + half][threadIdx.x]);
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) partial[c * gridDim.y + blockIdx.y] = tile[0][threadIdx.x];
}

template <typename acc>
__global__ void finalize_statistics_kernel(const WelfordState<acc>* partial, int splits, int64_t C, acc* mean,
                                           acc* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0, mu = 0, m2 = 0;  // Chan's merge in float64, in split order
  for (int k = 0; k < splits; ++k) {
    const WelfordState<acc> p = partial[c * splits + k];
    if (p.n == acc(0)) continue;
    const double total = n + p.n, d = static_cast<double>(p.mean) - mu, f = p.n / total;
    mu += d * f;
    m2 += static_cast<double>(p.m2) + d * d * n * f;
    n = total;
  }
  mean[c] = static_cast<acc>(n > 0 ? mu : CUDART_NAN);
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

template <class Op>
void launch_elementwise(const Op& op, const Geometry& g) {
  const int64_t sms = multiprocessors();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(g.numel(), kThreads), 32 * sms));
  elementwise_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(op, g.numel(), g.channels,
                                                                                 g.inner, g.channels_last);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    const auto ws = reduce_partials(StatsOp<scalar_t>{x.const_data_ptr<scalar_t>()}, g, x, splits);
    finalize_statistics_kernel<<<ceil_div(g.channels, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const WelfordState<acc>*>(ws.const_data_ptr()), splits, g.channels,
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
