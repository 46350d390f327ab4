// CPU kernels of fastkd's token_relation, without materialising the [B, H, N, N] maps.
// Computes fastkd.ops.token_relation: the math is stated in fastkd/ops/token_relation.py's module docstring.
// Statistics in float32 (float64 for float64 inputs); G = H_t / H_s, logit scales c_s, c_t. The
// backward, given the upstream per-row gradient g, computes
//   ds = g * (P_s - P_t)  |  g * P_s * (a_s - a_t - kl);  dq_s = c_s ds @ k_s, dk_s = c_s ds^T @ q_s.
//
// One parallel region per call (at::parallel_for over tiles of student heads x query rows): a tile
// holds as many of the B * H_s heads and query rows as keep its teacher logits within `tile_elements`
// values (and enough tiles to feed every thread), so small N batches many heads into one at::bmm
// instead of paying per-head op dispatch. Per tile: two at::bmm for the raw logits, then one fused,
// at::vec-vectorised pass per row pair (row max, then exp / sums / KL in a single sweep: with
// u = c_s s - max, v = c_t t - max, Z_s = sum e^u, Z_t = sum e^v,
//   teacher_to_student: kl = sum e^v (v - u) / Z_t - log Z_t + log Z_s,
//   student_to_teacher: kl = sum e^u (u - v) / Z_s - log Z_s + log Z_t).
// When G > 1 the teacher row is first replaced by log(mean_g exp(c_t t_g - lse_g)) (scale 1).
// Rows of any length stay vectorised: the last vector of a row is a masked partial one.
// Extra memory is O(threads * tile) plus the O(B * H * N) statistics. The backward recomputes each
// tile from the saved lse_s, lse_t (and per-teacher-head lse when G > 1), writes ds over the student
// logits in place and accumulates dk_s of the tile's heads in a local [heads, N, d_s] buffer.
// A problem whose logits fit one GRAIN_SIZE (library.h) runs as one tile on the calling thread.
// Registered as the CPU kernels of fastkd::token_relation and fastkd::token_relation_backward, with
// the autograd of fastkd::token_relation (any device); the CUDA (Triton) and fake kernels are
// registered from fastkd/ops/token_relation.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "library.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace fastkd {
namespace {

struct Shapes {
  int64_t B, H_s, H_t, G, N, d_s, d_t, rows_per_tile, heads_per_tile, tiles, grain;
  at::ScalarType compute;
};

Shapes shapes_of(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                 double c_s, double c_t, int64_t tile_elements) {
  TORCH_CHECK(q_s.dim() == 4 && q_t.dim() == 4, "token_relation_cpu: q_s and q_t must be [B, H, N, d], got ",
              q_s.sizes(), " and ", q_t.sizes());
  TORCH_CHECK(q_s.sizes() == k_s.sizes() && q_t.sizes() == k_t.sizes(),
              "token_relation_cpu: q and k must match per model, got ", q_s.sizes(), " ", k_s.sizes(), " ",
              q_t.sizes(), " ", k_t.sizes());
  TORCH_CHECK(q_s.size(0) == q_t.size(0) && q_s.size(2) == q_t.size(2) && q_t.size(1) % q_s.size(1) == 0,
              "token_relation_cpu: student ", q_s.sizes(), " and teacher ", q_t.sizes(), " do not fit");
  TORCH_CHECK(tile_elements > 0, "token_relation_cpu: tile_elements must be positive, got ", tile_elements);
  TORCH_CHECK(c_s > 0 && c_t > 0, "token_relation_cpu: logit scales must be positive, got ", c_s, " and ", c_t);
  Shapes s;
  s.B = q_s.size(0);
  s.H_s = q_s.size(1);
  s.H_t = q_t.size(1);
  s.G = s.H_t / s.H_s;
  s.N = q_s.size(2);
  s.d_s = q_s.size(3);
  s.d_t = q_t.size(3);
  const int64_t heads = s.B * s.H_s;
  s.rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(s.N, tile_elements / (s.N * s.G)));
  // above one grain of logits, at least ~4 tiles per thread (when there are enough heads) so the
  // threads stay balanced; below, as few tiles as the budget allows, on the calling thread
  const int64_t threads = heads * s.N * s.N * (1 + s.G) > at::internal::GRAIN_SIZE ? at::get_num_threads() : 0;
  const int64_t balanced = threads ? (heads + 4 * threads - 1) / (4 * threads) : heads;
  s.heads_per_tile =
      std::clamp<int64_t>(tile_elements / (s.rows_per_tile * s.N * s.G), 1, std::max<int64_t>(1, balanced));
  s.tiles = (heads + s.heads_per_tile - 1) / s.heads_per_tile;
  s.grain = grain_for(s.heads_per_tile * s.N * s.N * (1 + s.G));
  const bool f64 = q_s.scalar_type() == at::kDouble || q_t.scalar_type() == at::kDouble;
  s.compute = f64 ? at::kDouble : at::kFloat;
  return s;
}

// ----------------------------------------------------------------------------- vectorised row passes

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
T horizontal(const Vec<T>& v, bool take_max) {
  return take_max ? at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, v)
                  : at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// Every row pass walks whole vectors; the last one loads `count < W` lanes (zeros beyond) and masks
// their contributions with `keep`, so rows of any length stay vectorised.
template <typename T>
Vec<T> keep(const Vec<T>& x, int64_t count, T fill) {
  return count == Vec<T>::size() ? x : Vec<T>::set(Vec<T>(fill), x, count);
}

// max_j x[j]
template <typename T>
T row_max(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const T lowest = -std::numeric_limits<T>::infinity();
  Vec<T> vm(lowest);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min(W, n - j);
    vm = at::vec::maximum(vm, keep(Vec<T>::loadu(x + j, count), count, lowest));
  }
  return horizontal(vm, /*take_max=*/true);
}

// log sum_j exp(c * x[j]) (c > 0)
template <typename T>
T row_lse(const T* x, int64_t n, T c) {
  constexpr int64_t W = Vec<T>::size();
  const T m = c * row_max(x, n);
  const Vec<T> vc(c), vm(m);
  Vec<T> z(0);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min(W, n - j);
    z += keep((Vec<T>::loadu(x + j, count) * vc - vm).exp(), count, T(0));
  }
  return m + std::log(horizontal(z, /*take_max=*/false));
}

// Writes log(mean_g exp(c * t_g[j] - lse_g)) over t_0 (rows t_g = t_0 + g * stride, lse_g =
// lse[g * lse_stride]), i.e. the teacher logits of the head-mapped mixture with scale 1.
template <typename T>
void mix_teacher_heads(T* t0, int64_t stride, int64_t G, int64_t n, T c, const T* lse, int64_t lse_stride) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vc(c), inv_g(T(1) / static_cast<T>(G));
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min(W, n - j);
    Vec<T> p(0);
    for (int64_t g = 0; g < G; ++g) {
      p += (Vec<T>::loadu(t0 + g * stride + j, count) * vc - Vec<T>(lse[g * lse_stride])).exp();
    }
    (p * inv_g).log().store(t0 + j, count);
  }
}

struct RowStats {
  double kl, lse_s, lse_t;
};

// One sweep over a student row s and teacher row t (logits c_s * s, c_t * t): both lse and the KL.
template <typename T>
RowStats row_kl(const T* s, const T* t, int64_t n, T c_s, T c_t, bool teacher_to_student) {
  constexpr int64_t W = Vec<T>::size();
  const T m_s = c_s * row_max(s, n), m_t = c_t * row_max(t, n);
  const Vec<T> vcs(c_s), vct(c_t), vms(m_s), vmt(m_t);
  Vec<T> zs(0), zt(0), acc(0);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min(W, n - j);
    const Vec<T> u = Vec<T>::loadu(s + j, count) * vcs - vms, v = Vec<T>::loadu(t + j, count) * vct - vmt;
    const Vec<T> es = keep(u.exp(), count, T(0)), et = keep(v.exp(), count, T(0));
    zs += es;
    zt += et;
    acc += teacher_to_student ? et * (v - u) : es * (u - v);
  }
  const T sum_s = horizontal(zs, false), sum_t = horizontal(zt, false), a = horizontal(acc, false);
  const T log_zs = std::log(sum_s), log_zt = std::log(sum_t);
  const T kl = teacher_to_student ? a / sum_t - log_zt + log_zs : a / sum_s - log_zs + log_zt;
  return {static_cast<double>(kl), static_cast<double>(m_s + log_zs), static_cast<double>(m_t + log_zt)};
}

// Overwrites the student row s with ds = scale * (P_s - P_t) | scale * P_s * (a_s - a_t - kl).
template <typename T>
void row_grad(T* s, const T* t, int64_t n, T c_s, T c_t, T lse_s, T lse_t, T kl, T scale, bool teacher_to_student) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vcs(c_s), vct(c_t), vls(lse_s), vlt(lse_t), vkl(kl), vscale(scale);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t count = std::min(W, n - j);
    const Vec<T> a_s = Vec<T>::loadu(s + j, count) * vcs - vls, a_t = Vec<T>::loadu(t + j, count) * vct - vlt;
    const Vec<T> ds = teacher_to_student ? a_s.exp() - a_t.exp() : a_s.exp() * (a_s - a_t - vkl);
    (ds * vscale).store(s + j, count);
  }
}

// ----------------------------------------------------------------------------- tiles

// Flattened [B * H, N, d] views of the inputs.
struct Flat {
  at::Tensor qs, ks, qt, kt;
};

Flat flatten(const Shapes& sh, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
             const at::Tensor& k_t) {
  return {q_s.reshape({sh.B * sh.H_s, sh.N, sh.d_s}), k_s.reshape({sh.B * sh.H_s, sh.N, sh.d_s}),
          q_t.reshape({sh.B * sh.H_t, sh.N, sh.d_t}), k_t.reshape({sh.B * sh.H_t, sh.N, sh.d_t})};
}

// Raw logits of a tile: s [heads, rows, N] = q_s k_s^T, t [heads * G, rows, N] = q_t k_t^T.
struct TileLogits {
  at::Tensor s, t, q_rows;
};

TileLogits tile_logits(const Shapes& sh, const Flat& f, const at::Tensor& ks_t, const at::Tensor& kt_t, int64_t h0,
                       int64_t heads, int64_t r0, int64_t rows) {
  at::Tensor q_rows = f.qs.narrow(0, h0, heads).narrow(1, r0, rows).to(sh.compute);
  at::Tensor s = at::bmm(q_rows, ks_t).contiguous();
  at::Tensor t =
      at::bmm(f.qt.narrow(0, h0 * sh.G, heads * sh.G).narrow(1, r0, rows).to(sh.compute), kt_t).contiguous();
  return {s, t, q_rows};
}

// dst = a @ b, written in place when dst is a contiguous block of the compute dtype.
void bmm_into(at::Tensor dst, const at::Tensor& a, const at::Tensor& b) {
  if (dst.scalar_type() == a.scalar_type() && dst.is_contiguous()) {
    at::bmm_out(dst, a, b);
  } else {
    dst.copy_(at::bmm(a, b));
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const Shapes& sh, const Flat& f, double c_s,
                                                                        double c_t, bool teacher_to_student) {
  const auto opts = f.qs.options().dtype(sh.compute);
  at::Tensor kl = at::empty({sh.B * sh.H_s, sh.N}, opts);
  at::Tensor lse_s = at::empty({sh.B * sh.H_s, sh.N}, opts);
  at::Tensor lse_t = at::empty({sh.B * sh.H_s, sh.N}, opts);
  at::Tensor lse_heads = sh.G > 1 ? at::empty({sh.B * sh.H_t, sh.N}, opts) : at::empty({0}, opts);
  T* kl_p = kl.data_ptr<T>();
  T* lse_s_p = lse_s.data_ptr<T>();
  T* lse_t_p = lse_t.data_ptr<T>();
  T* lse_heads_p = lse_heads.data_ptr<T>();
  const T cs = static_cast<T>(c_s), ct = static_cast<T>(c_t);
  const int64_t N = sh.N, G = sh.G;

  at::parallel_for(0, sh.tiles, sh.grain, [&](int64_t begin, int64_t end) {
    std::vector<T> lse_g(G);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t h0 = tile * sh.heads_per_tile;
      const int64_t heads = std::min(sh.heads_per_tile, sh.B * sh.H_s - h0);
      const at::Tensor ks_t = f.ks.narrow(0, h0, heads).to(sh.compute).transpose(1, 2);
      const at::Tensor kt_t = f.kt.narrow(0, h0 * G, heads * G).to(sh.compute).transpose(1, 2);
      for (int64_t r0 = 0; r0 < N; r0 += sh.rows_per_tile) {
        const int64_t rows = std::min(sh.rows_per_tile, N - r0);
        TileLogits tl = tile_logits(sh, f, ks_t, kt_t, h0, heads, r0, rows);
        T* s_p = tl.s.data_ptr<T>();
        T* t_p = tl.t.data_ptr<T>();
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t row = (h0 + h) * N + r0 + i;
            T* t_row = t_p + (h * G * rows + i) * N;
            T teacher_scale = ct;
            if (G > 1) {
              for (int64_t g = 0; g < G; ++g) {
                lse_g[g] = row_lse(t_row + g * rows * N, N, ct);
                lse_heads_p[((h0 + h) * G + g) * N + r0 + i] = lse_g[g];
              }
              mix_teacher_heads(t_row, rows * N, G, N, ct, lse_g.data(), 1);
              teacher_scale = T(1);
            }
            const RowStats st = row_kl(s_p + (h * rows + i) * N, t_row, N, cs, teacher_scale, teacher_to_student);
            kl_p[row] = static_cast<T>(st.kl);
            lse_s_p[row] = static_cast<T>(st.lse_s);
            lse_t_p[row] = static_cast<T>(st.lse_t);
          }
        }
      }
    }
  });
  const auto stats_shape = std::vector<int64_t>{sh.B, sh.H_s, sh.N};
  return {kl.view(stats_shape), lse_s.view(stats_shape), lse_t.view(stats_shape),
          sh.G > 1 ? lse_heads.view({sh.B, sh.H_t, sh.N}) : lse_heads};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const Shapes& sh, const Flat& f, const at::Tensor& grad_kl,
                                                 const at::Tensor& kl, const at::Tensor& lse_s,
                                                 const at::Tensor& lse_t, const at::Tensor& lse_heads, double c_s,
                                                 double c_t, bool teacher_to_student) {
  const auto stats = [&](const at::Tensor& x, int64_t heads) {
    return x.reshape({heads, sh.N}).to(sh.compute).contiguous();
  };
  const at::Tensor grad_rows = stats(grad_kl, sh.B * sh.H_s), kl_rows = stats(kl, sh.B * sh.H_s);
  const at::Tensor lse_s_rows = stats(lse_s, sh.B * sh.H_s), lse_t_rows = stats(lse_t, sh.B * sh.H_s);
  const at::Tensor lse_heads_rows = sh.G > 1 ? stats(lse_heads, sh.B * sh.H_t) : at::Tensor();
  const T* grad_p = grad_rows.data_ptr<T>();
  const T* kl_p = kl_rows.data_ptr<T>();
  const T* lse_s_p = lse_s_rows.data_ptr<T>();
  const T* lse_t_p = lse_t_rows.data_ptr<T>();
  const T* lse_heads_p = sh.G > 1 ? lse_heads_rows.data_ptr<T>() : nullptr;
  at::Tensor dq = at::empty({sh.B * sh.H_s, sh.N, sh.d_s}, f.qs.options());
  at::Tensor dk = at::empty({sh.B * sh.H_s, sh.N, sh.d_s}, f.ks.options());
  const T cs = static_cast<T>(c_s), ct = static_cast<T>(c_t);
  const int64_t N = sh.N, G = sh.G;

  at::parallel_for(0, sh.tiles, sh.grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t h0 = tile * sh.heads_per_tile;
      const int64_t heads = std::min(sh.heads_per_tile, sh.B * sh.H_s - h0);
      const at::Tensor ks_h = f.ks.narrow(0, h0, heads).to(sh.compute);
      const at::Tensor kt_t = f.kt.narrow(0, h0 * G, heads * G).to(sh.compute).transpose(1, 2);
      const bool one_block = sh.rows_per_tile >= N;
      at::Tensor dk_tile = one_block ? at::Tensor() : at::zeros({heads, N, sh.d_s}, ks_h.options());
      for (int64_t r0 = 0; r0 < N; r0 += sh.rows_per_tile) {
        const int64_t rows = std::min(sh.rows_per_tile, N - r0);
        TileLogits tl = tile_logits(sh, f, ks_h.transpose(1, 2), kt_t, h0, heads, r0, rows);
        T* s_p = tl.s.data_ptr<T>();
        T* t_p = tl.t.data_ptr<T>();
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t row = (h0 + h) * N + r0 + i;
            T* t_row = t_p + (h * G * rows + i) * N;
            T teacher_scale = ct;
            if (G > 1) {
              mix_teacher_heads(t_row, rows * N, G, N, ct, lse_heads_p + ((h0 + h) * G) * N + r0 + i, N);
              teacher_scale = T(1);
            }
            // c_s * g folds the logit scale of dq and dk into ds
            row_grad(s_p + (h * rows + i) * N, t_row, N, cs, teacher_scale, lse_s_p[row], lse_t_p[row], kl_p[row],
                     cs * grad_p[row], teacher_to_student);
          }
        }
        bmm_into(dq.narrow(0, h0, heads).narrow(1, r0, rows), tl.s, ks_h);
        if (one_block) {
          bmm_into(dk.narrow(0, h0, heads), tl.s.transpose(1, 2), tl.q_rows);
        } else {
          dk_tile.baddbmm_(tl.s.transpose(1, 2), tl.q_rows);
        }
      }
      if (!one_block) dk.narrow(0, h0, heads).copy_(dk_tile);
    }
  });
  return {dq.view({sh.B, sh.H_s, sh.N, sh.d_s}), dk.view({sh.B, sh.H_s, sh.N, sh.d_s})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_relation_cpu(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t, double c_s,
    double c_t, bool teacher_to_student, int64_t tile_elements) {
  check_cpu_isa("token_relation_cpu");
  // the op decides its own dtypes: ATen calls inside (bmm) must not see autocast
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // the kernel's internal ATen calls (bmm_out, in-place tiles) are never differentiated
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Shapes sh = shapes_of(q_s, k_s, q_t, k_t, c_s, c_t, tile_elements);
  const Flat f = flatten(sh, q_s, k_s, q_t, k_t);
  return sh.compute == at::kDouble ? forward_impl<double>(sh, f, c_s, c_t, teacher_to_student)
                                   : forward_impl<float>(sh, f, c_s, c_t, teacher_to_student);
}

std::tuple<at::Tensor, at::Tensor> token_relation_backward_cpu(
    const at::Tensor& grad_kl, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
    const at::Tensor& k_t, const at::Tensor& kl, const at::Tensor& lse_s, const at::Tensor& lse_t,
    const at::Tensor& lse_heads, double c_s, double c_t, bool teacher_to_student, int64_t tile_elements) {
  check_cpu_isa("token_relation_backward_cpu");
  // the op decides its own dtypes: ATen calls inside (bmm) must not see autocast
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Shapes sh = shapes_of(q_s, k_s, q_t, k_t, c_s, c_t, tile_elements);
  const Flat f = flatten(sh, q_s, k_s, q_t, k_t);
  return sh.compute == at::kDouble
             ? backward_impl<double>(sh, f, grad_kl, kl, lse_s, lse_t, lse_heads, c_s, c_t, teacher_to_student)
             : backward_impl<float>(sh, f, grad_kl, kl, lse_s, lse_t, lse_heads, c_s, c_t, teacher_to_student);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class TokenRelation : public torch::autograd::Function<TokenRelation> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q_s, const at::Tensor& k_s,
                               const at::Tensor& q_t, const at::Tensor& k_t, double c_s, double c_t,
                               bool teacher_to_student, int64_t tile_elements) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastkd::token_relation", "")
                               .typed<decltype(token_relation_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [kl, lse_s, lse_t, lse_heads] = op.call(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, tile_elements);
    ctx->save_for_backward({q_s, k_s, q_t, k_t, kl, lse_s, lse_t, lse_heads});
    ctx->mark_non_differentiable({lse_s, lse_t, lse_heads});
    ctx->saved_data["c_s"] = c_s;
    ctx->saved_data["c_t"] = c_t;
    ctx->saved_data["teacher_to_student"] = teacher_to_student;
    ctx->saved_data["tile_elements"] = tile_elements;
    return {kl, lse_s, lse_t, lse_heads};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastkd::token_relation_backward", "")
                               .typed<decltype(token_relation_backward_cpu)>();
    const variable_list saved = ctx->get_saved_variables();
    auto [dq, dk] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7],
                            ctx->saved_data["c_s"].toDouble(), ctx->saved_data["c_t"].toDouble(),
                            ctx->saved_data["teacher_to_student"].toBool(), ctx->saved_data["tile_elements"].toInt());
    return {dq, dk, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_relation_autograd(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t, double c_s,
    double c_t, bool teacher_to_student, int64_t tile_elements) {
  auto out = TokenRelation::apply(q_s, k_s, q_t, k_t, c_s, c_t, teacher_to_student, tile_elements);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  // tile_elements: the CPU kernels' tile budget (teacher logits per tile); the CUDA kernels ignore it
  m.def(
      "token_relation(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, float c_s, float c_t, "
      "bool teacher_to_student, int tile_elements=131072) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_relation_backward(Tensor grad_kl, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor kl, "
      "Tensor lse_s, Tensor lse_t, Tensor lse_heads, float c_s, float c_t, bool teacher_to_student, "
      "int tile_elements=131072) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("token_relation", &fastkd::token_relation_cpu);
  m.impl("token_relation_backward", &fastkd::token_relation_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) { m.impl("token_relation", &fastkd::token_relation_autograd); }
