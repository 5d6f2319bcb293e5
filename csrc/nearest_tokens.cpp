// fastkd:cpu-dispatch
// fastkd::nearest_tokens — top-k vocabulary entries for each embedding, streaming over the
// vocabulary, CPU kernel. The CUDA kernel is in nearest_tokens_cuda.cu, the Triton kernel in
// kernels/nearest_tokens.py, the reference and the documentation in fastkd/ops/nearest_tokens.py.
//
// Scores (e an embedding row, w a vocabulary row):
//   cosine  s = e.w / (max(|e|, eps) max(|w|, eps))     ranked by  key = (e.w) / max(|w|, eps)
//   dot     s = e.w                                      ranked by  key = e.w
//   l2      s = |e - w|  (smallest first)                ranked by  key = 2 e.w - |w|^2
// (the per-row factors 1/max(|e|, eps) and |e|^2 do not change a row's order, so they are applied
// to the k winners only; l2 distances of the winners are recomputed exactly as |e - w|; the int8
// path ranks its l2 candidates by -|e - w|^2 computed directly, which keeps nearly equal distances
// apart where 2 e.w - |w|^2 would cancel).
// Order: larger key first; equal keys: lower vocabulary id first; a NaN key ranks as -inf (last
// among similarities, farthest for l2), and its score is reported as NaN.
//
// Two paths, both streaming over the vocabulary (the [N, V] score matrix never exists):
// * int8 (the default for N >= 32, V >= 512, k <= 48, H <= 133,144, finite inputs): an exact int8 GEMM of
//   quantised rows gives every score up to a proven error bound; each row keeps the columns whose
//   bound reaches its running top-k threshold as candidates and scores only those exactly (see the
//   comment above run_int8). About 4x faster than float32 GEMM tiles on AVX-512 VNNI machines, with
//   the same answer: the top-k of the exact float scores.
// * float (small problems, NaN / inf, large k, and rows with thousands of near-ties): the rows are
//   split into blocks (one per thread, or fewer rows and a split of the vocabulary when there are
//   few rows); a task walks its vocabulary range in tiles of kTileV entries; for each tile and each
//   row tile of kTileN rows it computes the [kTileN, kTileV] scores with one GEMM (at::mm_out into a
//   per-thread buffer, single-threaded inside the parallel region) and merges them into each row's
//   running top-k with a vectorised threshold test, so a candidate that cannot enter the top-k
//   costs one compare.
// Memory: O(N k) for the results (times the number of vocabulary splits) plus per thread one score
// tile; the int8 path adds the int8 copies of the embeddings and the vocabulary ((N + V) H bytes)
// and the candidate lists; the float path adds, for bfloat16/float16 inputs, float32 copies of one
// row tile and one vocabulary tile.
#include "cpu_dispatch.h"
#include "nearest_tokens.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <cmath>
#include <limits>
#include <functional>
#include <vector>

namespace fastkd {
namespace CPU_CAPABILITY {
namespace nearest_tokens_impl {  // one namespace per file: the level's files compile as one unit
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

// The float path: GEMM tiles in the compute type. Used for small problems, for inputs with NaN or
// inf, and for the rows the int8 path hands back (too many near-ties to keep as candidates).
template <typename scalar_t>
void run_fp(const at::Tensor& E, const at::Tensor& Wm, int64_t k, int64_t metric, at::Tensor& ids,
            at::Tensor& scores) {
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


// ---------------------------------------------------------------------------------------------
// The int8 path. Each row x (embedding or vocabulary) is quantised symmetrically: x = s q + r with
// q int8 in [-127, 127], s = max|x| / 127. The GEMM of the int8 rows is exact in int32 and runs at
// about 4x the float32 rate (AVX-512 VNNI through oneDNN). For an embedding e = a q_e + r_e and a
// vocabulary row w = b q_w + r_w:
//   e.w - a b (q_e.q_w) = e.r_w + r_e.(b q_w)   so   |e.w - a b (q_e.q_w)| <= |e| |r_w| + |r_e| |b q_w|
// (Cauchy-Schwarz); adding gamma_H |e| |w| (the rounding of the float dot product that ranks the
// candidates, gamma_H = H u / (1 - H u)) and a relative margin for the float arithmetic below gives
// err(e, w) with |key(e, w) - approx(e, w)| <= err(e, w), key being the score the float path
// would rank by, computed exactly as below. Each row keeps the k largest lower bounds
// approx - err seen so far (T = the k-th) and collects as candidates the columns whose upper
// bound approx + err reaches T. Every column of the true top-k (ties included) has an upper bound
// at least the final T, so it is collected; the candidates (typically a few dozen of V) are then
// scored exactly — a dot product in the compute type with a fixed summation order, the same for
// every column, so equal vocabulary rows tie exactly and the tie goes to the lower id — and the k
// best are kept. A row whose candidates stay above kOverflowAt after pruning (thousands of
// near-ties, e.g. a zero embedding) is handed to the float path.
// Extra memory: the int8 copies of the embeddings and the vocabulary ((N + V) H bytes), per-row
// scalars, per thread one int32 score tile, and the candidate lists.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kQTileN = 256;
constexpr int64_t kQTileV = 1024;
constexpr size_t kCompactAt = 1024;
constexpr size_t kOverflowAt = 8192;
// When the int8 path runs: enough rows to amortise quantising the vocabulary, and a k small enough
// that the candidate lists stay short (measured crossover with the float path near k = 50).
constexpr int64_t kInt8MinRows = 32;
constexpr int64_t kInt8MinVocab = 512;
constexpr int64_t kInt8MaxK = 48;
// FASTKD_NEAREST_INT8: "auto" (default) takes the int8 path only where the CPU has VNNI, so that
// torch's int8 GEMM runs at speed (without it at::_int_mm is a reference loop: 173 ms against 2.5 ms
// for the float32 GEMM of [256, 128] x [128, 4096] on a Zen 3 core pair); "1" always (tests of the
// int8 path on any host), "0" never. Both paths give the same answer.
inline bool int8_allowed() {
  const char* v = std::getenv("FASTKD_NEAREST_INT8");
  const std::string mode = v == nullptr ? "auto" : v;
  if (mode == "auto" || mode.empty()) return dispatch::cpu_has_int8_dot();
  FASTKD_CHECK(mode == "0" || mode == "1", "FASTKD_NEAREST_INT8 must be auto, 0 or 1, got '", mode, "'");
  return mode == "1";
}
// The int8 GEMM accumulates in int32 (at::_int_mm): |q_e . q_w| <= 127 * 127 * H must stay below
// 2^31, so hidden sizes above 133,144 take the float path (wider rows are rare and the float GEMM
// is then long enough to amortise anyway).
constexpr int64_t kInt8MaxH = std::numeric_limits<int32_t>::max() / (127 * 127);

struct Quantized {
  std::vector<int8_t> q;                          // [rows, H]
  std::vector<double> scale, resid, qnorm, norm;  // s, |x - s q|, |s q|, |x|
  std::vector<uint8_t> finite;                    // every value finite
};

template <typename scalar_t>
void quantize_rows(const scalar_t* x, int64_t rows, int64_t H, Quantized& out) {
  out.q.assign(static_cast<size_t>(rows * H), 0);
  out.scale.assign(rows, 0.0);
  out.resid.assign(rows, 0.0);
  out.qnorm.assign(rows, 0.0);
  out.norm.assign(rows, 0.0);
  out.finite.assign(rows, 1);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* p = x + r * H;
      double mx = 0.0;
      bool fin = true;
      for (int64_t j = 0; j < H; ++j) {
        const double v = static_cast<double>(p[j]);
        fin = fin && std::isfinite(v);
        mx = std::max(mx, std::abs(v));
      }
      if (!fin) {
        out.finite[r] = 0;
        continue;
      }
      const double sc = mx / 127.0, inv = mx > 0.0 ? 127.0 / mx : 0.0;
      int8_t* q = out.q.data() + r * H;
      double r2 = 0.0, q2 = 0.0, n2 = 0.0;
      for (int64_t j = 0; j < H; ++j) {
        const double v = static_cast<double>(p[j]);
        const double qi = std::min(127.0, std::max(-127.0, std::nearbyint(v * inv)));
        q[j] = static_cast<int8_t>(qi);
        const double res = v - sc * qi;
        r2 += res * res;
        q2 += qi * qi;
        n2 += v * v;
      }
      out.scale[r] = sc;
      out.resid[r] = std::sqrt(r2);
      out.qnorm[r] = sc * std::sqrt(q2);
      out.norm[r] = std::sqrt(n2);
    }
  });
}

// Dot product of an embedding row (already in the compute type) and a vocabulary row, with a
// fixed summation order that depends only on H.
template <typename scalar_t, typename acc_t>
inline acc_t exact_dot(const acc_t* e, const scalar_t* w, int64_t H, acc_t* tmp) {
  using Vec = Vectorized<acc_t>;
  const acc_t* wa;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    wa = w;
  } else {
    for (int64_t j = 0; j < H; ++j) tmp[j] = static_cast<acc_t>(w[j]);
    wa = tmp;
  }
  Vec a(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= H; j += Vec::size()) a = at::vec::fmadd(Vec::loadu(e + j), Vec::loadu(wa + j), a);
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, a);
  for (; j < H; ++j) s += e[j] * wa[j];
  return s;
}

// Squared distance |e - w|^2 with a fixed summation order (the l2 key of a candidate is its
// negation: computed directly, it keeps its precision for nearly equal distances, where
// 2 e.w - |w|^2 would cancel).
template <typename scalar_t, typename acc_t>
inline acc_t exact_sqdist(const acc_t* e, const scalar_t* w, int64_t H, acc_t* tmp) {
  using Vec = Vectorized<acc_t>;
  const acc_t* wa;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    wa = w;
  } else {
    for (int64_t j = 0; j < H; ++j) tmp[j] = static_cast<acc_t>(w[j]);
    wa = tmp;
  }
  Vec a(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= H; j += Vec::size()) {
    const Vec d = Vec::loadu(e + j) - Vec::loadu(wa + j);
    a = at::vec::fmadd(d, d, a);
  }
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, a);
  for (; j < H; ++j) s += (e[j] - wa[j]) * (e[j] - wa[j]);
  return s;
}

template <typename acc_t>
struct Cand {
  acc_t ub;
  int32_t id;
};

// Column terms of the bound and of the key, and the row terms (see the comment above).
template <typename acc_t>
struct Terms {
  // per column: approx = a cs S + cadd (+ the row's radd); err = ne ce1 + re ce2 + ce0 (+ the row's re0)
  std::vector<acc_t> cs, ce1, ce2, ce0, cadd, cmul;
  acc_t slack;
};

// One row of the int32 tile: bounds, the lower-bound top-k (lb, sorted descending, length k) and
// the candidates.
template <typename acc_t>
void scan_row_int8(const int32_t* s, int64_t n, int64_t c0, acc_t a, acc_t ne, acc_t re, acc_t radd, acc_t re0,
                   const Terms<acc_t>& t, acc_t* lb, int64_t k, std::vector<Cand<acc_t>>& cands, acc_t* ub,
                   bool collect) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < n; ++j) ub[j] = static_cast<acc_t>(s[j]);  // vectorised by the compiler
  const acc_t* cs = t.cs.data() + c0;
  const acc_t* ce1 = t.ce1.data() + c0;
  const acc_t* ce2 = t.ce2.data() + c0;
  const acc_t* cadd = t.cadd.data() + c0;
  const acc_t* ce0 = t.ce0.data() + c0;
  const Vec va(a), vne(ne), vre(re), vsl(t.slack), vradd(radd), vre0(re0);
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  auto lower_insert = [&](acc_t v) {
    if (!(v > lb[k - 1])) return;
    int64_t p = k - 1;
    while (p > 0 && v > lb[p - 1]) {
      lb[p] = lb[p - 1];
      --p;
    }
    lb[p] = v;
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec base = va * Vec::loadu(cs + j) * Vec::loadu(ub + j);
    const Vec add = Vec::loadu(cadd + j) + vradd;
    const Vec key = base + add;
    Vec err = at::vec::fmadd(vne, Vec::loadu(ce1 + j), at::vec::fmadd(vre, Vec::loadu(ce2 + j), Vec::loadu(ce0 + j) + vre0));
    err = at::vec::fmadd(vsl, base.abs() + add.abs() + err, err);
    (key + err).store(ub + j);
    const Vec low = key - err;
    if (k == 1) {
      vmax = at::vec::maximum(vmax, low);
    } else {
      const int below = (low > Vec(lb[k - 1])).zero_mask();
      if (below != (1 << W) - 1) {
        acc_t tmp[W];
        low.store(tmp);
        for (int64_t l = 0; l < W; ++l) lower_insert(tmp[l]);
      }
    }
  }
  for (; j < n; ++j) {
    const acc_t base = a * cs[j] * ub[j], add = cadd[j] + radd, key = base + add;
    acc_t err = ne * ce1[j] + re * ce2[j] + ce0[j] + re0;
    err = err + t.slack * (std::abs(base) + std::abs(add) + err);
    ub[j] = key + err;
    lower_insert(key - err);
  }
  if (k == 1) lower_insert(at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax));
  if (!collect) return;
  const acc_t T = lb[k - 1];
  const Vec vT(T);
  j = 0;
  for (; j + W <= n; j += W) {
    const int below = (Vec::loadu(ub + j) >= vT).zero_mask();
    if (below == (1 << W) - 1) continue;
    for (int64_t l = 0; l < W; ++l)
      if (!(below & (1 << l))) cands.push_back({ub[j + l], static_cast<int32_t>(c0 + j + l)});
  }
  for (; j < n; ++j)
    if (ub[j] >= T) cands.push_back({ub[j], static_cast<int32_t>(c0 + j)});
}

// Returns false (nothing written) when the vocabulary holds NaN or inf: the float path then runs.
template <typename scalar_t>
bool run_int8(const at::Tensor& E, const at::Tensor& Wm, int64_t k, int64_t metric, at::Tensor& ids,
              at::Tensor& scores) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t N = E.size(0), H = E.size(1), V = Wm.size(0);
  const scalar_t* pe = E.data_ptr<scalar_t>();
  const scalar_t* pw = Wm.data_ptr<scalar_t>();
  Quantized qw, qe;
  quantize_rows(pw, V, H, qw);
  for (int64_t c = 0; c < V; ++c)
    if (!qw.finite[c]) return false;
  quantize_rows(pe, N, H, qe);

  const double u = std::numeric_limits<acc_t>::epsilon() / 2;
  const double gamma = 1.01 * H * u / (1.0 - H * u);
  Terms<acc_t> t;
  t.slack = static_cast<acc_t>(16 * u);
  t.cs.resize(V);
  t.ce1.resize(V);
  t.ce2.resize(V);
  t.ce0.resize(V);
  t.cadd.resize(V);
  t.cmul.resize(V);
  // l2: the candidates are ranked by -|e - w|^2, computed directly; approximated as
  // 2 a b (q_e.q_w) - |w|^2 - |e|^2, whose error adds the rounding of both squared norms and of the
  // direct sum: 3 gamma (|e| + |w|)^2 covers them.
  std::vector<acc_t> wsq(metric == L2DIST ? V : 0);
  if (metric == L2DIST) row_sq_norms<scalar_t, acc_t>(pw, V, H, wsq.data());
  for (int64_t c = 0; c < V; ++c) {
    const double m = metric == COSINE ? 1.0 / std::max(qw.norm[c], kEps) : (metric == L2DIST ? 2.0 : 1.0);
    const double nw = qw.norm[c];
    t.cmul[c] = static_cast<acc_t>(m);
    t.cs[c] = static_cast<acc_t>(qw.scale[c] * m);
    const double cross = metric == L2DIST ? 6.0 * gamma * nw : 0.0;
    t.ce1[c] = static_cast<acc_t>(((qw.resid[c] + gamma * nw) * m + cross) * (1.0 + 1e-6));
    t.ce2[c] = static_cast<acc_t>(qw.qnorm[c] * m * (1.0 + 1e-6));
    t.ce0[c] = static_cast<acc_t>(metric == L2DIST ? 3.0 * gamma * nw * nw * (1.0 + 1e-6) : 0.0);
    t.cadd[c] = metric == L2DIST ? -wsq[c] : acc_t(0);
  }

  std::vector<acc_t> esq(metric == L2DIST ? N : 0);
  if (metric == L2DIST) row_sq_norms<scalar_t, acc_t>(pe, N, H, esq.data());

  const int64_t P = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_rt = (N + kQTileN - 1) / kQTileN;
  const int64_t n_vt = (V + kQTileV - 1) / kQTileV;
  const int64_t nrb = std::min(P, n_rt);
  const int64_t rt_per_block = (n_rt + nrb - 1) / nrb;
  const int64_t vs = std::max<int64_t>(1, std::min(P / nrb, n_vt));
  const int64_t vt_per_split = (n_vt + vs - 1) / vs;
  std::vector<acc_t> lbs(static_cast<size_t>(vs * N * k), -std::numeric_limits<acc_t>::infinity());
  std::vector<std::vector<Cand<acc_t>>> cands(static_cast<size_t>(vs * N));
  std::vector<uint8_t> over(static_cast<size_t>(vs * N), 0);
  const auto i8 = E.options().dtype(at::kChar);

  at::parallel_for(0, nrb * vs, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor sbuf = at::empty({kQTileN * kQTileV}, E.options().dtype(at::kInt));
    std::vector<acc_t> ub(kQTileV);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t rb = task / vs, sp = task % vs;
      const int64_t rt0 = rb * rt_per_block, rt1 = std::min(n_rt, rt0 + rt_per_block);
      const int64_t vt0 = sp * vt_per_split, vt1 = std::min(n_vt, vt0 + vt_per_split);
      for (int64_t vt = vt0; vt < vt1; ++vt) {
        const int64_t c0 = vt * kQTileV, cn = std::min(kQTileV, V - c0);
        const at::Tensor wt = at::from_blob(qw.q.data() + c0 * H, {cn, H}, i8);
        for (int64_t rt = rt0; rt < rt1; ++rt) {
          const int64_t r0 = rt * kQTileN, rn = std::min(kQTileN, N - r0);
          const at::Tensor et = at::from_blob(qe.q.data() + r0 * H, {rn, H}, i8);
          at::Tensor st = sbuf.narrow(0, 0, rn * cn).view({rn, cn});
          at::_int_mm_out(st, et, wt.t());
          const int32_t* ps = st.data_ptr<int32_t>();
          for (int64_t i = 0; i < rn; ++i) {
            const int64_t row = r0 + i, slot = sp * N + row;
            if (!qe.finite[row]) continue;
            auto& cl = cands[slot];
            acc_t* lb = lbs.data() + slot * k;
            const double ne = qe.norm[row];
            scan_row_int8<acc_t>(ps + i * cn, cn, c0, static_cast<acc_t>(qe.scale[row]), static_cast<acc_t>(ne),
                                 static_cast<acc_t>(qe.resid[row]), metric == L2DIST ? -esq[row] : acc_t(0),
                                 static_cast<acc_t>(metric == L2DIST ? 3.0 * gamma * ne * ne * (1.0 + 1e-6) : 0.0), t,
                                 lb, k, cl, ub.data(), !over[slot]);
            if (cl.size() > kCompactAt) {
              const acc_t T = lb[k - 1];
              cl.erase(std::remove_if(cl.begin(), cl.end(), [T](const Cand<acc_t>& c) { return c.ub < T; }), cl.end());
              if (cl.size() > kOverflowAt) {
                over[slot] = 1;
                std::vector<Cand<acc_t>>().swap(cl);
              }
            }
          }
        }
      }
    }
  });

  // Per row: the final threshold, exact scores of the candidates, the k best.
  std::vector<uint8_t> fallback(N, 0);
  int64_t* pid = ids.data_ptr<int64_t>();
  acc_t* psc = scores.data_ptr<acc_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 64 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> ea(H), tmp(H), bv(k), all_lb;
    std::vector<int64_t> bi(k);
    for (int64_t r = r0; r < r1; ++r) {
      bool fb = !qe.finite[r];
      for (int64_t sp = 0; sp < vs && !fb; ++sp) fb = over[sp * N + r] != 0;
      if (fb) {
        fallback[r] = 1;
        continue;
      }
      all_lb.assign(lbs.begin() + r * k, lbs.begin() + (r + 1) * k);
      for (int64_t sp = 1; sp < vs; ++sp)
        all_lb.insert(all_lb.end(), lbs.begin() + (sp * N + r) * k, lbs.begin() + (sp * N + r + 1) * k);
      std::nth_element(all_lb.begin(), all_lb.begin() + (k - 1), all_lb.end(), std::greater<acc_t>());
      const acc_t T = all_lb[k - 1];
      const scalar_t* e = pe + r * H;
      for (int64_t h = 0; h < H; ++h) ea[h] = static_cast<acc_t>(e[h]);
      std::fill(bv.begin(), bv.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(bi.begin(), bi.end(), kNoId);
      for (int64_t sp = 0; sp < vs; ++sp) {
        for (const auto& c : cands[sp * N + r]) {
          if (c.ub < T) continue;
          const scalar_t* w = pw + static_cast<int64_t>(c.id) * H;
          const acc_t key = metric == L2DIST ? -exact_sqdist<scalar_t, acc_t>(ea.data(), w, H, tmp.data())
                                             : exact_dot<scalar_t, acc_t>(ea.data(), w, H, tmp.data()) * t.cmul[c.id];
          insert(bv.data(), bi.data(), k, key, static_cast<int64_t>(c.id));
        }
      }
      const acc_t row_factor = static_cast<acc_t>(1.0 / std::max(qe.norm[r], kEps));
      for (int64_t q = 0; q < k; ++q) {
        pid[r * k + q] = bi[q];
        if (metric == L2DIST) {
          psc[r * k + q] = std::sqrt(-bv[q]);
        } else {
          psc[r * k + q] = metric == COSINE ? bv[q] * row_factor : bv[q];
        }
      }
    }
  });

  // Rows handed back: the float path on those rows only.
  std::vector<int64_t> back;
  for (int64_t r = 0; r < N; ++r)
    if (fallback[r]) back.push_back(r);
  if (!back.empty()) {
    const at::Tensor idx = at::tensor(back, E.options().dtype(at::kLong));
    const at::Tensor sub = E.index_select(0, idx);
    at::Tensor sub_ids = at::empty({sub.size(0), k}, ids.options());
    at::Tensor sub_sc = at::empty({sub.size(0), k}, scores.options());
    run_fp<scalar_t>(sub, Wm, k, metric, sub_ids, sub_sc);
    ids.index_copy_(0, idx, sub_ids);
    scores.index_copy_(0, idx, sub_sc);
  }
  return true;
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
  const bool int8_path = int8_allowed() && E.size(0) >= kInt8MinRows && Wm.size(0) >= kInt8MinVocab &&
                         E.size(1) > 0 && E.size(1) <= kInt8MaxH && k <= kInt8MaxK;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, E.scalar_type(), "fastkd_nearest_tokens_cpu", [&] {
    if (!int8_path || !run_int8<scalar_t>(E, Wm, k, metric, ids, scores))
      run_fp<scalar_t>(E, Wm, k, metric, ids, scores);
  });
  return {ids, scores};
}

}  // namespace
}  // namespace nearest_tokens_impl
using nearest_tokens_impl::nearest_tokens_cpu;
}  // namespace CPU_CAPABILITY
}  // namespace fastkd

FASTKD_CPU_KERNEL(nearest_tokens_cpu)

#ifdef FASTKD_CPU_BASE
TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("nearest_tokens(Tensor embeds, Tensor embedding_matrix, int k, int metric) -> (Tensor ids, Tensor scores)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("nearest_tokens", FASTKD_CPU_DISPATCH(nearest_tokens_cpu)); }
#endif
