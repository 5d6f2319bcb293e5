// fastkd::hidden_match — the CUDA row kernel (device code only: no torch or c10/cuda headers, so the
// host emulation in tests/cuda_emu/ compiles it too). Launched by hidden_match_cuda.cu, after cuBLAS has
// projected a group of layers; the per-row math is in hidden_match_math.h.
//
// One block per row (grid-stride over rows): a strided pass over the row accumulates the sums
// (sum (P-T)^2 for MSE; |P|^2, |T|^2, P.T otherwise), a block reduction, then a second strided pass
// writes dP (in place over P) and dT (and sums NMSE's loss); MSE needs no second pass. Consecutive
// threads touch consecutive elements (coalesced). The bias is added on the fly. A row whose weight
// is 0 is not read: loss 0, zero gradients. Offsets are int64.
#pragma once

#include "cuda_device.cuh"
#include "hidden_match_math.h"

#include <cstdint>

namespace fastkd {
namespace hidden_cuda {

constexpr int kThreads = 256;

// Sum over the block, in the same order on every run (no atomics); every thread gets the result.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with `shared`
  if (lane == 0) shared[wid] = v;
  __syncthreads();
  acc_t r = acc_t(0);
  for (int i = 0; i < int(blockDim.x >> 5); ++i) r += shared[i];
  return r;
}

template <typename scalar_t, typename acc_t>
struct RowParams {
  const scalar_t* p;     // [R, H] projected rows without bias (or the student rows: no projection)
  const scalar_t* bias;  // bias rows (layer stride bias_stride; 0 = shared), or nullptr
  int64_t bias_stride;
  const scalar_t* t;   // [R, H] teacher rows
  const acc_t* rs;     // [R] row_scale (0 = excluded row)
  scalar_t* dp;        // out: [R, H] dP, or nullptr; may alias p (element j is read, then written, by one thread)
  scalar_t* dt;        // out: [R, H] teacher gradient, or nullptr
  acc_t* loss_rows;    // out: [R] w * loss
  int64_t R;           // rows: layers in the group x N
  int64_t N;           // rows per layer (the bias row of row r is r / N)
  int64_t H;           // Ht
  int64_t loss;        // HM_MSE / HM_COSINE / HM_NMSE
  acc_t eps;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) hm_rows_kernel(const RowParams<scalar_t, acc_t> P) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t H = P.H;
  for (int64_t r = blockIdx.x; r < P.R; r += gridDim.x) {
    const int64_t o = r * H;
    const acc_t w = P.rs[r];
    if (w == acc_t(0)) {  // excluded row: loss 0, zero gradients, nothing read
      for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
        if (P.dp) P.dp[o + j] = scalar_t(0);
        if (P.dt) P.dt[o + j] = scalar_t(0);
      }
      if (threadIdx.x == 0) P.loss_rows[r] = acc_t(0);
      continue;
    }
    const scalar_t* b = P.bias ? P.bias + (r / P.N) * P.bias_stride : nullptr;
    const scalar_t* prow = P.p + o;
    const scalar_t* trow = P.t + o;
    if (P.loss == HM_MSE) {
      const acc_t c = w * acc_t(2) / acc_t(H);
      acc_t s = acc_t(0);
      for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
        const acc_t x = static_cast<acc_t>(prow[j]) + (b ? static_cast<acc_t>(b[j]) : acc_t(0));
        const acc_t d = x - static_cast<acc_t>(trow[j]);
        s += d * d;
        if (P.dp) P.dp[o + j] = static_cast<scalar_t>(c * d);
        if (P.dt) P.dt[o + j] = static_cast<scalar_t>(-c * d);
      }
      s = block_sum(s, shared);
      if (threadIdx.x == 0) P.loss_rows[r] = w * s / acc_t(H);
      continue;
    }
    acc_t pp = acc_t(0), tt = acc_t(0), pt = acc_t(0);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const acc_t x = static_cast<acc_t>(prow[j]) + (b ? static_cast<acc_t>(b[j]) : acc_t(0));
      const acc_t y = static_cast<acc_t>(trow[j]);
      pp += x * x;
      tt += y * y;
      pt += x * y;
    }
    pp = block_sum(pp, shared);
    tt = block_sum(tt, shared);
    pt = block_sum(pt, shared);
    const RowCoef<acc_t> k = norm_loss_coef<acc_t>(P.loss, pp, tt, pt, acc_t(H), P.eps, w);
    const bool nmse = P.loss == HM_NMSE;
    acc_t l = acc_t(0);
    if (P.dp || P.dt || nmse) {
      for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
        const acc_t x = static_cast<acc_t>(prow[j]) + (b ? static_cast<acc_t>(b[j]) : acc_t(0));
        const acc_t y = static_cast<acc_t>(trow[j]);
        if (nmse) {
          const acc_t d = x * k.inv_np - y * k.inv_nt;
          l += d * d;
        }
        if (P.dp) P.dp[o + j] = static_cast<scalar_t>(k.aP * x + k.bP * y);
        if (P.dt) P.dt[o + j] = static_cast<scalar_t>(k.aT * y + k.bT * x);
      }
    }
    if (nmse) l = block_sum(l, shared);
    if (threadIdx.x == 0) P.loss_rows[r] = nmse ? w * l / acc_t(H) : k.loss;
  }
}

}  // namespace hidden_cuda
}  // namespace fastkd
