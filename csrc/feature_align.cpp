// CPU kernel of fastkd's feature_align: per-row loss and d loss / d student in one read of each row.
// Computes fastkd.ops.feature_align: the math is stated in fastkd/ops/feature_align.py's module docstring.
//
// Inputs are [M, D] with unit stride along D and a row weight w_i (1 without weights). Outputs:
// loss_i = w_i * l_i (float32; float64 if an input is float64), grad_i = w_i * d l_i / d s_i (student dtype).
// Each row is read once from memory; the few passes over it run in L1 in float (double for
// double inputs). Rows with w_i == 0 are not read. Registered as the CPU kernel of fastkd::feature_align,
// with its autograd (any device): the backward only scales the saved gradient by the incoming
// per-row gradient, in place unless the graph is retained. The CUDA kernel (Triton) and the fake
// kernel are registered from fastkd/ops/feature_align.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "library.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace fastkd {
namespace {

enum class TargetNorm { kNone, kLayerNorm, kL2 };
enum class Loss { kSmoothL1, kMse, kCosine };

struct AlignParams {
  TargetNorm target_norm;
  bool student_norm;
  Loss loss;
  double beta;
  double eps;
};

#define FASTKD_INLINE inline __attribute__((always_inline))

template <typename acc_t>
FASTKD_INLINE acc_t sum_of(const acc_t* __restrict v, int64_t n) {
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) total += v[j];
  return total;
}

template <typename acc_t>
FASTKD_INLINE acc_t sum_sq_of(const acc_t* __restrict v, acc_t shift, int64_t n) {
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t c = v[j] - shift;
    total += c * c;
  }
  return total;
}

// Loss of one row; writes w * d loss / d s into g. Target y_j = (t_j - shift) * scale,
// student x_j = s_j * s_scale.
template <typename acc_t>
FASTKD_INLINE acc_t align_row(const acc_t* __restrict s, const acc_t* __restrict t, acc_t* __restrict g,
                              int64_t D, const AlignParams& p, acc_t w) {
  const acc_t eps = static_cast<acc_t>(p.eps);
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  acc_t shift = 0, scale = 1;
  if (p.target_norm == TargetNorm::kLayerNorm) {
    shift = sum_of(t, D) * inv_d;
    scale = acc_t(1) / std::sqrt(sum_sq_of(t, shift, D) * inv_d + eps);
  } else if (p.target_norm == TargetNorm::kL2) {
    scale = acc_t(1) / std::max(std::sqrt(sum_sq_of(t, acc_t(0), D)), eps);
  }
  acc_t s_norm = 0, s_scale = 1;
  if (p.student_norm) {
    s_norm = std::sqrt(sum_sq_of(s, acc_t(0), D));
    s_scale = acc_t(1) / std::max(s_norm, eps);
  }
  // With an l2-normalised student the weight is applied in the final projection pass instead.
  const acc_t gw = p.student_norm ? acc_t(1) : w;
  acc_t loss = 0;
  if (p.loss == Loss::kSmoothL1) {
    const acc_t beta = static_cast<acc_t>(p.beta);
    const acc_t half_beta = beta / 2;
    const acc_t inv_beta = beta > 0 ? acc_t(1) / beta : acc_t(0);
    const acc_t gscale = inv_d * gw;
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < D; ++j) {
      const acc_t d = s[j] * s_scale - (t[j] - shift) * scale;
      const acc_t ad = std::abs(d);
      const bool quadratic = ad < beta;
      total += quadratic ? acc_t(0.5) * d * d * inv_beta : ad - half_beta;
      const acc_t sign = d > 0 ? acc_t(1) : (d < 0 ? acc_t(-1) : acc_t(0));
      g[j] = (quadratic ? d * inv_beta : sign) * gscale;
    }
    loss = total * inv_d;
  } else if (p.loss == Loss::kMse) {
    const acc_t gscale = 2 * inv_d * gw;
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < D; ++j) {
      const acc_t d = s[j] * s_scale - (t[j] - shift) * scale;
      total += d * d;
      g[j] = d * gscale;
    }
    loss = total * inv_d;
  } else {
    acc_t xy = 0, xx = 0, yy = 0;
#pragma omp simd reduction(+ : xy, xx, yy)
    for (int64_t j = 0; j < D; ++j) {
      const acc_t x = s[j] * s_scale;
      const acc_t y = (t[j] - shift) * scale;
      xy += x * y;
      xx += x * x;
      yy += y * y;
    }
    const acc_t x_norm = std::sqrt(xx);
    const acc_t x_den = std::max(x_norm, eps);
    const acc_t y_den = std::max(std::sqrt(yy), eps);
    const acc_t cos = xy / (x_den * y_den);
    loss = 1 - cos;
    const acc_t x_coef = (x_norm > eps ? cos : acc_t(0)) * gw / (x_den * x_den) * s_scale;
    const acc_t y_coef = gw / (y_den * x_den) * scale;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) g[j] = s[j] * x_coef - (t[j] - shift) * y_coef;
  }
  if (p.student_norm) {
    acc_t radial = 0;
    if (s_norm > eps) {
#pragma omp simd reduction(+ : radial)
      for (int64_t j = 0; j < D; ++j) radial += s[j] * g[j];
      radial *= s_scale;
    }
    const acc_t coef = s_scale * w;
    const acc_t s_coef = radial * s_scale * coef;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) g[j] = g[j] * coef - s[j] * s_coef;
  }
  return loss;
}

template <typename src_t, typename dst_t>
FASTKD_INLINE void convert_row(const src_t* __restrict src, dst_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<dst_t>(static_cast<float>(src[j]));
}

// Rows [begin, end): vectorised by the ISA flags setup.py builds the extension with.
template <typename student_t, typename teacher_t, typename acc_t>
void align_rows(const student_t* s_base, int64_t s_stride, const teacher_t* t_base, int64_t t_stride,
                const float* weight, acc_t* loss, student_t* grad, int64_t begin, int64_t end, int64_t D,
                const AlignParams& p) {
  constexpr bool s_native = std::is_same_v<student_t, acc_t>;
  constexpr bool t_native = std::is_same_v<teacher_t, acc_t>;
  std::vector<acc_t> scratch(3 * D);
  acc_t* s_buf = scratch.data();
  acc_t* t_buf = s_buf + D;
  acc_t* g_buf = t_buf + D;
  for (int64_t row = begin; row < end; ++row) {
    const acc_t w = weight ? static_cast<acc_t>(weight[row]) : acc_t(1);
    student_t* g_row = grad ? grad + row * D : nullptr;
    if (w == 0) {
      loss[row] = 0;
      if (g_row) std::fill(g_row, g_row + D, student_t(0));
      continue;
    }
    const student_t* s_row = s_base + row * s_stride;
    const teacher_t* t_row = t_base + row * t_stride;
    const acc_t* s_acc;
    const acc_t* t_acc;
    if constexpr (s_native) {
      s_acc = s_row;
    } else {
      convert_row(s_row, s_buf, D);
      s_acc = s_buf;
    }
    if constexpr (t_native) {
      t_acc = t_row;
    } else {
      convert_row(t_row, t_buf, D);
      t_acc = t_buf;
    }
    acc_t* g_acc = g_buf;
    if constexpr (s_native) {
      if (g_row) g_acc = g_row;
    }
    const acc_t l = align_row<acc_t>(s_acc, t_acc, g_acc, D, p, w);
    loss[row] = l * w;
    if constexpr (!s_native) {
      if (g_row) convert_row(g_acc, g_row, D);
    }
  }
}

TargetNorm parse_target_norm(c10::string_view name) {
  if (name == "none") return TargetNorm::kNone;
  if (name == "layernorm") return TargetNorm::kLayerNorm;
  if (name == "l2") return TargetNorm::kL2;
  TORCH_CHECK_VALUE(false, "target_norm must be 'layernorm', 'l2' or 'none', got '", std::string(name), "'");
}

Loss parse_loss(c10::string_view name) {
  if (name == "smooth_l1") return Loss::kSmoothL1;
  if (name == "mse") return Loss::kMse;
  if (name == "cosine") return Loss::kCosine;
  TORCH_CHECK_VALUE(false, "loss must be 'smooth_l1', 'mse' or 'cosine', got '", std::string(name), "'");
}

std::tuple<at::Tensor, at::Tensor> feature_align_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     const std::optional<at::Tensor>& weight,
                                                     c10::string_view target_norm, bool student_norm,
                                                     c10::string_view loss, double beta, double eps,
                                                     bool write_grad) {
  check_cpu_isa("feature_align_cpu");
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.sizes() == student.sizes(),
                    "student and teacher must both be [M, D], got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu(), "feature_align_cpu needs CPU tensors");
  TORCH_CHECK_VALUE(student.stride(1) == 1 && teacher.stride(1) == 1,
                    "student and teacher need unit stride along D, got ", student.strides(), " and ",
                    teacher.strides());
  TORCH_CHECK_VALUE(beta >= 0, "beta must be >= 0, got ", beta);
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  const int64_t M = student.size(0), D = student.size(1);
  const AlignParams params{parse_target_norm(target_norm), student_norm, parse_loss(loss), beta, eps};
  const float* weight_ptr = nullptr;
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->scalar_type() == at::kFloat && weight->is_contiguous() && weight->dim() == 1 &&
                          weight->size(0) == M,
                      "weight must be a contiguous float32 [M]=[", M, "] tensor, got ", weight->scalar_type(),
                      " ", weight->sizes());
    weight_ptr = weight->data_ptr<float>();
  }
  const bool any_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  at::Tensor out_loss = at::empty({M}, student.options().dtype(any_double ? at::kDouble : at::kFloat));
  at::Tensor grad = write_grad ? at::empty({M, D}, student.options()) : at::empty({0}, student.options());
  if (M == 0 || D == 0) {
    out_loss.zero_();
    grad.zero_();
    return {out_loss, grad};
  }
  const int64_t grain = grain_for(D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "feature_align_cpu", [&] {
    using student_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "feature_align_cpu", [&] {
      using teacher_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<student_t, double> || std::is_same_v<teacher_t, double>,
                                       double, float>;
      const student_t* s = student.const_data_ptr<student_t>();
      const teacher_t* t = teacher.const_data_ptr<teacher_t>();
      acc_t* loss_ptr = out_loss.data_ptr<acc_t>();
      student_t* g = write_grad ? grad.data_ptr<student_t>() : nullptr;
      const int64_t ss = student.stride(0), ts = teacher.stride(0);
      at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
        align_rows<student_t, teacher_t, acc_t>(s, ss, t, ts, weight_ptr, loss_ptr, g, begin, end, D, params);
      });
    });
  });
  return {out_loss, grad};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class FeatureAlign : public torch::autograd::Function<FeatureAlign> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& weight, c10::string_view target_norm,
                               bool student_norm, c10::string_view loss, double beta, double eps, bool write_grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastkd::feature_align", "")
                               .typed<decltype(feature_align_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [rows, grad] = op.call(student, teacher, weight, target_norm, student_norm, loss, beta, eps, write_grad);
    ctx->saved_data["grad"] = grad;  // not a saved variable: the backward may scale it in place
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);
    return {rows, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    at::Tensor grad = ctx->saved_data["grad"].toTensor();
    // sym_numel: under torch.compile the backward is traced with symbolic sizes (a dynamic token count)
    TORCH_CHECK(grad.sym_numel() != 0 || grads[0].sym_numel() == 0,
                "fastkd::feature_align was called with write_grad=False, so it has no student gradient");
    const at::Tensor scale = grads[0].unsqueeze(1);
    // the graph is freed after this backward unless retained: nobody else reads the saved gradient
    if (torch::autograd::get_current_graph_task_keep_graph()) {
      out[0] = at::empty_like(grad);
      at::mul_out(out[0], grad, scale);
    } else {
      out[0] = grad.mul_(scale);
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> feature_align_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                          const std::optional<at::Tensor>& weight,
                                                          c10::string_view target_norm, bool student_norm,
                                                          c10::string_view loss, double beta, double eps,
                                                          bool write_grad) {
  auto out = FeatureAlign::apply(student, teacher, weight, target_norm, student_norm, loss, beta, eps, write_grad);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "feature_align(Tensor student, Tensor teacher, Tensor? weight, str target_norm, bool student_norm, "
      "str loss, float beta, float eps, bool write_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("feature_align", &fastkd::feature_align_cpu); }

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) { m.impl("feature_align", &fastkd::feature_align_autograd); }
