// CPU kernels of the BN + activation operators (see abn.h for layouts and notation): the
// statistics, the element functions of each operator and the operators themselves, on the
// parallel loops of abn_cpu_loops.h.
//
// Parallel with ATen's parallel_for over fixed-size tasks (the partition depends on the shape
// only, so results do not depend on the thread count); inner loops are `omp simd` loops over
// contiguous memory (one channel's run in channel-major, the channel axis in channels-last).
// Reductions: blocks of at most kBlockElems values are reduced in acc_t (statistics with the
// corrected two-pass algorithm on the cache-resident block), then block results are merged
// in double: Chan et al.'s pairwise update for (count, mean, M2), plain sums otherwise.
#include "abn.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "abn_cpu_loops.h"
#include "abn_math.h"

namespace abnexp {
namespace {

using namespace cpu;  // the loops and block sizes of abn_cpu_loops.h

// ---- statistics ------------------------------------------------------------------------
template <typename T>
void block_stats(const T* p, int64_t len, Welford& w) {
  using acc = acc_t<T>;
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += static_cast<acc>(p[i]);
  const acc shift = s / static_cast<acc>(len);
  acc d1 = 0, d2 = 0;
#pragma omp simd reduction(+ : d1, d2)
  for (int64_t i = 0; i < len; ++i) {
    const acc d = static_cast<acc>(p[i]) - shift;
    d1 += d;
    d2 += d * d;
  }
  const double n = static_cast<double>(len), e1 = d1;
  w.merge(n, static_cast<double>(shift) + e1 / n, static_cast<double>(d2) - e1 * e1 / n);
}

template <typename T>
std::vector<Welford> stats_channel_major(const T* x, const Geometry& g) {
  const int64_t C = g.channels, S = g.inner, m = g.count();
  const int64_t chunks = std::max<int64_t>(1, (m + kTaskElems - 1) / kTaskElems);
  std::vector<Welford> partial(C * chunks);
  at::parallel_for(0, C * chunks, grain(C * chunks, g.numel()), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / chunks, k = task % chunks;
      Welford w;
      for_each_run(k * kTaskElems, std::min(m, (k + 1) * kTaskElems), S,
                   [&](int64_t n, int64_t s, int64_t len) {
                     const T* p = x + (n * C + c) * S + s;
                     for (int64_t b = 0; b < len; b += kBlockElems)
                       block_stats(p + b, std::min(kBlockElems, len - b), w);
                   });
      partial[task] = w;
    }
  });
  std::vector<Welford> out(C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < chunks; ++k) out[c].merge(partial[c * chunks + k]);
  return out;
}

template <typename T>
std::vector<Welford> stats_channels_last(const T* x, const Geometry& g) {
  using acc = acc_t<T>;
  const int64_t C = g.channels, R = g.outer;
  const int64_t rows_task = std::max<int64_t>(1, kTaskElems / C);
  const int64_t tasks = std::max<int64_t>(1, (R + rows_task - 1) / rows_task);
  const int64_t rows_block = rows_per_block(C);
  std::vector<Welford> partial(tasks * C);
  at::parallel_for(0, tasks, grain(tasks, g.numel()), [&](int64_t begin, int64_t end) {
    std::vector<acc> shift(C), d1(C), d2(C);
    for (int64_t task = begin; task < end; ++task) {
      Welford* w = partial.data() + task * C;
      const int64_t r_end = std::min(R, (task + 1) * rows_task);
      for (int64_t r0 = task * rows_task; r0 < r_end; r0 += rows_block) {
        const int64_t rows = std::min(rows_block, r_end - r0);
        std::fill(shift.begin(), shift.end(), acc(0));
        std::fill(d1.begin(), d1.end(), acc(0));
        std::fill(d2.begin(), d2.end(), acc(0));
        acc* __restrict__ sh = shift.data();
        for (int64_t r = r0; r < r0 + rows; ++r) {
          const T* __restrict__ p = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sh[c] += static_cast<acc>(p[c]);
        }
        const acc inv_rows = acc(1) / static_cast<acc>(rows);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sh[c] *= inv_rows;
        acc* __restrict__ a1 = d1.data();
        acc* __restrict__ a2 = d2.data();
        for (int64_t r = r0; r < r0 + rows; ++r) {
          const T* __restrict__ p = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc d = static_cast<acc>(p[c]) - sh[c];
            a1[c] += d;
            a2[c] += d * d;
          }
        }
        const double n = static_cast<double>(rows);
        for (int64_t c = 0; c < C; ++c) {
          const double e1 = a1[c];
          w[c].merge(n, static_cast<double>(sh[c]) + e1 / n, static_cast<double>(a2[c]) - e1 * e1 / n);
        }
      }
    }
  });
  std::vector<Welford> out(C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < tasks; ++k) out[c].merge(partial[k * C + c]);
  return out;
}

void statistics_cpu(const at::Tensor& x, const Geometry& g, at::Tensor& mean, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "abnexp_statistics", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const auto w = g.channels_last ? stats_channels_last(px, g) : stats_channel_major(px, g);
    acc* pm = mean.data_ptr<acc>();
    acc* pv = var.data_ptr<acc>();
    for (int64_t c = 0; c < g.channels; ++c) {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      pm[c] = static_cast<acc>(w[c].n > 0 ? w[c].mean : nan);
      pv[c] = static_cast<acc>(w[c].n > 0 ? std::max(0.0, w[c].m2 / w[c].n) : nan);
    }
  });
}

// ---- the operators' element functions -----------------------------------------------------
template <typename acc>
inline const acc* vec(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc>() : nullptr;
}

template <typename T, Act A>
struct ForwardOp {
  using acc = acc_t<T>;
  const T* __restrict__ x;
  T* out;
  const acc *mean, *scale, *beta;
  ActParam<acc> ap;
  void apply(int64_t i, int64_t c) const {
    const acc y = (static_cast<acc>(x[i]) - mean[c]) * scale[c] + beta[c];
    out[i] = static_cast<T>(act_forward<A>(y, ap));
  }
};

// t and dL/dy of the backward forms (abn.h, struct Channel).
template <typename T, Act A>
struct InplaceForm {
  using acc = acc_t<T>;
  const T* __restrict__ z;
  const T* __restrict__ dz;
  const acc *tshift, *tmul;
  ActParam<acc> ap;
  void dy_t(int64_t i, int64_t c, acc& dy, acc& t) const {
    const acc zi = static_cast<acc>(z[i]);
    dy = act_backward<A>(zi, static_cast<acc>(dz[i]), ap);
    t = (act_inverse<A>(zi, ap) - tshift[c]) * tmul[c];
  }
};

template <typename T, Act A, bool HasZ>
struct XhatForm {
  using acc = acc_t<T>;
  const T* __restrict__ x;
  const T* __restrict__ dz;
  const T* __restrict__ z;
  const acc *mean, *invstd, *gamma, *beta;
  ActParam<acc> ap;
  void dy_t(int64_t i, int64_t c, acc& dy, acc& t) const {
    t = (static_cast<acc>(x[i]) - mean[c]) * invstd[c];
    const acc zi = HasZ ? static_cast<acc>(z[i]) : act_forward<A>(gamma[c] * t + beta[c], ap);
    dy = act_backward<A>(zi, static_cast<acc>(dz[i]), ap);
  }
};

template <class Form>
struct ReduceOp {
  using acc = typename Form::acc;
  Form f;
  void eval(int64_t i, int64_t c, acc& u, acc& v) const {
    acc dy, t;
    f.dy_t(i, c, dy, t);
    u = dy;
    v = dy * t;
  }
};

template <class Form, typename T>
struct GradInputOp {
  using acc = typename Form::acc;
  Form f;
  T* dx;
  const acc *a, *b, *k;
  void apply(int64_t i, int64_t c) const {
    acc dy, t;
    f.dy_t(i, c, dy, t);
    dx[i] = static_cast<T>(a[c] * dy + b[c] * t + k[c]);
  }
};

void forward_cpu(const at::Tensor& x, const Geometry& g, const Channel& ch, Act act, double param,
                 at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "abnexp_forward", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_act(act, [&](auto a) {
      ForwardOp<scalar_t, decltype(a)::value> op{x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                 vec<acc>(ch.mean), vec<acc>(ch.scale), vec<acc>(ch.beta),
                                                 make_act_param<acc>(param)};
      elementwise(g, op);
    });
  });
}

// Calls f(form) with the backward form of this call (in-place, or xhat with/without z).
template <typename T, class F>
void with_form(const Saved& s, const Channel& ch, Act act, double param, bool inplace, const F& f) {
  using acc = acc_t<T>;
  dispatch_act(act, [&](auto a) {
    constexpr Act kA = decltype(a)::value;
    const auto ap = make_act_param<acc>(param);
    const T* dz = s.dz.const_data_ptr<T>();
    if (inplace) {
      f(InplaceForm<T, kA>{s.src.const_data_ptr<T>(), dz, vec<acc>(ch.tshift), vec<acc>(ch.tmul), ap});
    } else if (s.z.defined()) {
      f(XhatForm<T, kA, true>{s.src.const_data_ptr<T>(), dz, s.z.const_data_ptr<T>(), vec<acc>(ch.mean),
                              vec<acc>(ch.scale), vec<acc>(ch.gamma), vec<acc>(ch.beta), ap});
    } else {
      f(XhatForm<T, kA, false>{s.src.const_data_ptr<T>(), dz, nullptr, vec<acc>(ch.mean),
                               vec<acc>(ch.scale), vec<acc>(ch.gamma), vec<acc>(ch.beta), ap});
    }
  });
}

void backward_reduce_cpu(const Saved& s, const Geometry& g, const Channel& ch, Act act, double param,
                         bool inplace, at::Tensor& sum_dy, at::Tensor& sum_dy_t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.src.scalar_type(), "abnexp_backward_reduce", [&] {
    using acc = acc_t<scalar_t>;
    with_form<scalar_t>(s, ch, act, param, inplace, [&](const auto& form) {
      ReduceOp<std::decay_t<decltype(form)>> op{form};
      reduce_sums<acc>(g, op, sum_dy.data_ptr<acc>(), sum_dy_t.data_ptr<acc>());
    });
  });
}

void backward_elementwise_cpu(const Saved& s, const Geometry& g, const Channel& ch, Act act,
                              double param, bool inplace, at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.src.scalar_type(), "abnexp_backward_elementwise", [&] {
    using acc = acc_t<scalar_t>;
    with_form<scalar_t>(s, ch, act, param, inplace, [&](const auto& form) {
      GradInputOp<std::decay_t<decltype(form)>, scalar_t> op{form, dx.data_ptr<scalar_t>(), vec<acc>(ch.a),
                                                             vec<acc>(ch.b), vec<acc>(ch.c)};
      elementwise(g, op);
    });
  });
}

}  // namespace

const Launchers& cpu_launchers() {
  static const Launchers kCpu{statistics_cpu, forward_cpu, backward_reduce_cpu, backward_elementwise_cpu};
  return kCpu;
}

}  // namespace abnexp
