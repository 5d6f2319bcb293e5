// fastkd::hidden_match — declarations shared by the CPU (hidden_match.cpp) and CUDA (hidden_match.cu)
// kernels: the loss codes, the argument checks and the per-row gradient coefficients.
//
// Per layer l and token row n (P = S W^T + b the projected student row, T the teacher row, both of
// width H = Ht, w = row_scale[l, n] the reduction weight):
//   MSE     loss = w/H sum_j (P_j - T_j)^2                 dP = w 2/H (P - T)          dT = -dP
//   COSINE  nP = max(|P|, eps), nT = max(|T|, eps), c = P.T / (nP nT)
//           loss = w (1 - c)                               dP = w (aP P + bP T)       dT = w (aT T + bT P)
//           aP = [|P| > eps] c / nP^2, bP = -1 / (nP nT)   (aT, bT: the same with P and T swapped)
//   NMSE    loss = w/H sum_j (P_j/nP - T_j/nT)^2           same form as COSINE with k = 2/H:
//           aP = k ([|P| > eps] ? c : 1) / nP^2,  bP = -k / (nP nT)
// (derivation: d(P/nP)/dP = (I - [|P| > eps] P P^T / |P|^2) / nP.) A norm below eps is replaced by
// eps, so an all-zero row gives a finite loss and finite gradients, never NaN.
#pragma once

#include "common.h"

#include <c10/util/Optional.h>

#include <cmath>

#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

namespace fastkd {

// Loss codes shared with fastkd/ops/hidden_match.py and kernels/hidden_match.py.
enum HiddenLoss : int64_t { HM_MSE = 0, HM_COSINE = 1, HM_NMSE = 2 };

// dLoss/dP = aP P + bP T and dLoss/dT = aT T + bT P for one row (already multiplied by w), and the
// row's loss for COSINE (NMSE's loss is summed in the gradient pass, where P/nP - T/nT is at hand:
// 2 - 2c would lose digits when P and T are close).
template <typename acc_t>
struct RowCoef {
  acc_t aP, bP, aT, bT, loss, inv_np, inv_nt;
};

template <typename acc_t>
FASTKD_HD RowCoef<acc_t> norm_loss_coef(int64_t loss, acc_t pp, acc_t tt, acc_t pt, acc_t H, acc_t eps, acc_t w) {
  const acc_t rp = std::sqrt(pp), rt = std::sqrt(tt);
  const bool big_p = rp > eps, big_t = rt > eps;
  const acc_t np = big_p ? rp : eps, nt = big_t ? rt : eps;
  const acc_t inv_np = acc_t(1) / np, inv_nt = acc_t(1) / nt;
  const acc_t inv = inv_np * inv_nt;
  const acc_t c = pt * inv;
  RowCoef<acc_t> r;
  r.inv_np = inv_np;
  r.inv_nt = inv_nt;
  if (loss == HM_COSINE) {
    r.aP = w * (big_p ? c * inv_np * inv_np : acc_t(0));
    r.aT = w * (big_t ? c * inv_nt * inv_nt : acc_t(0));
    r.bP = -w * inv;
    r.bT = -w * inv;
    r.loss = w * (acc_t(1) - c);
  } else {  // HM_NMSE
    const acc_t k = w * acc_t(2) / H;
    r.aP = k * (big_p ? c : acc_t(1)) * inv_np * inv_np;
    r.aT = k * (big_t ? c : acc_t(1)) * inv_nt * inv_nt;
    r.bP = -k * inv;
    r.bT = -k * inv;
    r.loss = acc_t(0);
  }
  return r;
}

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
