// Registration of fastkd::ema_ (schema, CPU and Meta kernels) and the CPU implementation:
// one at::parallel_for over the concatenated elements of all pairs, each thread streaming its
// contiguous range through the vectorised segment kernel of ema_cpu_kernel.h. Math: ema.h.
#include "ema.h"

#include "ema_cpu_kernel.h"
#include "library.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastkd {
namespace {

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Elements per parallel task: large enough to amortise the task, small enough to split ViT-S.
constexpr int64_t kGrainSize = 1 << 15;

struct alignas(64) ThreadGap {
  cpu_kernel::GapSums sums{0.0, 0.0, 0.0, 0.0};
};

template <bool kGap, bool kHighWeight>
void ema_pair_range(const at::Tensor& t, const at::Tensor& s, int64_t begin, int64_t n, double weight,
                    cpu_kernel::GapSums& gap) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "ema_teacher", [&] {
    using T = scalar_t;
    T* t_ptr = t.data_ptr<T>() + begin;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "ema_student", [&] {
      cpu_kernel::ema_segment<T, scalar_t, kGap, kHighWeight>(t_ptr, s.const_data_ptr<scalar_t>() + begin, n,
                                                               weight, gap);
    });
  });
}

template <bool kGap, bool kHighWeight>
void ema_all(at::TensorList teacher, const std::vector<c10::MaybeOwned<at::Tensor>>& student,
             const std::vector<int64_t>& offsets, double weight, std::vector<ThreadGap>& partial) {
  at::parallel_for(0, offsets.back(), kGrainSize, [&](int64_t begin, int64_t end) {
    cpu_kernel::GapSums gap{0.0, 0.0, 0.0, 0.0};
    // last pair whose first element is <= begin (skips empty tensors)
    size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[i + 1]);
      if (stop > begin) {
        ema_pair_range<kGap, kHighWeight>(teacher[i], *student[i], begin - offsets[i], stop - begin, weight, gap);
      }
      begin = stop;
      ++i;
    }
    if constexpr (kGap) {
      auto& mine = partial[at::get_thread_num()].sums;
      for (int k = 0; k < 4; ++k) mine[k] += gap[k];
    }
  });
}

}  // namespace

void check_ema_args(at::TensorList teacher, at::TensorList student, double momentum) {
  TORCH_CHECK_VALUE(teacher.size() == student.size(), "ema_: teacher and student lists differ in length: ",
                    teacher.size(), " teacher tensors vs ", student.size(), " student tensors");
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "ema_: momentum must be in [0, 1], got ", momentum);
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "ema_: teacher[", i,
                     "] must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
    TORCH_CHECK_TYPE(is_supported_float(s.scalar_type()), "ema_: student[", i,
                     "] must be float32, float64, bfloat16 or float16, got ", s.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == s.sizes(), "ema_: shape mismatch at index ", i, ": teacher ", t.sizes(),
                      " vs student ", s.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), "ema_: teacher[", i, "] must be contiguous, got shape ", t.sizes(),
                      " with strides ", t.strides());
    TORCH_CHECK_VALUE(t.device() == teacher[0].device() && s.device() == teacher[0].device(),
                      "ema_: all tensors must be on one device; teacher[0] is on ", teacher[0].device(),
                      " but at index ", i, " teacher is on ", t.device(), " and student on ", s.device());
  }
}

at::Tensor new_gap_output(at::TensorList teacher, bool return_gap) {
  const auto options = teacher.empty() ? at::TensorOptions() : teacher[0].options();
  return at::zeros({return_gap ? 4 : 0}, options.dtype(at::kDouble));
}

at::Tensor ema_cpu(at::TensorList teacher, at::TensorList student, double momentum, bool return_gap) {
  check_ema_args(teacher, student, momentum);
  check_cpu_isa("ema_");
  at::Tensor gap = new_gap_output(teacher, return_gap);
  if (teacher.empty()) return gap;
  TORCH_CHECK_VALUE(teacher[0].device().is_cpu(), "ema_: CPU kernel called with tensors on ", teacher[0].device());

  std::vector<c10::MaybeOwned<at::Tensor>> contiguous_student;
  std::vector<int64_t> offsets{0};
  contiguous_student.reserve(student.size());
  offsets.reserve(teacher.size() + 1);
  for (size_t i = 0; i < teacher.size(); ++i) {
    contiguous_student.push_back(student[i].expect_contiguous());
    offsets.push_back(offsets.back() + teacher[i].numel());
  }
  const double weight = 1.0 - momentum;
  std::vector<ThreadGap> partial(return_gap ? at::get_num_threads() : 0);
  if (return_gap) {
    weight < 0.5 ? ema_all<true, false>(teacher, contiguous_student, offsets, weight, partial)
                 : ema_all<true, true>(teacher, contiguous_student, offsets, weight, partial);
    double* out = gap.data_ptr<double>();
    for (const auto& p : partial)
      for (int k = 0; k < 4; ++k) out[k] += p.sums[k];
  } else {
    weight < 0.5 ? ema_all<false, false>(teacher, contiguous_student, offsets, weight, partial)
                 : ema_all<false, true>(teacher, contiguous_student, offsets, weight, partial);
  }
  return gap;
}

namespace {

at::Tensor ema_meta(at::TensorList teacher, at::TensorList student, double momentum, bool return_gap) {
  check_ema_args(teacher, student, momentum);
  return new_gap_output(teacher, return_gap);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("ema_(Tensor(a!)[] teacher, Tensor[] student, float momentum, bool return_gap=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("ema_", &fastkd::ema_cpu); }

TORCH_LIBRARY_IMPL(fastkd, Meta, m) { m.impl("ema_", &fastkd::ema_meta); }
