// fastkd::nearest_tokens — CUDA kernel. Scores, ranking keys and tie rules are written in
// nearest_tokens.cpp (and kernels/nearest_tokens.py); the checks are shared through nearest_tokens.h.
//
// Streaming over the vocabulary: the host walks the vocabulary in tiles of kTileV entries and the
// rows in tiles of at most 2^24 / kTileV; each (row tile, vocabulary tile) pair is one cuBLAS GEMM
// (at::mm, float32 for 16-bit inputs; exact float32, TF32 only if the user enabled it for matmuls)
// into a score tile, followed by merge_kernel, which folds the tile into the running top-k of each
// row: one block per row, every thread keeps a sorted local list of its columns' best k (thread 0
// also holds the row's list so far), and k block-wide rounds pick the best remaining head
// (larger key, then lower id). finalize_kernel turns the keys of the winners into scores (cosine:
// times 1 / max(|e|, eps); l2: |e - w| recomputed exactly). Memory: the results [N, k], one score
// tile (at most 2^24 entries), and for 16-bit inputs a float32 copy of the embeddings and of one
// vocabulary tile. As on the CPU, every GEMM has the same shape (the last vocabulary tile is
// zero-padded, row tiles have at least 2 rows), so identical vocabulary rows score identically and
// their tie goes to the lower id. The running top-k lives in registers / local memory: k <= 128.
#include "nearest_tokens.h"

#include <ATen/Dispatch.h>

#include <limits>

#include "cuda_utils.cuh"

namespace fastkd {
namespace {

using namespace fastkd::nearest;

constexpr int64_t kTileV = 4096;
constexpr int64_t kMaxTile = int64_t(1) << 24;
constexpr int kThreads = 128;
constexpr int64_t kMaxK = 128;

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
    if (metric == COSINE) raw *= colterm[c0 + j];
    if (metric == L2DIST) raw = acc_t(2) * raw - colterm[c0 + j];
    insert<acc_t, KMAX>(lv, lr, li, k, rank_value(raw), raw, c0 + j);
  }
  __syncthreads();  // thread 0 has read the old list: it may now be overwritten
  int p = 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int q = 0; q < k; ++q) {
    acc_t v = p < k ? lv[p] : -std::numeric_limits<acc_t>::infinity();
    int64_t id = p < k ? li[p] : kNoId;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const acc_t ov = __shfl_down_sync(0xffffffffu, v, o);
      const int64_t oid = __shfl_down_sync(0xffffffffu, id, o);
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
  if (metric == COSINE) {
    acc_t sq = 0;
    for (int64_t h = threadIdx.x; h < H; h += kThreads) sq += er[h] * er[h];
    rowf = acc_t(1) / fmax(sqrt(block_sum(sq, shm)), acc_t(kEps));
  }
  for (int q = 0; q < k; ++q) {
    const int64_t off = row * k + q;
    if (metric == L2DIST) {
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

template <typename acc_t>
void merge(const at::Tensor& S, int64_t cn, int64_t c0, const at::Tensor& colterm, int64_t metric, at::Tensor& bv,
           at::Tensor& braw, at::Tensor& bi, int64_t r0, int64_t rn, int64_t k, cudaStream_t stream) {
  const acc_t* ps = S.data_ptr<acc_t>();
  const acc_t* pc = colterm.defined() ? colterm.data_ptr<acc_t>() : nullptr;
  acc_t* pv = bv.data_ptr<acc_t>() + r0 * k;
  acc_t* pr = braw.data_ptr<acc_t>() + r0 * k;
  int64_t* pi = bi.data_ptr<int64_t>() + r0 * k;
  const dim3 grid(static_cast<unsigned>(rn));
  const int m = static_cast<int>(metric), kk = static_cast<int>(k);
#define FASTKD_MERGE(KM) \
  merge_kernel<acc_t, KM><<<grid, kThreads, 0, stream>>>(ps, S.size(1), cn, c0, pc, m, pv, pr, pi, kk)
  if (k <= 1) {
    FASTKD_MERGE(1);
  } else if (k <= 4) {
    FASTKD_MERGE(4);
  } else if (k <= 16) {
    FASTKD_MERGE(16);
  } else if (k <= 32) {
    FASTKD_MERGE(32);
  } else if (k <= 64) {
    FASTKD_MERGE(64);
  } else {
    FASTKD_MERGE(128);
  }
#undef FASTKD_MERGE
  FASTKD_CUDA_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> nearest_tokens_cuda(const at::Tensor& embeds, const at::Tensor& embedding_matrix,
                                                       int64_t k, int64_t metric) {
  check_inputs(embeds, embedding_matrix, k, metric);
  FASTKD_CHECK(embeds.is_cuda(), "embeds must be a CUDA tensor for the cuda kernel, got ", embeds.device());
  FASTKD_CHECK(k <= kMaxK, "the cuda kernel supports k <= ", kMaxK, ", got ", k, " (use backend='torch')");
  const c10::DeviceGuard guard(embeds.device());
  cudaStream_t stream = current_cuda_stream(embeds.device());
  const int64_t N = embeds.size(0), H = embeds.size(1), V = embedding_matrix.size(0);
  const auto acc = embeds.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = embeds.options().dtype(acc);
  at::Tensor ids = at::empty({N, k}, embeds.options().dtype(at::kLong));
  at::Tensor scores = at::empty({N, k}, acc_opts);
  if (N == 0) return {ids, scores};

  const at::Tensor E = embeds.to(acc).contiguous();  // float32 copy for 16-bit inputs, else a no-op
  const at::Tensor Wm = embedding_matrix.contiguous();
  // |w|^2 as a plain sum of squares (through a norm and a square it would round, and two vocabulary
  // rows at equal distance would no longer tie), in chunks: no full float32 copy of 16-bit inputs.
  at::Tensor colterm;
  if (metric != DOT) {
    colterm = at::empty({V}, acc_opts);
    for (int64_t v0 = 0; v0 < V; v0 += 4096) {
      const int64_t vn = std::min<int64_t>(4096, V - v0);
      colterm.narrow(0, v0, vn).copy_(Wm.narrow(0, v0, vn).to(acc).square().sum(1));
    }
    if (metric == COSINE) colterm = colterm.sqrt().clamp_min(kEps).reciprocal();
  }
  at::Tensor bv = at::full({N, k}, -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor braw = at::zeros({N, k}, acc_opts);
  at::Tensor bi = at::full({N, k}, kNoId, embeds.options().dtype(at::kLong));

  const int64_t ldv = std::min(V, kTileV);
  const int64_t tile_n = std::max<int64_t>(2, std::min(N, kMaxTile / ldv));
  at::Tensor wpad;  // zero-padded last vocabulary tile (same GEMM shape for every tile)
  at::Tensor epad;  // a one-row tile padded to two rows (avoids the GEMV path)
  for (int64_t c0 = 0; c0 < V; c0 += ldv) {
    const int64_t cn = std::min(ldv, V - c0);
    at::Tensor wt = Wm.narrow(0, c0, cn).to(acc);
    if (cn < ldv) {
      wpad = at::zeros({ldv, H}, acc_opts);
      wpad.narrow(0, 0, cn).copy_(wt);
      wt = wpad;
    }
    for (int64_t r0 = 0; r0 < N; r0 += tile_n) {
      const int64_t rn = std::min(tile_n, N - r0);
      at::Tensor et = E.narrow(0, r0, rn);
      if (rn < 2) {
        epad = at::zeros({2, H}, acc_opts);
        epad.narrow(0, 0, rn).copy_(et);
        et = epad;
      }
      const at::Tensor S = at::mm(et, wt.t());
      AT_DISPATCH_FLOATING_TYPES(acc, "fastkd_nearest_tokens_merge",
                                 [&] { merge<scalar_t>(S, cn, c0, colterm, metric, bv, braw, bi, r0, rn, k, stream); });
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Wm.scalar_type(), "fastkd_nearest_tokens_finalize", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    finalize_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        E.data_ptr<acc_t>(), Wm.data_ptr<scalar_t>(), H, braw.data_ptr<acc_t>(), bi.data_ptr<int64_t>(),
        scores.data_ptr<acc_t>(), static_cast<int>(k), static_cast<int>(metric));
    FASTKD_CUDA_LAUNCH_CHECK();
  });
  ids.copy_(bi);
  return {ids, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("nearest_tokens", &nearest_tokens_cuda); }

}  // namespace fastkd
