// CPU kernels of fastkd's token_relation: per-row KL between teacher and student attention maps,
// without materialising the [B, H, N, N] maps.
//
// For q_s, k_s [B, H_s, N, d_s], q_t, k_t [B, H_t, N, d_t], G = H_t / H_s, logit scales c_s, c_t,
// this equals the plain PyTorch (float32; float64 for float64 inputs):
//   a_s = log_softmax(c_s * q_s @ k_s^T, -1)
//   a_t = log_softmax(c_t * q_t @ k_t^T, -1)                                    (G == 1)
//   a_t[:, h] = log(mean_g softmax(c_t * q_t[:, h*G+g] @ k_t[:, h*G+g]^T, -1))  (G > 1)
//   kl = sum_j exp(a_t) (a_t - a_s)  (teacher_to_student)  |  sum_j exp(a_s) (a_s - a_t)
// and its gradient for q_s, k_s given the upstream per-row gradient g:
//   ds = g * (P_s - P_t)  |  g * P_s * (a_s - a_t - kl);  dq_s = c_s ds @ k_s, dk_s = c_s ds^T @ q_s.
//
// One parallel region per call (at::parallel_for over the B * H_s student heads): each task walks
// its head in blocks of query rows whose teacher logits hold at most `tile_elements` values, with
// serial ATen ops (matmul, vectorised exp / logsumexp) on tiles that stay in cache. Extra memory is
// O(threads * tile) plus the O(B * H * N) statistics. The backward recomputes each tile from the saved
// lse_s, lse_t (and per-teacher-head lse when G > 1) and accumulates dk_s of the head in a local
// [N, d_s] buffer. Registered as fastkd::token_relation_cpu and fastkd::token_relation_backward_cpu.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace fastkd {
namespace {

struct Shapes {
  int64_t B, H_s, H_t, G, N, d_s, d_t, rows_per_tile;
  at::ScalarType compute;
};

Shapes shapes_of(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                 int64_t tile_elements) {
  TORCH_CHECK(q_s.dim() == 4 && q_t.dim() == 4, "token_relation_cpu: q_s and q_t must be [B, H, N, d], got ",
              q_s.sizes(), " and ", q_t.sizes());
  TORCH_CHECK(q_s.sizes() == k_s.sizes() && q_t.sizes() == k_t.sizes(),
              "token_relation_cpu: q and k must match per model, got ", q_s.sizes(), " ", k_s.sizes(), " ",
              q_t.sizes(), " ", k_t.sizes());
  TORCH_CHECK(q_s.size(0) == q_t.size(0) && q_s.size(2) == q_t.size(2) && q_t.size(1) % q_s.size(1) == 0,
              "token_relation_cpu: student ", q_s.sizes(), " and teacher ", q_t.sizes(), " do not fit");
  TORCH_CHECK(tile_elements > 0, "token_relation_cpu: tile_elements must be positive, got ", tile_elements);
  Shapes s;
  s.B = q_s.size(0);
  s.H_s = q_s.size(1);
  s.H_t = q_t.size(1);
  s.G = s.H_t / s.H_s;
  s.N = q_s.size(2);
  s.d_s = q_s.size(3);
  s.d_t = q_t.size(3);
  s.rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(s.N, tile_elements / (s.N * s.G)));
  const bool f64 = q_s.scalar_type() == at::kDouble || q_t.scalar_type() == at::kDouble;
  s.compute = f64 ? at::kDouble : at::kFloat;
  return s;
}

// Teacher log-probability tile of student head bh, rows [r0, r0 + rows), before subtracting lse_t:
// logits [rows, N] when G == 1, else log(mean_g P_g) from the per-head lse `lse_heads_rows` [G, rows]
// (computed and written into it when `compute_lse_heads`).
at::Tensor teacher_tile(const at::Tensor& qt_head, const at::Tensor& kt_head_t, double c_t, int64_t G,
                        at::Tensor lse_heads_rows, bool compute_lse_heads) {
  at::Tensor t = at::bmm(qt_head, kt_head_t).mul_(c_t);  // [G, rows, N]
  if (G == 1) return t.select(0, 0);
  if (compute_lse_heads) lse_heads_rows.copy_(at::logsumexp(t, {-1}));
  t.sub_(lse_heads_rows.unsqueeze(-1));
  return at::logsumexp(t, {0}).sub_(std::log(static_cast<double>(G)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_relation_cpu(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t, double c_s,
    double c_t, bool teacher_to_student, int64_t tile_elements) {
  const Shapes sh = shapes_of(q_s, k_s, q_t, k_t, tile_elements);
  const auto opts = q_s.options().dtype(sh.compute);
  const at::Tensor qs = q_s.reshape({sh.B * sh.H_s, sh.N, sh.d_s});
  const at::Tensor ks = k_s.reshape({sh.B * sh.H_s, sh.N, sh.d_s});
  const at::Tensor qt = q_t.reshape({sh.B * sh.H_t, sh.N, sh.d_t});
  const at::Tensor kt = k_t.reshape({sh.B * sh.H_t, sh.N, sh.d_t});
  at::Tensor kl = at::empty({sh.B * sh.H_s, sh.N}, opts);
  at::Tensor lse_s = at::empty({sh.B * sh.H_s, sh.N}, opts);
  at::Tensor lse_t = at::empty({sh.B * sh.H_s, sh.N}, opts);
  at::Tensor lse_heads = sh.G > 1 ? at::empty({sh.B * sh.H_t, sh.N}, opts) : at::empty({0}, opts);

  at::parallel_for(0, sh.B * sh.H_s, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const at::Tensor ks_t = ks[bh].to(sh.compute).t();
      const at::Tensor kt_t = kt.narrow(0, bh * sh.G, sh.G).to(sh.compute).transpose(1, 2);
      for (int64_t r0 = 0; r0 < sh.N; r0 += sh.rows_per_tile) {
        const int64_t rows = std::min(sh.rows_per_tile, sh.N - r0);
        at::Tensor a_s = at::mm(qs[bh].narrow(0, r0, rows).to(sh.compute), ks_t).mul_(c_s);
        at::Tensor lse_heads_rows =
            sh.G > 1 ? lse_heads.narrow(0, bh * sh.G, sh.G).narrow(1, r0, rows) : at::Tensor();
        at::Tensor a_t = teacher_tile(qt.narrow(0, bh * sh.G, sh.G).narrow(1, r0, rows).to(sh.compute), kt_t, c_t,
                                      sh.G, lse_heads_rows, /*compute_lse_heads=*/true);
        const at::Tensor row_lse_s = at::logsumexp(a_s, {-1});
        const at::Tensor row_lse_t = at::logsumexp(a_t, {-1});
        lse_s[bh].narrow(0, r0, rows).copy_(row_lse_s);
        lse_t[bh].narrow(0, r0, rows).copy_(row_lse_t);
        a_s.sub_(row_lse_s.unsqueeze(-1));
        a_t.sub_(row_lse_t.unsqueeze(-1));
        at::Tensor diff = a_t - a_s;  // weighted by P_t, or by -P_s for student_to_teacher
        at::Tensor weights = teacher_to_student ? a_t.exp_() : a_s.exp_().neg_();
        kl[bh].narrow(0, r0, rows).copy_(diff.mul_(weights).sum(-1));
      }
    }
  });
  const auto stats_shape = std::vector<int64_t>{sh.B, sh.H_s, sh.N};
  return {kl.view(stats_shape), lse_s.view(stats_shape), lse_t.view(stats_shape),
          sh.G > 1 ? lse_heads.view({sh.B, sh.H_t, sh.N}) : lse_heads};
}

std::tuple<at::Tensor, at::Tensor> token_relation_backward_cpu(
    const at::Tensor& grad_kl, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
    const at::Tensor& k_t, const at::Tensor& kl, const at::Tensor& lse_s, const at::Tensor& lse_t,
    const at::Tensor& lse_heads, double c_s, double c_t, bool teacher_to_student, int64_t tile_elements) {
  const Shapes sh = shapes_of(q_s, k_s, q_t, k_t, tile_elements);
  const at::Tensor qs = q_s.reshape({sh.B * sh.H_s, sh.N, sh.d_s});
  const at::Tensor ks = k_s.reshape({sh.B * sh.H_s, sh.N, sh.d_s});
  const at::Tensor qt = q_t.reshape({sh.B * sh.H_t, sh.N, sh.d_t});
  const at::Tensor kt = k_t.reshape({sh.B * sh.H_t, sh.N, sh.d_t});
  const auto stats = [&](const at::Tensor& x) { return x.reshape({sh.B * sh.H_s, sh.N}).to(sh.compute); };
  // c_s * g folds the logit scale of dq and dk into ds.
  const at::Tensor row_scale = stats(grad_kl).mul(c_s);
  const at::Tensor kl_rows = stats(kl), lse_s_rows = stats(lse_s), lse_t_rows = stats(lse_t);
  const at::Tensor lse_heads_all = sh.G > 1 ? lse_heads.reshape({sh.B * sh.H_t, sh.N}) : at::Tensor();
  at::Tensor dq = at::empty({sh.B * sh.H_s, sh.N, sh.d_s}, q_s.options());
  at::Tensor dk = at::empty({sh.B * sh.H_s, sh.N, sh.d_s}, k_s.options());

  at::parallel_for(0, sh.B * sh.H_s, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const at::Tensor ks_h = ks[bh].to(sh.compute);
      const at::Tensor kt_t = kt.narrow(0, bh * sh.G, sh.G).to(sh.compute).transpose(1, 2);
      at::Tensor dk_h = at::zeros({sh.N, sh.d_s}, ks_h.options());
      for (int64_t r0 = 0; r0 < sh.N; r0 += sh.rows_per_tile) {
        const int64_t rows = std::min(sh.rows_per_tile, sh.N - r0);
        const at::Tensor q_rows = qs[bh].narrow(0, r0, rows).to(sh.compute);
        at::Tensor a_s = at::mm(q_rows, ks_h.t()).mul_(c_s).sub_(lse_s_rows[bh].narrow(0, r0, rows).unsqueeze(-1));
        at::Tensor lse_heads_rows =
            sh.G > 1 ? lse_heads_all.narrow(0, bh * sh.G, sh.G).narrow(1, r0, rows).to(sh.compute) : at::Tensor();
        at::Tensor a_t = teacher_tile(qt.narrow(0, bh * sh.G, sh.G).narrow(1, r0, rows).to(sh.compute), kt_t, c_t,
                                      sh.G, lse_heads_rows, /*compute_lse_heads=*/false)
                             .sub_(lse_t_rows[bh].narrow(0, r0, rows).unsqueeze(-1));
        at::Tensor ds;
        if (teacher_to_student) {
          ds = a_s.exp_().sub_(a_t.exp_());
        } else {
          ds = (a_s - a_t).sub_(kl_rows[bh].narrow(0, r0, rows).unsqueeze(-1));
          ds.mul_(a_s.exp_());
        }
        ds.mul_(row_scale[bh].narrow(0, r0, rows).unsqueeze(-1));
        dq[bh].narrow(0, r0, rows).copy_(at::mm(ds, ks_h));
        dk_h.addmm_(ds.t(), q_rows);
      }
      dk[bh].copy_(dk_h);
    }
  });
  return {dq.view({sh.B, sh.H_s, sh.N, sh.d_s}), dk.view({sh.B, sh.H_s, sh.N, sh.d_s})};
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "token_relation_cpu(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, float c_s, float c_t, "
      "bool teacher_to_student, int tile_elements) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_relation_backward_cpu(Tensor grad_kl, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor kl, "
      "Tensor lse_s, Tensor lse_t, Tensor lse_heads, float c_s, float c_t, bool teacher_to_student, "
      "int tile_elements) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("token_relation_cpu", &fastkd::token_relation_cpu);
  m.impl("token_relation_backward_cpu", &fastkd::token_relation_backward_cpu);
}
