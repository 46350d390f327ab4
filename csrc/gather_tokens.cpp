// CPU kernels of fastkd's gather_tokens (token gather fused with the positional-embedding add).
// Computes fastkd.ops.gather_tokens: the math is stated in fastkd/ops/gather_tokens.py's module docstring.
//
// keep [B, K] is int64, validated by the caller; pos is [N, D] or None. The forward does float math
// and writes out in torch.result_type(x, pos); the backward returns grad_pos in float32 (float64 for
// double grads), of shape [0, D] unless with_pos.
// Nothing of size [B, N, D] is read: the forward touches the kept rows only; the backward writes
// grad_x once per sample (zero fill and scatter while the sample's block is in cache) and sums
// the positional gradient from the B * K kept gradient rows, split over feature columns so that
// threads never write the same element. The forward range-checks keep (one pass over the B * K
// indices). Registered as the CPU kernels of fastkd::gather_tokens and fastkd::gather_tokens_backward,
// with the autograd of fastkd::gather_tokens (any device); the CUDA (Triton) and fake kernels are
// registered from fastkd/ops/gather_tokens.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "library.h"

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace fastkd {
namespace {

template <typename T>
using acc_type_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

#define FASTKD_INLINE inline __attribute__((always_inline))

// dst[j] = src[j] (+ pos[j]) for j < D, in acc_t; pos may be null.
template <typename src_t, typename dst_t>
FASTKD_INLINE void copy_row(dst_t* __restrict dst, const src_t* __restrict src, const dst_t* __restrict pos, int64_t D) {
  using acc_t = acc_type_of<dst_t>;
  if (pos == nullptr) {
    if constexpr (std::is_same_v<src_t, dst_t>) {
      std::memcpy(dst, src, sizeof(dst_t) * D);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<dst_t>(static_cast<acc_t>(src[j]));
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<dst_t>(static_cast<acc_t>(src[j]) + static_cast<acc_t>(pos[j]));
}

// dst[j] += src[j] for j in [c0, c1), in the accumulation type of dst_t.
template <typename src_t, typename dst_t>
FASTKD_INLINE void add_row(dst_t* __restrict dst, const src_t* __restrict src, int64_t c0, int64_t c1) {
  using acc_t = acc_type_of<dst_t>;
#pragma omp simd
  for (int64_t j = c0; j < c1; ++j) dst[j] = static_cast<dst_t>(static_cast<acc_t>(dst[j]) + static_cast<acc_t>(src[j]));
}

void check_common(const at::Tensor& rows, const char* rows_name, const at::Tensor& keep) {
  TORCH_CHECK(rows.device().is_cpu() && keep.device().is_cpu(), "gather_tokens_cpu: tensors must be on CPU");
  TORCH_CHECK(rows.dim() == 3, rows_name, " must have shape [B, *, D], got ", rows.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kLong && keep.dim() == 2 && keep.size(0) == rows.size(0),
              "keep must be an int64 [B, K] tensor with B = ", rows.size(0), ", got ", keep.scalar_type(), " ",
              keep.sizes());
}

at::Tensor gather_tokens_cpu(const at::Tensor& x_in, const at::Tensor& keep_in, const std::optional<at::Tensor>& pos_in) {
  check_cpu_isa("gather_tokens_cpu");
  check_common(x_in, "x", keep_in);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = keep_in.size(1);
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  at::ScalarType out_dtype = x.scalar_type();
  at::Tensor pos;
  if (pos_in.has_value()) {
    TORCH_CHECK(pos_in->numel() == N * D, "pos_embed must have N * D = ", N * D, " elements, got ", pos_in->sizes());
    out_dtype = at::promote_types(x.scalar_type(), pos_in->scalar_type());
    pos = pos_in->reshape({N, D}).to(out_dtype).contiguous();  // [N, D]: small
  }
  at::Tensor out = at::empty({B, K, D}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const int64_t* idx = keep.const_data_ptr<int64_t>();
  const auto [low, high] = std::minmax_element(idx, idx + B * K);
  TORCH_CHECK_VALUE(*low >= 0 && *high < N, "keep indices must be in [0, ", N, ") (N = x.shape[1]), got values in [",
                    *low, ", ", *high, "]");
  const int64_t sxb = x.stride(0), sxn = x.stride(1);
  const int64_t grain = grain_for(D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gather_tokens_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "gather_tokens_cpu_out", [&] {
      using out_t = scalar_t;
      const x_t* xp = x.const_data_ptr<x_t>();
      const out_t* pp = pos.defined() ? pos.const_data_ptr<out_t>() : nullptr;
      out_t* op = out.data_ptr<out_t>();
      at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = idx[r];
          copy_row<x_t, out_t>(op + r * D, xp + (r / K) * sxb + n * sxn, pp == nullptr ? nullptr : pp + n * D, D);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_tokens_backward_cpu(const at::Tensor& grad_in, const at::Tensor& keep_in,
                                                              int64_t num_tokens, at::ScalarType x_dtype,
                                                              bool with_pos) {
  check_cpu_isa("gather_tokens_backward_cpu");
  check_common(grad_in, "grad_out", keep_in);
  const int64_t B = grad_in.size(0), K = grad_in.size(1), D = grad_in.size(2), N = num_tokens;
  TORCH_CHECK(keep_in.size(1) == K, "keep must have K = ", K, " columns, got ", keep_in.sizes());
  const at::Tensor grad = grad_in.stride(2) == 1 ? grad_in : grad_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  at::Tensor grad_x = at::empty({B, N, D}, grad.options().dtype(x_dtype));
  const at::ScalarType pos_acc_dtype = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_pos = at::zeros({with_pos ? N : 0, D}, grad.options().dtype(pos_acc_dtype));
  if (grad_x.numel() == 0) return {grad_x, grad_pos};
  const int64_t* idx = keep.const_data_ptr<int64_t>();
  const int64_t sgb = grad.stride(0), sgk = grad.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gather_tokens_backward_cpu", [&] {
    using g_t = scalar_t;
    const g_t* gp = grad.const_data_ptr<g_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_dtype, "gather_tokens_backward_cpu_x", [&] {
      using x_t = scalar_t;
      x_t* xp = grad_x.data_ptr<x_t>();
      // grad_x: one sample per task; zero its [N, D] block, then add the kept rows (repeats sum up).
      at::parallel_for(0, B, grain_for((N + K) * D), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          x_t* block = xp + b * N * D;
          std::memset(static_cast<void*>(block), 0, sizeof(x_t) * N * D);
          for (int64_t k = 0; k < K; ++k) add_row<g_t, x_t>(block + idx[b * K + k] * D, gp + b * sgb + k * sgk, 0, D);
        }
      });
    });
    if (with_pos) {
      // grad_pos[n] = sum over (b, k) with keep[b, k] == n of grad[b, k]; tasks own column blocks.
      using pos_acc_t = acc_type_of<g_t>;
      pos_acc_t* pp = grad_pos.data_ptr<pos_acc_t>();
      constexpr int64_t kCols = 64;
      at::parallel_for(0, (D + kCols - 1) / kCols, grain_for(B * K * kCols), [&](int64_t begin, int64_t end) {
        const int64_t c0 = begin * kCols, c1 = std::min(D, end * kCols);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t k = 0; k < K; ++k) add_row<g_t, pos_acc_t>(pp + idx[b * K + k] * D, gp + b * sgb + k * sgk, c0, c1);
        }
      });
    }
  });
  return {grad_x, grad_pos};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GatherTokens : public torch::autograd::Function<GatherTokens> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& keep,
                            const std::optional<at::Tensor>& pos) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastkd::gather_tokens", "").typed<decltype(gather_tokens_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = op.call(x, keep, pos);
    ctx->save_for_backward({keep});
    ctx->saved_data["num_tokens"] = x.size(1);
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    if (pos.has_value()) {
      ctx->saved_data["pos_sizes"] = pos->sizes().vec();
      ctx->saved_data["pos_dtype"] = static_cast<int64_t>(pos->scalar_type());
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastkd::gather_tokens_backward", "")
                               .typed<decltype(gather_tokens_backward_cpu)>();
    const bool has_pos = ctx->saved_data.count("pos_sizes") != 0;
    const bool with_pos = has_pos && ctx->needs_input_grad(2);
    if (!ctx->needs_input_grad(0) && !with_pos) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    auto [grad_x, grad_pos] =
        op.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["num_tokens"].toInt(), x_dtype, with_pos);
    if (with_pos) {
      const auto pos_dtype = static_cast<at::ScalarType>(ctx->saved_data["pos_dtype"].toInt());
      grad_pos = grad_pos.to(pos_dtype).view(ctx->saved_data["pos_sizes"].toIntVector());
    }
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(), at::Tensor(), with_pos ? grad_pos : at::Tensor()};
  }
};

at::Tensor gather_tokens_autograd(const at::Tensor& x, const at::Tensor& keep, const std::optional<at::Tensor>& pos) {
  return GatherTokens::apply(x, keep, pos);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("gather_tokens(Tensor x, Tensor keep, Tensor? pos_embed) -> Tensor");
  m.def(
      "gather_tokens_backward(Tensor grad_out, Tensor keep, int num_tokens, ScalarType x_dtype, bool with_pos) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("gather_tokens", &fastkd::gather_tokens_cpu);
  m.impl("gather_tokens_backward", &fastkd::gather_tokens_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) { m.impl("gather_tokens", &fastkd::gather_tokens_autograd); }
