// fastkd::hidden_match — the argument checks shared by the CPU (hidden_match.cpp) and CUDA
// (hidden_match_cuda.cu) entry points, defined in host_shared.cpp (see there why not inline); the
// per-row math is in hidden_match_math.h.
#pragma once

#include "common.h"
#include "hidden_match_math.h"

#include <c10/util/Optional.h>

#include <cmath>

namespace fastkd {

// Argument checks shared by the CPU and CUDA entry points (the Python layer validates user input
// first; these guard direct calls through torch.ops.fastkd.hidden_match).
void check_hidden_match_args(const at::Tensor& student, const at::Tensor& teacher,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& row_scale, int64_t loss, double eps);

}  // namespace fastkd
