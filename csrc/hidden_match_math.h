// fastkd::hidden_match — the per-row math shared by the CPU kernel (hidden_match.cpp), the CUDA kernel
// (hidden_match.cuh) and its host emulation (tests/cuda_emu): loss codes and gradient coefficients.
// No torch headers here, so the CUDA kernel header can include it under the emulation too.
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

#include <cmath>
#include <cstdint>

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

}  // namespace fastkd
