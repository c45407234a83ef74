// The abnexp:: custom operators (TORCH_LIBRARY): schemas, argument checks, layout handling and
// the per-channel coefficients; the full-size work is done by the CPU or CUDA launchers.
//
// Notation (InPlace-ABN, Rota Bulo et al., CVPR 2018, and its supplementary): x the BN input,
// m values per channel, mean / invstd = 1 / sqrt(var + eps), xhat = (x - mean) * invstd,
// y = gamma * xhat + beta, z = act(y). Per-channel vectors are 1-D of length C and are used in
// the compute dtype (double for double inputs, float otherwise); full-size outputs have the
// input's dtype and memory layout. The Python reference of every operator is in
// abnexp/norm/functional.py; fake (meta) implementations are in abnexp/norm/native.py.
#include <torch/library.h>

#include <limits>

#include "abn.h"

namespace abnexp {

Act parse_activation(const std::string& name) {
  if (name == "identity") return Act::Identity;
  if (name == "leaky_relu") return Act::LeakyRelu;
  if (name == "elu") return Act::Elu;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK(false, "abnexp: unknown activation '", name, "'; valid: identity, leaky_relu, elu, relu");
}

namespace {

const Launchers* g_cuda = nullptr;

const Launchers& launchers_for(const at::Tensor& x) {
  if (x.is_cuda()) {
    TORCH_CHECK(g_cuda != nullptr,
                "abnexp kernels were built without CUDA; run `abnexp kernels build --cuda` "
                "(needs the CUDA toolkit: set CUDA_HOME) or set ABNEXP_NATIVE=0");
    return *g_cuda;
  }
  TORCH_CHECK(x.is_cpu(), "abnexp kernels support CPU and CUDA tensors, got ", x.device());
  return cpu_launchers();
}

at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, "abnexp: ", name, " must be (N, C, *), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kFloat8_e4m3fn,
              "abnexp: ", name, " must be float64/32/16 or bfloat16, got ", x.scalar_type());
}

bool channels_last_dense(const at::Tensor& t) { return t.movedim(1, -1).is_contiguous(); }

// `t` itself when dense in one of the two layouts, else a dense copy; sets channels_last.
at::Tensor dense(const at::Tensor& t, bool& channels_last) {
  if (t.is_contiguous()) {
    channels_last = false;
    return t;
  }
  if (channels_last_dense(t)) {
    channels_last = true;
    return t;
  }
  const auto fmt = t.suggest_memory_format();
  channels_last = fmt != at::MemoryFormat::Contiguous;
  return channels_last ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

// `t` in the memory order of a dense tensor with the given layout (a copy only if needed).
at::Tensor like(const at::Tensor& t, bool channels_last) {
  if (!channels_last) return t.contiguous();
  return channels_last_dense(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// Empty inputs (N = 0 or a zero-size spatial dim) launch no kernel: every operator returns its
// empty or per-channel result directly (a zero-size dim used to divide by zero in the loops).
bool has_values(const Geometry& g) { return g.count() > 0 && g.channels > 0; }

Geometry geometry(const at::Tensor& t, bool channels_last) {
  const int64_t N = t.size(0), C = t.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
  if (C == 1) return {1, 1, N * S, false};  // one channel: its values are contiguous
  if (channels_last || S == 1) return {N * S, C, 1, true};
  return {N, C, S, false};
}

// A (C,) vector in the compute dtype, contiguous, on x's device.
at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& x, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "abnexp: ", name, " must have shape (",
              x.size(1), ",), got ", v.sizes());
  TORCH_CHECK(v.device() == x.device(), "abnexp: ", name, " is on ", v.device(), ", input on ", x.device());
  return v.to(compute_dtype(x)).contiguous();
}

void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "abnexp: ", name, " has shape ", b.sizes(), ", expected ", a.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.device() == b.device(), "abnexp: ", name,
              " must have the dtype and device of the saved tensor");
}

// ---- statistics --------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> statistics(const at::Tensor& x) {
  check_input(x, "x");
  bool cl;
  const auto xd = dense(x, cl);
  const auto g = geometry(xd, cl);
  const auto opts = x.options().dtype(compute_dtype(x));
  auto mean = at::empty({g.channels}, opts), var = at::empty({g.channels}, opts);
  if (has_values(g)) {
    launchers_for(x).statistics(xd, g, mean, var);
  } else {  // no values: NaN, as torch.var_mean of an empty reduction
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return {mean, var, at::full({}, static_cast<double>(g.count()), opts)};
}

// Chan's parallel formula over W workers at once: (W, C) means / biased variances and (W,)
// counts -> the statistics of the union (workers with count 0 are ignored).
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_statistics(const at::Tensor& mean,
                                                                const at::Tensor& var,
                                                                const at::Tensor& count) {
  TORCH_CHECK(mean.dim() == 2 && var.sizes() == mean.sizes(),
              "abnexp: merge_statistics needs mean and var of shape (workers, C), got ", mean.sizes(),
              " and ", var.sizes());
  TORCH_CHECK(count.dim() == 1 && count.size(0) == mean.size(0),
              "abnexp: merge_statistics needs count of shape (workers,), got ", count.sizes());
  const auto n = count.to(at::kDouble).unsqueeze(1);
  const auto present = n > 0;
  const auto m = at::where(present, mean.to(at::kDouble), 0.0);
  const auto v = at::where(present, var.to(at::kDouble), 0.0);
  const auto total = n.sum(0);
  const auto merged_mean = (m * n).sum(0) / total;
  const auto dev = at::where(present, m - merged_mean, 0.0);
  const auto merged_var = (n * (v + dev * dev)).sum(0) / total;
  return {merged_mean.to(mean.scalar_type()), merged_var.to(mean.scalar_type()),
          total.squeeze(0).to(mean.scalar_type())};
}

// ---- forward ------------------------------------------------------------------------------
void launch_forward(const at::Tensor& x, const at::Tensor& xd, bool cl, const at::Tensor& mean,
                    const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                    c10::string_view activation, double param, at::Tensor& out) {
  Channel ch;
  ch.mean = channel_vector(mean, x, "mean");
  ch.scale = channel_vector(invstd, x, "invstd") * channel_vector(gamma, x, "gamma");
  ch.beta = channel_vector(beta, x, "beta");
  const Act act = parse_activation(std::string(activation));
  const auto g = geometry(xd, cl);
  if (has_values(g)) launchers_for(x).forward(xd, g, ch, act, param, out);
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                   const at::Tensor& gamma, const at::Tensor& beta, c10::string_view activation,
                   double param) {
  check_input(x, "x");
  bool cl;
  const auto xd = dense(x, cl);
  auto out = at::empty_like(xd);
  launch_forward(x, xd, cl, mean, invstd, gamma, beta, activation, param, out);
  return out;
}

void forward_(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
              const at::Tensor& gamma, const at::Tensor& beta, c10::string_view activation, double param) {
  check_input(x, "x");
  bool cl;
  auto xd = dense(x, cl);
  launch_forward(x, xd, cl, mean, invstd, gamma, beta, activation, param, xd);
  if (!xd.is_same(x)) x.copy_(xd);
}

// ---- backward -----------------------------------------------------------------------------
// The saved tensors of one backward call in a common dense layout (src's).
struct Prepared {
  Saved s;
  Geometry g;
};

Prepared prepare(const at::Tensor& src, const at::Tensor& dz, const std::optional<at::Tensor>& z) {
  check_input(src, "saved tensor");
  check_same_shape(src, dz, "dz");
  bool cl;
  Prepared p;
  p.s.src = dense(src, cl);
  p.s.dz = like(dz, cl);
  if (z.has_value() && z->defined()) {
    check_same_shape(src, *z, "z");
    p.s.z = like(*z, cl);
  }
  p.g = geometry(p.s.src, cl);
  return p;
}

std::tuple<at::Tensor, at::Tensor> reduce(const Prepared& p, const Channel& ch, Act act, double param,
                                          bool inplace) {
  const auto opts = p.s.src.options().dtype(compute_dtype(p.s.src));
  auto sum_dy = at::zeros({p.g.channels}, opts), sum_dy_t = at::zeros({p.g.channels}, opts);
  if (has_values(p.g))
    launchers_for(p.s.src).backward_reduce(p.s, p.g, ch, act, param, inplace, sum_dy, sum_dy_t);
  return {sum_dy, sum_dy_t};
}

// dL/dx into `into` (dz itself for the `_` operators), else into a new tensor (returned).
at::Tensor grad_input(Prepared& p, const Channel& ch, Act act, double param, bool inplace,
                      const at::Tensor* into) {
  at::Tensor dx = into ? p.s.dz : at::empty_like(p.s.src);
  if (has_values(p.g)) launchers_for(p.s.src).backward_elementwise(p.s, p.g, ch, act, param, inplace, dx);
  if (into && !dx.is_same(*into)) into->copy_(dx);  // dz was not in src's layout
  return dx;
}

// dL/dx = a * dy + b * t + c: the xhat-form (variant I, checkpointing, ABN) or y-form (variant II)
// gradient of the supplementary; eval mode (batch_stats false): dL/dx = gamma * invstd * dL/dy.
void set_coefficients(Channel& ch, const at::Tensor& x, const at::Tensor& invstd, const at::Tensor& gamma,
                      const at::Tensor& beta, const at::Tensor& sum_dy, const at::Tensor& sum_dy_t, int64_t count,
                      bool batch_stats, bool y_form) {
  const auto g = channel_vector(gamma, x, "gamma"), is = channel_vector(invstd, x, "invstd");
  const auto s1 = channel_vector(sum_dy, x, "sum_dy"), s2 = channel_vector(sum_dy_t, x, "sum_dy_t");
  ch.a = g * is;
  if (!batch_stats || x.numel() == 0) {  // an empty input has no dL/dx to compute
    ch.b = at::zeros_like(ch.a);
    ch.c = ch.b;
    return;
  }
  TORCH_CHECK(count > 0, "abnexp: count must be positive, got ", count);
  const double m = static_cast<double>(count);
  if (!y_form) {
    ch.b = -ch.a * s2 / m;
    ch.c = -ch.a * s1 / m;
    return;
  }
  const auto b = channel_vector(beta, x, "beta");
  const auto dgamma = (s2 - b * s1) / g;
  ch.b = -is * dgamma / m;
  ch.c = -ch.a * (s1 - b * dgamma / g) / m;
}

// In-place forms (saved z): t = (act^-1(z) - tshift) * tmul is xhat (variant I) or y (variant II).
Channel inplace_channel(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta,
                        c10::string_view variant) {
  TORCH_CHECK(variant == "I" || variant == "II", "abnexp: unknown in-place variant '", std::string(variant),
              "'; valid: I, II");
  Channel ch;
  if (variant == "I") {
    ch.tshift = channel_vector(beta, z, "beta");
    ch.tmul = channel_vector(gamma, z, "gamma").reciprocal();
  } else {
    ch.tshift = at::zeros({z.size(1)}, z.options().dtype(compute_dtype(z)));
    ch.tmul = ch.tshift + 1;
  }
  return ch;
}

Act inplace_activation(c10::string_view activation) {
  const Act act = parse_activation(std::string(activation));
  TORCH_CHECK(act != Act::Relu, "abnexp: relu is not invertible; in-place backward needs leaky_relu, elu or identity");
  return act;
}

std::tuple<at::Tensor, at::Tensor> inplace_backward_reduce(const at::Tensor& z, const at::Tensor& dz,
                                                           const at::Tensor& gamma, const at::Tensor& beta,
                                                           c10::string_view activation, double param,
                                                           c10::string_view variant) {
  const auto p = prepare(z, dz, std::nullopt);
  return reduce(p, inplace_channel(z, gamma, beta, variant), inplace_activation(activation), param, true);
}

at::Tensor inplace_grad_input(const at::Tensor& z, const at::Tensor& dz, const at::Tensor& invstd,
                              const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& sum_dy,
                              const at::Tensor& sum_dy_t, int64_t count, bool batch_stats,
                              c10::string_view activation, double param, c10::string_view variant,
                              const at::Tensor* into) {
  auto p = prepare(z, dz, std::nullopt);
  auto ch = inplace_channel(z, gamma, beta, variant);
  set_coefficients(ch, z, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats, variant == "II");
  return grad_input(p, ch, inplace_activation(activation), param, true, into);
}

at::Tensor inplace_backward_elementwise(const at::Tensor& z, const at::Tensor& dz, const at::Tensor& invstd,
                                        const at::Tensor& gamma, const at::Tensor& beta,
                                        const at::Tensor& sum_dy, const at::Tensor& sum_dy_t, int64_t count,
                                        bool batch_stats, c10::string_view activation, double param,
                                        c10::string_view variant) {
  return inplace_grad_input(z, dz, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats, activation, param,
                            variant, nullptr);
}

void inplace_backward_elementwise_(const at::Tensor& z, const at::Tensor& dz, const at::Tensor& invstd,
                                   const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& sum_dy,
                                   const at::Tensor& sum_dy_t, int64_t count, bool batch_stats,
                                   c10::string_view activation, double param, c10::string_view variant) {
  inplace_grad_input(z, dz, invstd, gamma, beta, sum_dy, sum_dy_t, count, batch_stats, activation, param,
                     variant, &dz);
}

// xhat forms (ABN keeps x and z; checkpointing keeps x, or xhat when mean is None):
// t = xhat = (x - mean) * invstd (mean 0, invstd 1 when x is xhat); z read or recomputed.
Channel xhat_channel(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                     const std::optional<at::Tensor>& invstd, const at::Tensor& gamma, const at::Tensor& beta) {
  Channel ch;
  if (mean.has_value() && mean->defined()) {
    TORCH_CHECK(invstd.has_value() && invstd->defined(), "abnexp: xhat backward with mean needs invstd");
    ch.mean = channel_vector(*mean, x, "mean");
    ch.scale = channel_vector(*invstd, x, "invstd");
  } else {
    ch.mean = at::zeros({x.size(1)}, x.options().dtype(compute_dtype(x)));
    ch.scale = ch.mean + 1;
  }
  ch.gamma = channel_vector(gamma, x, "gamma");
  ch.beta = channel_vector(beta, x, "beta");
  return ch;
}

std::tuple<at::Tensor, at::Tensor> xhat_backward_reduce(const at::Tensor& x, const at::Tensor& dz,
                                                        const std::optional<at::Tensor>& z,
                                                        const std::optional<at::Tensor>& mean,
                                                        const std::optional<at::Tensor>& invstd,
                                                        const at::Tensor& gamma, const at::Tensor& beta,
                                                        c10::string_view activation, double param) {
  const auto p = prepare(x, dz, z);
  return reduce(p, xhat_channel(x, mean, invstd, gamma, beta), parse_activation(std::string(activation)), param,
                false);
}

at::Tensor xhat_grad_input(const at::Tensor& x, const at::Tensor& dz, const std::optional<at::Tensor>& z,
                           const std::optional<at::Tensor>& mean, const at::Tensor& invstd,
                           const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& sum_dy,
                           const at::Tensor& sum_dy_xhat, int64_t count, bool batch_stats,
                           c10::string_view activation, double param, const at::Tensor* into) {
  auto p = prepare(x, dz, z);
  auto ch = xhat_channel(x, mean, invstd, gamma, beta);
  set_coefficients(ch, x, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats, false);
  return grad_input(p, ch, parse_activation(std::string(activation)), param, false, into);
}

at::Tensor xhat_backward_elementwise(const at::Tensor& x, const at::Tensor& dz, const std::optional<at::Tensor>& z,
                                     const std::optional<at::Tensor>& mean, const at::Tensor& invstd,
                                     const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& sum_dy,
                                     const at::Tensor& sum_dy_xhat, int64_t count, bool batch_stats,
                                     c10::string_view activation, double param) {
  return xhat_grad_input(x, dz, z, mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats,
                         activation, param, nullptr);
}

void xhat_backward_elementwise_(const at::Tensor& x, const at::Tensor& dz, const std::optional<at::Tensor>& z,
                                const std::optional<at::Tensor>& mean, const at::Tensor& invstd,
                                const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xhat, int64_t count, bool batch_stats,
                                c10::string_view activation, double param) {
  xhat_grad_input(x, dz, z, mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, count, batch_stats, activation, param,
                  &dz);
}

// Linear forms (MABN's normalization x * scale, CBN's and the statistics' backward): t = x itself,
// dy = act'(z) dz with the saved output z (no z: identity, dy = dz). With dz = x the reduction
// gives (sum x, sum x^2), MABN's second-moment statistic.
Channel linear_channel(const at::Tensor& x, const std::optional<at::Tensor>& z, c10::string_view activation) {
  TORCH_CHECK((z.has_value() && z->defined()) || parse_activation(std::string(activation)) == Act::Identity,
              "abnexp: linear backward with activation '", std::string(activation), "' needs the saved output z");
  return xhat_channel(x, std::nullopt, std::nullopt, at::ones({x.size(1)}, x.options().dtype(compute_dtype(x))),
                      at::zeros({x.size(1)}, x.options().dtype(compute_dtype(x))));
}

std::tuple<at::Tensor, at::Tensor> linear_backward_reduce(const at::Tensor& x, const at::Tensor& dz,
                                                          const std::optional<at::Tensor>& z,
                                                          c10::string_view activation, double param) {
  const auto p = prepare(x, dz, z);
  return reduce(p, linear_channel(x, z, activation), parse_activation(std::string(activation)), param, false);
}

// dL/dx = a * dy + b * x + c with the caller's (C,) coefficients.
at::Tensor linear_grad_input(const at::Tensor& x, const at::Tensor& dz, const std::optional<at::Tensor>& z,
                             const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                             c10::string_view activation, double param, const at::Tensor* into) {
  auto p = prepare(x, dz, z);
  auto ch = linear_channel(x, z, activation);
  ch.a = channel_vector(a, x, "a");
  ch.b = channel_vector(b, x, "b");
  ch.c = channel_vector(c, x, "c");
  return grad_input(p, ch, parse_activation(std::string(activation)), param, false, into);
}

at::Tensor linear_backward_elementwise(const at::Tensor& x, const at::Tensor& dz, const std::optional<at::Tensor>& z,
                                       const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                       c10::string_view activation, double param) {
  return linear_grad_input(x, dz, z, a, b, c, activation, param, nullptr);
}

void linear_backward_elementwise_(const at::Tensor& x, const at::Tensor& dz, const std::optional<at::Tensor>& z,
                                  const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                  c10::string_view activation, double param) {
  linear_grad_input(x, dz, z, a, b, c, activation, param, &dz);
}

}  // namespace

void set_cuda_launchers(const Launchers* launchers) { g_cuda = launchers; }

TORCH_LIBRARY(abnexp, m) {
  m.set_python_module("abnexp.norm.native");
  m.def("statistics(Tensor x) -> (Tensor mean, Tensor var, Tensor count)");
  m.def("merge_statistics(Tensor mean, Tensor var, Tensor count) -> (Tensor mean, Tensor var, Tensor count)");
  m.def("forward(Tensor x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, str activation, "
        "float param) -> Tensor");
  m.def("forward_(Tensor(a!) x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, str activation, "
        "float param) -> ()");
  m.def("inplace_backward_reduce(Tensor z, Tensor dz, Tensor gamma, Tensor beta, str activation, float param, "
        "str variant) -> (Tensor sum_dy, Tensor sum_dy_t)");
  m.def("inplace_backward_elementwise(Tensor z, Tensor dz, Tensor invstd, Tensor gamma, Tensor beta, "
        "Tensor sum_dy, Tensor sum_dy_t, int count, bool batch_stats, str activation, float param, "
        "str variant) -> Tensor");
  m.def("inplace_backward_elementwise_(Tensor z, Tensor(a!) dz, Tensor invstd, Tensor gamma, Tensor beta, "
        "Tensor sum_dy, Tensor sum_dy_t, int count, bool batch_stats, str activation, float param, "
        "str variant) -> ()");
  m.def("xhat_backward_reduce(Tensor x, Tensor dz, Tensor? z, Tensor? mean, Tensor? invstd, Tensor gamma, "
        "Tensor beta, str activation, float param) -> (Tensor sum_dy, Tensor sum_dy_xhat)");
  m.def("xhat_backward_elementwise(Tensor x, Tensor dz, Tensor? z, Tensor? mean, Tensor invstd, Tensor gamma, "
        "Tensor beta, Tensor sum_dy, Tensor sum_dy_xhat, int count, bool batch_stats, str activation, "
        "float param) -> Tensor");
  m.def("xhat_backward_elementwise_(Tensor x, Tensor(a!) dz, Tensor? z, Tensor? mean, Tensor invstd, "
        "Tensor gamma, Tensor beta, Tensor sum_dy, Tensor sum_dy_xhat, int count, bool batch_stats, "
        "str activation, float param) -> ()");
  m.def("linear_backward_reduce(Tensor x, Tensor dz, Tensor? z, str activation, float param) "
        "-> (Tensor sum_dy, Tensor sum_dy_x)");
  m.def("linear_backward_elementwise(Tensor x, Tensor dz, Tensor? z, Tensor a, Tensor b, Tensor c, "
        "str activation, float param) -> Tensor");
  m.def("linear_backward_elementwise_(Tensor x, Tensor(a!) dz, Tensor? z, Tensor a, Tensor b, Tensor c, "
        "str activation, float param) -> ()");
}

// merge_statistics is composed of ATen ops: one implementation for every backend (and meta).
TORCH_LIBRARY_IMPL(abnexp, CompositeExplicitAutograd, m) { m.impl("merge_statistics", &merge_statistics); }

#define ABNEXP_REGISTER_KERNELS(m)                                                  \
  m.impl("statistics", &statistics);                                               \
  m.impl("forward", &forward);                                                     \
  m.impl("forward_", &forward_);                                                   \
  m.impl("inplace_backward_reduce", &inplace_backward_reduce);                     \
  m.impl("inplace_backward_elementwise", &inplace_backward_elementwise);           \
  m.impl("inplace_backward_elementwise_", &inplace_backward_elementwise_);         \
  m.impl("xhat_backward_reduce", &xhat_backward_reduce);                           \
  m.impl("xhat_backward_elementwise", &xhat_backward_elementwise);                 \
  m.impl("xhat_backward_elementwise_", &xhat_backward_elementwise_);              \
  m.impl("linear_backward_reduce", &linear_backward_reduce);                       \
  m.impl("linear_backward_elementwise", &linear_backward_elementwise);             \
  m.impl("linear_backward_elementwise_", &linear_backward_elementwise_)

// The same wrappers serve both devices; CUDA tensors need the CUDA launchers (abn_cuda.cu).
TORCH_LIBRARY_IMPL(abnexp, CPU, m) { ABNEXP_REGISTER_KERNELS(m); }
TORCH_LIBRARY_IMPL(abnexp, CUDA, m) { ABNEXP_REGISTER_KERNELS(m); }

}  // namespace abnexp
