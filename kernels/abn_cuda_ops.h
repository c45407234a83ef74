// Device-side building blocks of kernels/abn_cuda.cu (its only includer; see its opening comment
// for the design): block and vector sizes, the activation switch, 16-byte vector access, the
// reduction states (shifted Welford statistics, the backward sums) and the ops that the kernels
// there run: StatsOp and SumsOp (reductions), ForwardOp and GradInputOp (elementwise), over the
// backward forms InplaceForm (from z) and XhatForm (from x).
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
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

}  // namespace
}  // namespace abnexp
