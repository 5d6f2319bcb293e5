// fastkd::nearest_tokens — CUDA implementation: the host walks the vocabulary in tiles of kTileV
// entries and the rows in tiles of at most 2^24 / kTileV; each (row tile, vocabulary tile) pair is
// one cuBLAS GEMM (at::mm, float32 for 16-bit inputs; exact float32, TF32 only if the user enabled
// it for matmuls) into a score tile, followed by merge_kernel (nearest_tokens.cuh), and at the end
// finalize_kernel turns keys into scores. The checks are shared with the CPU kernel through
// nearest_tokens.h. Memory: the results [N, k], one score tile (at most 2^24 entries), and for
// 16-bit inputs a float32 copy of the embeddings and of one vocabulary tile. As on the CPU, every
// GEMM has the same shape (the last vocabulary tile is zero-padded, row tiles have at least 2 rows),
// so identical vocabulary rows score identically and their tie goes to the lower id. The running
// top-k lives in registers / local memory: k <= 128.
#include "nearest_tokens.h"

#include "cuda_common.cuh"
#include "nearest_tokens.cuh"

#include <ATen/Dispatch.h>

#include <limits>

namespace fastkd {
namespace {

using namespace fastkd::nearest;
using namespace fastkd::nearest_cuda;
static_assert(kCosine == COSINE && kDot == DOT && kL2 == L2DIST, "metric codes differ from nearest_tokens.h");
static_assert(nearest_cuda::kNoId == nearest::kNoId, "kNoId differs from nearest_tokens.h");

constexpr int64_t kTileV = 4096;
constexpr int64_t kMaxTile = int64_t(1) << 24;

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
  dispatch_kmax(k, [&](auto KM) {
    merge_kernel<acc_t, decltype(KM)::value><<<grid, kThreads, 0, stream>>>(ps, S.size(1), cn, c0, pc, m, pv, pr, pi, kk);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> nearest_tokens_cuda(const at::Tensor& embeds, const at::Tensor& embedding_matrix,
                                                       int64_t k, int64_t metric) {
  check_inputs(embeds, embedding_matrix, k, metric);
  FASTKD_CHECK(embeds.is_cuda(), "embeds must be a CUDA tensor for the cuda kernel, got ", embeds.device());
  FASTKD_CHECK(k <= kMaxK, "the cuda kernel supports k <= ", kMaxK, ", got ", k, " (use backend='torch')");
  const c10::cuda::CUDAGuard guard(embeds.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(embeds.device().index()).stream();
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
    if (metric == COSINE) colterm = colterm.sqrt().clamp_min(nearest::kEps).reciprocal();
  }
  at::Tensor bv = at::full({N, k}, -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor braw = at::zeros({N, k}, acc_opts);
  at::Tensor bi = at::full({N, k}, nearest::kNoId, embeds.options().dtype(at::kLong));

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
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  ids.copy_(bi);
  return {ids, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("nearest_tokens", &nearest_tokens_cuda); }

}  // namespace fastkd
