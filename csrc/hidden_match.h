// fastkd::hidden_match — the argument checks shared by the CPU (hidden_match.cpp) and CUDA
// (hidden_match_cuda.cu) entry points; the per-row math is in hidden_match_math.h.
#pragma once

#include "common.h"
#include "hidden_match_math.h"

#include <c10/util/Optional.h>

#include <cmath>

namespace fastkd {

// Argument checks shared by the CPU and CUDA entry points (the Python layer validates user input
// first; these guard direct calls through torch.ops.fastkd.hidden_match).
inline void check_hidden_match_args(const at::Tensor& student, const at::Tensor& teacher,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& row_scale, int64_t loss, double eps) {
  FASTKD_CHECK_DIM(student, 3);
  FASTKD_CHECK_DIM(teacher, 3);
  FASTKD_CHECK_CONTIGUOUS(student);
  FASTKD_CHECK_CONTIGUOUS(teacher);
  FASTKD_CHECK_FLOATING(student);
  FASTKD_CHECK(student.scalar_type() == teacher.scalar_type(), "student and teacher must share a dtype, got ",
               student.scalar_type(), " and ", teacher.scalar_type());
  FASTKD_CHECK_DEVICE(teacher, student.device());
  FASTKD_CHECK(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
               "student [L, N, Hs] and teacher [L, N, Ht] must agree on L and N, got ", student.sizes(), " and ",
               teacher.sizes());
  const int64_t L = student.size(0), N = student.size(1), Hs = student.size(2), Ht = teacher.size(2);
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w) {
    const auto& W = *weight;
    FASTKD_CHECK_CONTIGUOUS(W);
    FASTKD_CHECK_DEVICE(W, student.device());
    FASTKD_CHECK(W.scalar_type() == student.scalar_type(), "weight must have the student's dtype ",
                 student.scalar_type(), ", got ", W.scalar_type());
    FASTKD_CHECK((W.dim() == 3 && W.size(0) == L && W.size(1) == Ht && W.size(2) == Hs) ||
                     (W.dim() == 2 && W.size(0) == Ht && W.size(1) == Hs),
                 "weight must be [L, Ht, Hs] = [", L, ", ", Ht, ", ", Hs, "] or [Ht, Hs], got ", W.sizes());
  } else {
    FASTKD_CHECK(Hs == Ht, "without a weight the student and teacher widths must match, got ", Hs, " and ", Ht);
  }
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    FASTKD_CHECK_CONTIGUOUS(b);
    FASTKD_CHECK_DEVICE(b, student.device());
    FASTKD_CHECK(b.scalar_type() == student.scalar_type(), "bias must have the student's dtype ",
                 student.scalar_type(), ", got ", b.scalar_type());
    FASTKD_CHECK((b.dim() == 2 && b.size(0) == L && b.size(1) == Ht) || (b.dim() == 1 && b.size(0) == Ht),
                 "bias must be [L, Ht] or [Ht] with Ht = ", Ht, ", got ", b.sizes());
  }
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  FASTKD_CHECK(row_scale.scalar_type() == acc && row_scale.dim() == 2 && row_scale.size(0) == L &&
                   row_scale.size(1) == N && row_scale.is_contiguous(),
               "row_scale must be a contiguous [L, N] = [", L, ", ", N, "] tensor of dtype ", acc, ", got ",
               row_scale.scalar_type(), " ", row_scale.sizes());
  FASTKD_CHECK_DEVICE(row_scale, student.device());
  FASTKD_CHECK(loss >= HM_MSE && loss <= HM_NMSE, "loss code must be 0 (mse), 1 (cosine) or 2 (nmse), got ", loss);
  FASTKD_CHECK(eps > 0 && std::isfinite(eps), "eps must be positive and finite, got ", eps);
}

}  // namespace fastkd
