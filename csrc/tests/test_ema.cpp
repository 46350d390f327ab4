// C++ tests of fastkd::ema_ (run by ctest): the op called through the dispatcher against
// at::lerp and fp64 gap sums, mixed dtypes and sizes, and argument errors that modify nothing.
#include "ema.h"
#include "library.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAILED: " << what << "\n";
  }
}

at::Tensor call_ema(std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student, double momentum,
                    bool return_gap) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastkd::ema_", "")
                             .typed<at::Tensor(at::TensorList, at::TensorList, double, bool)>();
  return op.call(teacher, student, momentum, return_gap);
}

void test_matches_lerp_and_gap() {
  const std::vector<int64_t> sizes{0, 1, 3, 1023, 100003};
  const std::vector<at::ScalarType> student_dtypes{at::kFloat, at::kBFloat16, at::kHalf};
  std::vector<at::Tensor> teacher, student, expected;
  double gap_ref[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < sizes.size() * student_dtypes.size(); ++i) {
    at::Tensor t = at::randn({sizes[i % sizes.size()]});
    at::Tensor s = at::randn({sizes[i % sizes.size()]}).to(student_dtypes[i / sizes.size()]);
    const at::Tensor t64 = t.to(at::kDouble), s64 = s.to(at::kDouble);
    gap_ref[0] += (s64 - t64).square().sum().item<double>();
    gap_ref[1] += (s64 * t64).sum().item<double>();
    gap_ref[2] += t64.square().sum().item<double>();
    gap_ref[3] += s64.square().sum().item<double>();
    expected.push_back(at::lerp(t, s.to(at::kFloat), 1.0 - 0.996));
    teacher.push_back(t);
    student.push_back(s);
  }
  const at::Tensor gap = call_ema(teacher, student, 0.996, true);
  for (size_t i = 0; i < teacher.size(); ++i) {
    expect(at::allclose(teacher[i], expected[i], 1e-6, 1e-6), "teacher " + std::to_string(i) + " matches lerp");
  }
  expect(gap.sizes() == at::IntArrayRef{4} && gap.scalar_type() == at::kDouble, "gap is float64 [4]");
  for (int k = 0; k < 4; ++k) {
    const double got = gap[k].item<double>();
    expect(std::abs(got - gap_ref[k]) <= 1e-9 * std::abs(gap_ref[k]), "gap[" + std::to_string(k) + "]");
  }
}

void test_momentum_zero_copies() {
  std::vector<at::Tensor> teacher{at::randn({777})};
  const std::vector<at::Tensor> student{at::randn({777})};
  const at::Tensor gap = call_ema(teacher, student, 0.0, false);
  expect(gap.numel() == 0, "no gap requested -> empty output");
  expect(at::equal(teacher[0], student[0]), "momentum 0 copies the student");
}

template <typename Error>
void expect_error(const std::function<void()>& fn, const std::string& needle, const std::string& what) {
  try {
    fn();
  } catch (const Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos, what + ": message has '" + needle + "'");
    return;
  } catch (const std::exception& e) {
    expect(false, what + ": wrong exception type: " + e.what());
    return;
  }
  expect(false, what + ": no exception");
}

void test_bad_arguments_modify_nothing() {
  std::vector<at::Tensor> teacher{at::randn({4}), at::randn({3})};
  const std::vector<at::Tensor> before{teacher[0].clone(), teacher[1].clone()};
  expect_error<c10::ValueError>([&] { call_ema(teacher, {at::randn({4}), at::randn({4})}, 0.5, true); },
                                "shape mismatch at index 1", "shape mismatch");
  expect_error<c10::ValueError>([&] { call_ema(teacher, {at::randn({4})}, 0.5, true); }, "differ in length",
                                "length mismatch");
  expect_error<c10::ValueError>([&] { call_ema(teacher, {at::randn({4}), at::randn({3})}, 1.5, false); },
                                "momentum must be in [0, 1]", "momentum range");
  std::vector<at::Tensor> int_teacher{at::zeros({2}, at::kLong)};
  expect_error<c10::TypeError>([&] { call_ema(int_teacher, {at::randn({2})}, 0.5, false); }, "teacher[0] must be",
                               "integer teacher");
  std::vector<at::Tensor> strided_teacher{at::randn({4, 3}).t()};
  expect_error<c10::ValueError>([&] { call_ema(strided_teacher, {at::randn({3, 4})}, 0.5, false); },
                                "must be contiguous", "non-contiguous teacher");
  expect(at::equal(teacher[0], before[0]) && at::equal(teacher[1], before[1]), "teachers unchanged after errors");
}

}  // namespace

int main() {
  std::cout << "fastkd ema_ C++ tests, CPU ISA " << fastkd::cpu_isa() << "\n";
  test_matches_lerp_and_gap();
  test_momentum_zero_copies();
  test_bad_arguments_modify_nothing();
  if (failures != 0) {
    std::cerr << failures << " check(s) failed\n";
    return EXIT_FAILURE;
  }
  std::cout << "all checks passed\n";
  return EXIT_SUCCESS;
}
