// fastkd::nearest_tokens — the CUDA kernels (nearest_tokens_cuda.cu tiles the vocabulary, runs the cuBLAS
// GEMMs and launches these; the scores, keys and tie rules are written in nearest_tokens.cpp). This
// header needs no torch headers, so tests/cuda_emu/ also runs the kernels on the host.
//
// merge_kernel folds one score tile into the running top-k of each row: one block per row, every
// thread keeps a sorted local list of its columns' best k (thread 0 also holds the row's list so
// far), and k block-wide rounds pick the best remaining head (larger key, then lower id).
// finalize_kernel turns the keys of the winners into scores (cosine: times 1 / max(|e|, eps);
// l2: |e - w| recomputed exactly).
#pragma once

#include "cuda_device.cuh"

#include <cstdint>
#include <limits>
#include <utility>

namespace fastkd {
namespace nearest_cuda {

// Metric codes, shared with nearest_tokens.h (nearest::Metric) and the Python layers.
constexpr int kCosine = 0, kDot = 1, kL2 = 2;

constexpr int kThreads = 128;
constexpr int64_t kMaxK = 128;
constexpr int64_t kNoId = std::numeric_limits<int64_t>::max();  // "no entry": ranks after every id
constexpr double kEps = 1e-8;

// f(std::integral_constant<int, KMAX>{}) with KMAX the smallest supported list length >= k.
template <typename F>
void dispatch_kmax(int64_t k, F&& f) {
  if (k <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (k <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (k <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (k <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (k <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t rank_value(acc_t v) {
  return isnan(v) ? -std::numeric_limits<acc_t>::infinity() : v;
}

// (v, j) ranks before (u, i): larger rank value first, then lower id. v, u are rank values.
template <typename acc_t>
__device__ __forceinline__ bool before(acc_t v, int64_t j, acc_t u, int64_t i) {
  return v > u || (v == u && j < i);
}

template <typename acc_t, int KMAX>
__device__ __forceinline__ void insert(acc_t* lv, acc_t* lr, int64_t* li, int k, acc_t v, acc_t raw, int64_t j) {
  if (!before(v, j, lv[k - 1], li[k - 1])) return;
  int p = k - 1;
  while (p > 0 && before(v, j, lv[p - 1], li[p - 1])) {
    lv[p] = lv[p - 1];
    lr[p] = lr[p - 1];
    li[p] = li[p - 1];
    --p;
  }
  lv[p] = v;
  lr[p] = raw;
  li[p] = j;
}

// Fold one score tile into the running lists. Block = one row; s: the row's GEMM output [cn]
// (vocabulary ids c0 + j); bv / braw / bi: the row's list [k] (rank values, raw keys, ids).
template <typename acc_t, int KMAX>
__global__ void __launch_bounds__(kThreads) merge_kernel(const acc_t* __restrict__ S, int64_t ldS, int64_t cn,
                                                         int64_t c0, const acc_t* __restrict__ colterm, int metric,
                                                         acc_t* bv, acc_t* braw, int64_t* bi, int k) {
  __shared__ acc_t sv[kThreads / 32];
  __shared__ int64_t si[kThreads / 32];
  __shared__ int64_t win_id;
  const int64_t row = blockIdx.x;
  const acc_t* s = S + row * ldS;
  acc_t* rv = bv + row * k;
  acc_t* rr = braw + row * k;
  int64_t* ri = bi + row * k;

  acc_t lv[KMAX], lr[KMAX];
  int64_t li[KMAX];
  for (int q = 0; q < k; ++q) {
    lv[q] = threadIdx.x == 0 ? rv[q] : -std::numeric_limits<acc_t>::infinity();
    lr[q] = threadIdx.x == 0 ? rr[q] : acc_t(0);
    li[q] = threadIdx.x == 0 ? ri[q] : kNoId;
  }
  for (int64_t j = threadIdx.x; j < cn; j += kThreads) {
    acc_t raw = s[j];
    if (metric == kCosine) raw *= colterm[c0 + j];
    if (metric == kL2) raw = acc_t(2) * raw - colterm[c0 + j];
    insert<acc_t, KMAX>(lv, lr, li, k, rank_value(raw), raw, c0 + j);
  }
  __syncthreads();  // thread 0 has read the old list: it may now be overwritten
  int p = 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int q = 0; q < k; ++q) {
    acc_t v = p < k ? lv[p] : -std::numeric_limits<acc_t>::infinity();
    int64_t id = p < k ? li[p] : kNoId;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {  // butterfly: every lane ends with the warp's best
      const acc_t ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int64_t oid = __shfl_xor_sync(0xffffffffu, id, o);
      if (before(ov, oid, v, id)) {
        v = ov;
        id = oid;
      }
    }
    if (lane == 0) {
      sv[warp] = v;
      si[warp] = id;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kThreads / 32; ++w)
        if (before(sv[w], si[w], v, id)) {
          v = sv[w];
          id = si[w];
        }
      win_id = id;
    }
    __syncthreads();
    const int64_t wid = win_id;
    if (wid != kNoId && p < k && li[p] == wid) {  // the owner (real ids are in one list only)
      rv[q] = lv[p];
      rr[q] = lr[p];
      ri[q] = li[p];
      ++p;
    } else if (wid == kNoId && threadIdx.x == 0) {
      rv[q] = -std::numeric_limits<acc_t>::infinity();
      rr[q] = acc_t(0);
      ri[q] = kNoId;
    }
    __syncthreads();  // win_id and the shared slots are reused by the next round
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  acc_t t = 0;
  for (int w = 0; w < kThreads / 32; ++w) t += shm[w];
  return t;
}

// Keys of the winners -> scores. Block = one row. e: embeddings in the compute type [N, H];
// w: the vocabulary in its own dtype [V, H].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const acc_t* __restrict__ e, const scalar_t* __restrict__ w,
                                                            int64_t H, const acc_t* __restrict__ braw,
                                                            const int64_t* __restrict__ bi, acc_t* scores, int k,
                                                            int metric) {
  __shared__ acc_t shm[kThreads / 32];
  const int64_t row = blockIdx.x;
  const acc_t* er = e + row * H;
  acc_t rowf = 1;
  if (metric == kCosine) {
    acc_t sq = 0;
    for (int64_t h = threadIdx.x; h < H; h += kThreads) sq += er[h] * er[h];
    rowf = acc_t(1) / fmax(sqrt(block_sum(sq, shm)), acc_t(kEps));
  }
  for (int q = 0; q < k; ++q) {
    const int64_t off = row * k + q;
    if (metric == kL2) {
      const scalar_t* wr = w + bi[off] * H;
      acc_t d = 0;
      for (int64_t h = threadIdx.x; h < H; h += kThreads) {
        const acc_t x = er[h] - static_cast<acc_t>(wr[h]);
        d += x * x;
      }
      d = block_sum(d, shm);
      if (threadIdx.x == 0) scores[off] = sqrt(d);
    } else if (threadIdx.x == 0) {
      scores[off] = braw[off] * rowf;
    }
  }
}

}  // namespace nearest_cuda
}  // namespace fastkd
