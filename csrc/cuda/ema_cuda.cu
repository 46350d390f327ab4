// CUDA implementation of fastkd::ema_ (math in ../ema.h) in the multi-tensor-apply style: all
// tensors of one (teacher dtype, student dtype) group are updated by one launch. A device table
// lists each tensor's (teacher pointer, student pointer, numel) and each block's (tensor, first
// element) chunk; each block streams its chunk with coalesced loads, computes in fp32 (fp64 for
// fp64 teachers) and, with return_gap, reduces the fp64 gap sums to one partial per block, which
// one final sum over blocks adds up (deterministic, no atomics).
#include "../ema.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 16;  // elements per block

template <typename T, typename S, bool kGap, bool kHighWeight>
__global__ void __launch_bounds__(kThreads) ema_chunks_kernel(const int64_t* __restrict__ tensor_table,
                                                              const int64_t* __restrict__ chunk_table,
                                                              double weight, double* __restrict__ partial) {
  using opmath = at::opmath_type<T>;
  const int64_t tensor = chunk_table[2 * blockIdx.x];
  const int64_t start = chunk_table[2 * blockIdx.x + 1];
  T* t = reinterpret_cast<T*>(tensor_table[3 * tensor]);
  const S* s = reinterpret_cast<const S*>(tensor_table[3 * tensor + 1]);
  const int64_t end = min(tensor_table[3 * tensor + 2], start + kChunk);
  const opmath w = static_cast<opmath>(weight);
  const opmath one_minus_w = static_cast<opmath>(1.0 - weight);
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const T t_raw = t[i];
    const S s_raw = s[i];
    const opmath tv = static_cast<opmath>(t_raw);
    const opmath sv = static_cast<opmath>(s_raw);
    if constexpr (kGap) {
      const double td = static_cast<double>(static_cast<at::opmath_type<T>>(t_raw));
      const double sd = static_cast<double>(static_cast<at::opmath_type<S>>(s_raw));
      acc[0] += (sd - td) * (sd - td);
      acc[1] += sd * td;
      acc[2] += td * td;
      acc[3] += sd * sd;
    }
    const opmath diff = sv - tv;
    t[i] = static_cast<T>(kHighWeight ? fma(-diff, one_minus_w, sv) : fma(w, diff, tv));
  }
  if constexpr (kGap) {
    __shared__ double warp_sums[4][kThreads / 32];
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      double v = acc[k];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) warp_sums[k][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < 4) {
      double total = 0.0;
#pragma unroll
      for (int i = 0; i < kThreads / 32; ++i) total += warp_sums[threadIdx.x][i];
      partial[4 * blockIdx.x + threadIdx.x] = total;
    }
  }
}

template <typename T, typename S>
void launch_group(const int64_t* tensor_table, const int64_t* chunk_table, int64_t num_chunks, double weight,
                  double* partial, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(num_chunks));
  if (partial != nullptr) {
    weight < 0.5 ? ema_chunks_kernel<T, S, true, false><<<grid, kThreads, 0, stream>>>(tensor_table, chunk_table,
                                                                                        weight, partial)
                 : ema_chunks_kernel<T, S, true, true><<<grid, kThreads, 0, stream>>>(tensor_table, chunk_table,
                                                                                       weight, partial);
  } else {
    weight < 0.5 ? ema_chunks_kernel<T, S, false, false><<<grid, kThreads, 0, stream>>>(tensor_table, chunk_table,
                                                                                         weight, partial)
                 : ema_chunks_kernel<T, S, false, true><<<grid, kThreads, 0, stream>>>(tensor_table, chunk_table,
                                                                                        weight, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ema_cuda(at::TensorList teacher, at::TensorList student, double momentum, bool return_gap) {
  check_ema_args(teacher, student, momentum);
  at::Tensor gap = new_gap_output(teacher, return_gap);
  if (teacher.empty()) return gap;
  TORCH_CHECK_VALUE(teacher[0].is_cuda(), "ema_: CUDA kernel called with tensors on ", teacher[0].device());
  const c10::cuda::CUDAGuard guard(teacher[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  std::vector<at::Tensor> contiguous_student;
  contiguous_student.reserve(student.size());
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>> groups;
  int64_t total_chunks = 0;
  for (size_t i = 0; i < teacher.size(); ++i) {
    contiguous_student.push_back(student[i].contiguous());
    if (teacher[i].numel() == 0) continue;
    groups[{teacher[i].scalar_type(), student[i].scalar_type()}].push_back(i);
    total_chunks += (teacher[i].numel() + kChunk - 1) / kChunk;
  }
  at::Tensor partial;
  if (return_gap) partial = at::zeros({std::max<int64_t>(total_chunks, 1), 4}, gap.options());

  int64_t chunk_base = 0;
  for (const auto& [dtypes, members] : groups) {
    std::vector<int64_t> table;
    table.reserve(3 * members.size());
    std::vector<int64_t> chunks;
    for (size_t g = 0; g < members.size(); ++g) {
      const size_t i = members[g];
      table.push_back(reinterpret_cast<int64_t>(teacher[i].data_ptr()));
      table.push_back(reinterpret_cast<int64_t>(contiguous_student[i].const_data_ptr()));
      table.push_back(teacher[i].numel());
      for (int64_t start = 0; start < teacher[i].numel(); start += kChunk) {
        chunks.push_back(static_cast<int64_t>(g));
        chunks.push_back(start);
      }
    }
    const int64_t num_chunks = static_cast<int64_t>(chunks.size() / 2);
    at::Tensor host = at::empty({static_cast<int64_t>(table.size() + chunks.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(table.begin(), table.end(), host.data_ptr<int64_t>());
    std::copy(chunks.begin(), chunks.end(), host.data_ptr<int64_t>() + table.size());
    const at::Tensor device_table = host.to(teacher[0].device(), /*non_blocking=*/true);
    const int64_t* tensor_table = device_table.const_data_ptr<int64_t>();
    double* group_partial = return_gap ? partial.data_ptr<double>() + 4 * chunk_base : nullptr;
    const double weight = 1.0 - momentum;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtypes.first, "ema_cuda_teacher", [&] {
      using T = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtypes.second, "ema_cuda_student", [&] {
        launch_group<T, scalar_t>(tensor_table, tensor_table + table.size(), num_chunks, weight, group_partial,
                                  stream);
      });
    });
    chunk_base += num_chunks;
  }
  if (return_gap) gap.copy_(partial.sum(0));
  return gap;
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("ema_", &fastkd::ema_cuda); }
