// fastkd::ema_ — in-place exponential moving average of a list of teacher tensors towards a list
// of student tensors, optionally returning the teacher-student gap measured in the same pass.
// Computes fastkd.ops.ema_: the math is stated in fastkd/ops/ema.py's module docstring.
//
// Math in fp32 (fp64 for an fp64 teacher), rounded once to the teacher dtype, with torch.lerp_'s two
// branches (w < 0.5: t + w * (s - t); else s - (1 - w) * (s - t), so momentum 0 copies s exactly).
// The gap is accumulated in float64 and returned as a float64 tensor of shape [4] on the teacher
// device, in EMAGap's field order (diff_sq, dot, teacher_sq, student_sq), or an empty tensor.
#pragma once

#include <ATen/ATen.h>

namespace fastkd {

// Argument checks shared by every backend: TypeError / ValueError naming the index and shapes.
void check_ema_args(at::TensorList teacher, at::TensorList student, double momentum);

// The gap output for `teacher` (shape [4] or [0], float64, on the teachers' device).
at::Tensor new_gap_output(at::TensorList teacher, bool return_gap);

at::Tensor ema_cpu(at::TensorList teacher, at::TensorList student, double momentum, bool return_gap);

}  // namespace fastkd
