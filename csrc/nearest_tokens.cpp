// fastkd::nearest_tokens — top-k vocabulary entries for each embedding, streaming over the
// vocabulary, CPU kernel. The CUDA kernel is in nearest_tokens.cu, the Triton kernel in
// kernels/nearest_tokens.py, the reference and the documentation in fastkd/ops/nearest_tokens.py.
//
// Scores (e an embedding row, w a vocabulary row):
//   cosine  s = e.w / (max(|e|, eps) max(|w|, eps))     ranked by  key = (e.w) / max(|w|, eps)
//   dot     s = e.w                                      ranked by  key = e.w
//   l2      s = |e - w|  (smallest first)                ranked by  key = 2 e.w - |w|^2
// (the per-row factors 1/max(|e|, eps) and |e|^2 do not change a row's order, so they are applied
// to the k winners only; l2 distances of the winners are recomputed exactly as |e - w|).
// Order: larger key first; equal keys: lower vocabulary id first; a NaN key ranks as -inf (last
// among similarities, farthest for l2), and its score is reported as NaN.
//
// Streaming: the rows are split into blocks (one per thread, or fewer rows and a split of the
// vocabulary when there are few rows). A task walks its vocabulary range in tiles of kTileV
// entries; for each tile and each row tile of kTileN rows it computes the [kTileN, kTileV] scores
// with one GEMM (at::mm_out into a per-thread buffer, single-threaded inside the parallel region)
// and merges them into each row's running top-k with a vectorised threshold test, so a candidate
// that cannot enter the top-k costs one compare. Memory: O(N k) for the results (times the number
// of vocabulary splits), plus per thread one score tile and, for bfloat16/float16 inputs, the
// float32 copies of one row tile and one vocabulary tile. The [N, V] score matrix never exists.
#include "nearest_tokens.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastkd {
namespace {

using at::vec::Vectorized;
using namespace fastkd::nearest;

constexpr int64_t kTileN = 256;   // rows per GEMM
constexpr int64_t kTileV = 1024;  // vocabulary entries per GEMM

template <typename acc_t>
inline acc_t rank_value(acc_t v) {
  return std::isnan(v) ? -std::numeric_limits<acc_t>::infinity() : v;
}

// (v, j) ranks before (u, i): larger value first, then lower id.
template <typename acc_t>
inline bool before(acc_t v, int64_t j, acc_t u, int64_t i) {
  const acc_t a = rank_value(v), b = rank_value(u);
  return a > b || (a == b && j < i);
}

// Insert (v, j) into the sorted list (bv, bi) of length k if it ranks before the last entry.
template <typename acc_t>
inline void insert(acc_t* bv, int64_t* bi, int64_t k, acc_t v, int64_t j) {
  if (!before(v, j, bv[k - 1], bi[k - 1])) return;
  int64_t p = k - 1;
  while (p > 0 && before(v, j, bv[p - 1], bi[p - 1])) {
    bv[p] = bv[p - 1];
    bi[p] = bi[p - 1];
    --p;
  }
  bv[p] = v;
  bi[p] = j;
}

// Turn one row of GEMM output s[0, n) (vocabulary ids c0 + j) into keys and merge into the list.
template <typename acc_t>
void merge_row(acc_t* s, int64_t n, int64_t c0, const acc_t* colterm, int64_t metric, acc_t* bv, int64_t* bi,
               int64_t k) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec two(acc_t(2)), ninf(-std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec v = Vec::loadu(s + j);
    if (metric == COSINE) {
      v = v * Vec::loadu(colterm + c0 + j);
    } else if (metric == L2DIST) {
      v = at::vec::fmsub(two, v, Vec::loadu(colterm + c0 + j));
    }
    if (metric != DOT) v.store(s + j);
    // Lanes that could enter: rank value >= the current last entry's (ties are settled by id below).
    const Vec r = Vec::blendv(v, ninf, v != v);
    const Vec thr(rank_value(bv[k - 1]));
    const int below = (r >= thr).zero_mask();  // bit set: lane cannot enter
    if (below == (1 << W) - 1) continue;
    for (int64_t l = 0; l < W; ++l)
      if (!(below & (1 << l))) insert(bv, bi, k, s[j + l], c0 + j + l);
  }
  for (; j < n; ++j) {
    acc_t v = s[j];
    if (metric == COSINE) v *= colterm[c0 + j];
    if (metric == L2DIST) v = acc_t(2) * v - colterm[c0 + j];
    insert(bv, bi, k, v, c0 + j);
  }
}

template <typename scalar_t, typename acc_t>
inline void convert_rows(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

// Per-row sum of squares of x [rows, H] (in acc_t) into out[rows].
template <typename scalar_t, typename acc_t>
void row_sq_norms(const scalar_t* x, int64_t rows, int64_t H, acc_t* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* p = x + r * H;
      acc_t s = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        using Vec = Vectorized<acc_t>;
        Vec a(acc_t(0));
        int64_t j = 0;
        for (; j + Vec::size() <= H; j += Vec::size()) {
          const Vec v = Vec::loadu(p + j);
          a = at::vec::fmadd(v, v, a);
        }
        s = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& w) { return u + w; }, a);
        for (; j < H; ++j) s += p[j] * p[j];
      } else {
        for (int64_t j = 0; j < H; ++j) {
          const acc_t v = static_cast<acc_t>(p[j]);
          s += v * v;
        }
      }
      out[r] = s;
    }
  });
}

template <typename scalar_t>
void run(const at::Tensor& E, const at::Tensor& Wm, int64_t k, int64_t metric, at::Tensor& ids, at::Tensor& scores) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t N = E.size(0), H = E.size(1), V = Wm.size(0);
  const scalar_t* pe = E.data_ptr<scalar_t>();
  const scalar_t* pw = Wm.data_ptr<scalar_t>();
  const auto acc_opts = E.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  // Per-vocabulary term of the key, and for cosine the per-row factor.
  std::vector<acc_t> colterm(metric == DOT ? 0 : V);
  if (metric != DOT) {
    row_sq_norms<scalar_t, acc_t>(pw, V, H, colterm.data());
    if (metric == COSINE)
      for (auto& c : colterm) c = acc_t(1) / std::max<acc_t>(std::sqrt(c), acc_t(kEps));
  }

  // Work split: row blocks (whole row tiles), and vocabulary splits when rows are few.
  const int64_t P = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_rt = (N + kTileN - 1) / kTileN;
  const int64_t n_vt = (V + kTileV - 1) / kTileV;
  const int64_t nrb = std::min(P, n_rt);
  const int64_t rt_per_block = (n_rt + nrb - 1) / nrb;
  const int64_t vs = std::max<int64_t>(1, std::min(P / nrb, n_vt));
  const int64_t vt_per_split = (n_vt + vs - 1) / vs;

  // Running lists: [vs, N, k] (values in acc_t: keys; ids).
  std::vector<acc_t> lv(static_cast<size_t>(vs * N * k), -std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> li(static_cast<size_t>(vs * N * k), kNoId);

  // Every GEMM has kTileV columns (the last vocabulary tile is zero-padded) and at least 2 rows:
  // BLAS libraries switch code paths (GEMV for one row, small-matrix kernels for narrow calls) whose
  // rounding differs, and then two identical vocabulary rows could score differently. With one
  // call shape per row tile, identical vocabulary rows score bit-identically, so their tie is
  // broken by id, whatever the thread count (tiles sit at fixed positions).
  const int64_t ldv = std::min(V, kTileV);
  at::parallel_for(0, nrb * vs, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor sbuf = at::empty({kTileN * ldv}, acc_opts);
    at::Tensor ebuf = at::zeros({kTileN, H}, acc_opts);
    at::Tensor wbuf = at::zeros({ldv, H}, acc_opts);
    acc_t* pwb = wbuf.data_ptr<acc_t>();
    acc_t* peb = ebuf.data_ptr<acc_t>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = t / vs, s = t % vs;
      const int64_t rt0 = rb * rt_per_block, rt1 = std::min(n_rt, rt0 + rt_per_block);
      const int64_t vt0 = s * vt_per_split, vt1 = std::min(n_vt, vt0 + vt_per_split);
      for (int64_t vt = vt0; vt < vt1; ++vt) {
        const int64_t c0 = vt * kTileV, cn = std::min(kTileV, V - c0);
        at::Tensor wt;
        if (kConvert || cn < ldv) {
          convert_rows(pw + c0 * H, pwb, cn * H);
          std::fill(pwb + cn * H, pwb + ldv * H, acc_t(0));
          wt = wbuf;
        } else {
          wt = Wm.narrow(0, c0, cn);
        }
        for (int64_t rt = rt0; rt < rt1; ++rt) {
          const int64_t r0 = rt * kTileN, rn = std::min(kTileN, N - r0);
          const int64_t mrows = std::max<int64_t>(rn, 2);
          at::Tensor et;
          if (kConvert || rn < 2) {
            convert_rows(pe + r0 * H, peb, rn * H);
            std::fill(peb + rn * H, peb + mrows * H, acc_t(0));
            et = ebuf.narrow(0, 0, mrows);
          } else {
            et = E.narrow(0, r0, rn);
          }
          at::Tensor st = sbuf.narrow(0, 0, mrows * ldv).view({mrows, ldv});
          at::mm_out(st, et, wt.t());
          const acc_t* ps = st.data_ptr<acc_t>();
          for (int64_t i = 0; i < rn; ++i) {
            const int64_t off = (s * N + r0 + i) * k;
            merge_row<acc_t>(const_cast<acc_t*>(ps) + i * ldv, cn, c0, colterm.data(), metric, lv.data() + off,
                             li.data() + off, k);
          }
        }
      }
    }
  });

  // Merge the vocabulary splits, then turn keys into scores.
  int64_t* pid = ids.data_ptr<int64_t>();
  acc_t* psc = scores.data_ptr<acc_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 256 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> mv(k), ev(kConvert ? H : 0);
    std::vector<int64_t> mi(k);
    for (int64_t r = r0; r < r1; ++r) {
      std::copy_n(lv.data() + r * k, k, mv.data());
      std::copy_n(li.data() + r * k, k, mi.data());
      for (int64_t s = 1; s < vs; ++s) {
        const int64_t off = (s * N + r) * k;
        for (int64_t q = 0; q < k; ++q) insert(mv.data(), mi.data(), k, lv[off + q], li[off + q]);
      }
      const scalar_t* e = pe + r * H;
      acc_t row_factor = 1;
      if (metric == COSINE) {
        acc_t sq = 0;
        for (int64_t h = 0; h < H; ++h) sq += static_cast<acc_t>(e[h]) * static_cast<acc_t>(e[h]);
        row_factor = acc_t(1) / std::max<acc_t>(std::sqrt(sq), acc_t(kEps));
      }
      for (int64_t q = 0; q < k; ++q) {
        pid[r * k + q] = mi[q];
        if (metric == L2DIST) {
          const scalar_t* w = pw + mi[q] * H;
          acc_t d = 0;
          for (int64_t h = 0; h < H; ++h) {
            const acc_t x = static_cast<acc_t>(e[h]) - static_cast<acc_t>(w[h]);
            d += x * x;
          }
          psc[r * k + q] = std::sqrt(d);
        } else {
          psc[r * k + q] = mv[q] * row_factor;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nearest_tokens_cpu(const at::Tensor& embeds, const at::Tensor& embedding_matrix,
                                                      int64_t k, int64_t metric) {
  check_inputs(embeds, embedding_matrix, k, metric);
  FASTKD_CHECK(embeds.device().is_cpu(), "embeds must be a CPU tensor for the cpu kernel, got ", embeds.device());
  const at::Tensor E = embeds.contiguous();
  const at::Tensor Wm = embedding_matrix.contiguous();
  const auto acc = embeds.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor ids = at::empty({E.size(0), k}, E.options().dtype(at::kLong));
  at::Tensor scores = at::empty({E.size(0), k}, E.options().dtype(acc));
  if (E.size(0) == 0) return {ids, scores};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, E.scalar_type(), "fastkd_nearest_tokens_cpu",
                                  [&] { run<scalar_t>(E, Wm, k, metric, ids, scores); });
  return {ids, scores};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("nearest_tokens(Tensor embeds, Tensor embedding_matrix, int k, int metric) -> (Tensor ids, Tensor scores)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("nearest_tokens", &nearest_tokens_cpu); }

}  // namespace fastkd
