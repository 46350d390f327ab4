// fastkd::ema_ — in-place exponential moving average of a list of teacher tensors towards a list
// of student tensors, optionally returning the teacher-student gap measured in the same pass.
//
// For every pair (t, s), with w = 1 - momentum, computed in fp32 (fp64 for an fp64 teacher) and
// rounded once to the teacher dtype, i.e. the same formula as torch.lerp_(t, s, w):
//   t <- t + w * (s - t)          if w <  0.5
//   t <- s - (1 - w) * (s - t)    if w >= 0.5   (so momentum 0 copies s exactly)
// With return_gap, before the update, accumulated in float64 over all elements of all pairs:
//   gap = [sum (s - t)^2, sum s * t, sum t^2, sum s^2]
// The op returns gap (float64, shape [4], on the teacher device) or an empty tensor.
#pragma once

#include <ATen/ATen.h>

namespace fastkd {

// Argument checks shared by every backend: TypeError / ValueError naming the index and shapes.
void check_ema_args(at::TensorList teacher, at::TensorList student, double momentum);

// The gap output for `teacher` (shape [4] or [0], float64, on the teachers' device).
at::Tensor new_gap_output(at::TensorList teacher, bool return_gap);

at::Tensor ema_cpu(at::TensorList teacher, at::TensorList student, double momentum, bool return_gap);

}  // namespace fastkd
