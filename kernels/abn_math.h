// Elementwise math shared by the CPU and CUDA kernels: the activations of
// abnexp/norm/activations.py (forward, dL/dy from the output z, inverse), evaluated in acc_t.
// Conventions mirror the reference: at z == 0 the negative-side slope is used, the ELU
// inverse clamps z / alpha to > -1 (by the acc_t epsilon) so that y stays finite.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include "abn.h"

#if defined(__CUDACC__)
#define ABNEXP_HD __host__ __device__ __forceinline__
#else
#define ABNEXP_HD inline
#endif

namespace abnexp {

template <typename acc>
struct ActParam {
  acc p;        // slope / alpha
  acc inv_p;    // 1 / p (0 when p == 0)
  acc elu_min;  // -1 + epsilon(acc)
};

template <typename acc>
inline ActParam<acc> make_act_param(double param) {
  return {static_cast<acc>(param), static_cast<acc>(param != 0.0 ? 1.0 / param : 0.0),
          static_cast<acc>(-1.0 + static_cast<double>(std::numeric_limits<acc>::epsilon()))};
}

template <typename T>
ABNEXP_HD T expm1_(T v) {
#if defined(__CUDA_ARCH__)
  return ::expm1(v);
#else
  return std::expm1(v);
#endif
}

template <typename T>
ABNEXP_HD T log1p_(T v) {
#if defined(__CUDA_ARCH__)
  return ::log1p(v);
#else
  return std::log1p(v);
#endif
}

// z = act(y)
template <Act A, typename T>
ABNEXP_HD T act_forward(T y, const ActParam<T>& a) {
  if constexpr (A == Act::LeakyRelu) {
    return y > T(0) ? y : y * a.p;
  } else if constexpr (A == Act::Elu) {
    return y > T(0) ? y : a.p * expm1_(y);
  } else if constexpr (A == Act::Relu) {
    return y > T(0) ? y : T(0);
  } else {
    return y;
  }
}

// dL/dy from the output z and dL/dz (needs slope / alpha >= 0)
template <Act A, typename T>
ABNEXP_HD T act_backward(T z, T dz, const ActParam<T>& a) {
  if constexpr (A == Act::LeakyRelu) {
    return z > T(0) ? dz : dz * a.p;
  } else if constexpr (A == Act::Elu) {
    return z > T(0) ? dz : dz * (z + a.p);
  } else if constexpr (A == Act::Relu) {
    return z > T(0) ? dz : T(0);
  } else {
    return dz;
  }
}

// y = act^-1(z) (relu has none: the wrappers reject it before)
template <Act A, typename T>
ABNEXP_HD T act_inverse(T z, const ActParam<T>& a) {
  if constexpr (A == Act::LeakyRelu) {
    return z >= T(0) ? z : z * a.inv_p;
  } else if constexpr (A == Act::Elu) {
    const T r = z * a.inv_p;
    return z > T(0) ? z : log1p_(r > a.elu_min ? r : a.elu_min);
  } else {
    return z;
  }
}

// Calls f(std::integral_constant<Act, act>{}) so kernels are compiled once per activation.
template <class F>
void dispatch_act(Act act, const F& f) {
  switch (act) {
    case Act::Identity: f(std::integral_constant<Act, Act::Identity>{}); break;
    case Act::LeakyRelu: f(std::integral_constant<Act, Act::LeakyRelu>{}); break;
    case Act::Elu: f(std::integral_constant<Act, Act::Elu>{}); break;
    case Act::Relu: f(std::integral_constant<Act, Act::Relu>{}); break;
  }
}

}  // namespace abnexp
