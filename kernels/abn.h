// Native kernels of abnexp's BN + activation layers (InPlace-ABN, Rota Bulo et al., CVPR 2018).
//
// Shared declarations of the CPU (abn_cpu.cpp) and CUDA (abn_cuda.cu) implementations and of
// the operator wrappers (ops.cpp). Every kernel reduces per channel over N and all spatial
// positions of an input (N, C, *) stored in one of two dense layouts:
//   * "channel-major" (NCHW contiguous): element (n, c, s) at (n * C + c) * S + s;
//   * "channels-last" (NHWC dense, also (N, C) contiguous): element (r, c) at r * C + c,
//     r running over N * prod(spatial).
// The wrappers in ops.cpp bring every tensor of one call into the same layout first.
// Arithmetic is done in acc_t: double for double inputs, float otherwise (half and bfloat16
// are upcast element by element); per-channel vectors are given in acc_t.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace abnexp {

// The activations of abnexp/norm/activations.py; param = LeakyReLU slope / ELU alpha.
enum class Act : int { Identity = 0, LeakyRelu = 1, Elu = 2, Relu = 3 };

Act parse_activation(const std::string& name);

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Shape of one call in its layout (see the file comment).
struct Geometry {
  int64_t outer;     // channel-major: N; channels-last: rows R = N * prod(spatial)
  int64_t channels;  // C
  int64_t inner;     // channel-major: prod(spatial); channels-last: 1
  bool channels_last;
  int64_t count() const { return outer * inner; }  // m, values per channel
  int64_t numel() const { return outer * channels * inner; }
};

// Per-channel vectors of the kernels (acc_t, length C, same device; undefined when unused).
//   forward:      z = act((x - mean) * scale + beta)
//   in-place I/II backward: y = act^-1(z), t = (y - tshift) * tmul; dy = act'(z) dz
//   xhat backward: t = xhat = (x - mean) * invstd; z = saved or act(gamma * t + beta);
//                  dy = act'(z) dz
//   dL/dx = a * dy + b * t + c
struct Channel {
  at::Tensor mean, scale;  // forward: scale = invstd * gamma; xhat form: scale = invstd
  at::Tensor gamma, beta, tshift, tmul;
  at::Tensor a, b, c;  // dL/dx coefficients
};

// The saved full-size tensors of a backward call (dense, same layout as dz).
//   in-place forms: src = z;  xhat form: src = x (or xhat with mean 0, invstd 1), z optional
struct Saved {
  at::Tensor src;
  at::Tensor z;  // undefined unless the xhat form reads a stored z (ABN)
  at::Tensor dz;
};

// One implementation (CPU or CUDA) of the kernels; outputs are preallocated by ops.cpp.
struct Launchers {
  // mean, var: (C,) acc_t; biased variance (Welford/Chan).
  void (*statistics)(const at::Tensor& x, const Geometry& g, at::Tensor& mean, at::Tensor& var);
  // out may be x itself (in place).
  void (*forward)(const at::Tensor& x, const Geometry& g, const Channel& p, Act act, double param,
                  at::Tensor& out);
  // sum_dy, sum_dy_t: (C,) acc_t. inplace: t from z; otherwise the xhat form.
  void (*backward_reduce)(const Saved& s, const Geometry& g, const Channel& p, Act act,
                          double param, bool inplace, at::Tensor& sum_dy, at::Tensor& sum_dy_t);
  // dx may be s.dz itself.
  void (*backward_elementwise)(const Saved& s, const Geometry& g, const Channel& p, Act act,
                               double param, bool inplace, at::Tensor& dx);
};

const Launchers& cpu_launchers();

// Defined in ops.cpp: lets the CUDA translation unit, when built, register its kernels.
void set_cuda_launchers(const Launchers* launchers);

}  // namespace abnexp
