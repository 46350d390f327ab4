// Vectorised CPU inner loop of fastkd::ema_ over one contiguous segment of one (teacher, student)
// pair (see ema.h for the math). Teacher and student are fp32/bf16/fp16 and are computed in fp32
// with at::vec::Vectorized (the ISA chosen at build time, see cpu_isa()); fp64 tensors use the
// scalar loop. Gap sums widen each fp32 value to fp64 before multiplying, so the products and the
// difference are exact and only the fp64 additions round.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cmath>
#include <type_traits>

namespace fastkd {
namespace cpu_kernel {

using FVec = at::vec::Vectorized<float>;
using DVec = at::vec::Vectorized<double>;

// [sum (s - t)^2, sum s t, sum t^2, sum s^2]
using GapSums = std::array<double, 4>;

template <typename T>
constexpr bool kVectorisable =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Two fp32 vectors (2 * FVec::size() elements) from T.
inline void load_pair(const float* p, FVec& a, FVec& b) {
  a = FVec::loadu(p);
  b = FVec::loadu(p + FVec::size());
}
template <typename T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>, int> = 0>
inline void load_pair(const T* p, FVec& a, FVec& b) {
  at::vec::load_to_float<T>(p, a, b);
}

inline void store_pair(float* p, const FVec& a, const FVec& b) {
  a.store(p);
  b.store(p + FVec::size());
}
template <typename T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>, int> = 0>
inline void store_pair(T* p, const FVec& a, const FVec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}

// fp32 vector -> two fp64 vectors (exact).
inline void widen(const FVec& x, DVec& lo, DVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = x;
  lo = DVec(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  hi = DVec(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 v = x;
  lo = DVec(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = DVec(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#else
  static_assert(FVec::size() == 2 * DVec::size(), "unexpected vector widths");
  float buf[FVec::size()];
  x.store(buf);
  double wide[FVec::size()];
  for (int i = 0; i < FVec::size(); ++i) wide[i] = static_cast<double>(buf[i]);
  lo = DVec::loadu(wide);
  hi = DVec::loadu(wide + DVec::size());
#endif
}

struct GapVec {
  DVec diff_sq{0.0}, dot{0.0}, t_sq{0.0}, s_sq{0.0};

  inline void add(const FVec& t, const FVec& s) {
    DVec t_lo, t_hi, s_lo, s_hi;
    widen(t, t_lo, t_hi);
    widen(s, s_lo, s_hi);
    const DVec d_lo = s_lo - t_lo, d_hi = s_hi - t_hi;
    diff_sq = at::vec::fmadd(d_hi, d_hi, at::vec::fmadd(d_lo, d_lo, diff_sq));
    dot = at::vec::fmadd(s_hi, t_hi, at::vec::fmadd(s_lo, t_lo, dot));
    t_sq = at::vec::fmadd(t_hi, t_hi, at::vec::fmadd(t_lo, t_lo, t_sq));
    s_sq = at::vec::fmadd(s_hi, s_hi, at::vec::fmadd(s_lo, s_lo, s_sq));
  }

  inline void flush(GapSums& out) const {
    const DVec* parts[4] = {&diff_sq, &dot, &t_sq, &s_sq};
    for (int k = 0; k < 4; ++k) {
      double buf[DVec::size()];
      parts[k]->store(buf);
      for (int i = 0; i < DVec::size(); ++i) out[k] += buf[i];
    }
  }
};

// Scalar loop: the tail of vectorised segments and every segment with an fp64 tensor.
template <typename T, typename S, bool kGap, bool kHighWeight>
inline void ema_scalar(T* t, const S* s, int64_t n, double weight, GapSums& gap) {
  using opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const opmath w = static_cast<opmath>(weight);
  const opmath one_minus_w = static_cast<opmath>(1.0 - weight);
  for (int64_t i = 0; i < n; ++i) {
    const opmath tv = static_cast<opmath>(t[i]);
    const opmath sv = static_cast<opmath>(s[i]);
    if constexpr (kGap) {
      const double td = static_cast<double>(t[i]), sd = static_cast<double>(s[i]);
      gap[0] += (sd - td) * (sd - td);
      gap[1] += sd * td;
      gap[2] += td * td;
      gap[3] += sd * sd;
    }
    const opmath diff = sv - tv;
    t[i] = static_cast<T>(kHighWeight ? std::fma(-diff, one_minus_w, sv) : std::fma(w, diff, tv));
  }
}

template <typename T, typename S, bool kGap, bool kHighWeight>
inline void ema_segment(T* t, const S* s, int64_t n, double weight, GapSums& gap) {
  int64_t i = 0;
  if constexpr (kVectorisable<T> && kVectorisable<S>) {
    constexpr int64_t kBlock = 2 * FVec::size();
    const FVec w(static_cast<float>(weight));
    const FVec one_minus_w(static_cast<float>(1.0 - weight));
    GapVec acc;
    for (; i + kBlock <= n; i += kBlock) {
      FVec t0, t1, s0, s1;
      load_pair(t + i, t0, t1);
      load_pair(s + i, s0, s1);
      if constexpr (kGap) {
        acc.add(t0, s0);
        acc.add(t1, s1);
      }
      const FVec d0 = s0 - t0, d1 = s1 - t1;
      if constexpr (kHighWeight) {
        store_pair(t + i, at::vec::fnmadd(d0, one_minus_w, s0), at::vec::fnmadd(d1, one_minus_w, s1));
      } else {
        store_pair(t + i, at::vec::fmadd(w, d0, t0), at::vec::fmadd(w, d1, t1));
      }
    }
    if constexpr (kGap) acc.flush(gap);
  }
  ema_scalar<T, S, kGap, kHighWeight>(t + i, s + i, n - i, weight, gap);
}

}  // namespace cpu_kernel
}  // namespace fastkd
