// fastkd::distill_loss — the argument checks of a direct torch.ops call, shared by the CPU
// (distill_loss.cpp) and CUDA (distill_loss_cuda.cu) entry points; defined in host_shared.cpp (see there
// why not inline). The per-element math is in distill_loss.cuh (CUDA) and distill_loss.cpp (CPU).
#pragma once

#include "common.h"

namespace fastkd {

// Shapes, dtypes, layout and scalars of distill_loss(student, teacher, row_scale, temperature,
// divergence, beta, ...); the device checks stay with each entry point.
void check_distill_loss_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_scale,
                             double temperature, int64_t divergence, double beta);

}  // namespace fastkd
