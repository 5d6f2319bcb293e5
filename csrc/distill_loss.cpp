// fastkd:cpu-dispatch
// fastkd::distill_loss — fused temperature-softmax distillation loss, CPU kernel (at::vec SIMD,
// at::parallel_for over rows), compiled once per instruction-set level (cpu_dispatch.h). The CUDA
// kernel is in distill_loss_cuda.cu, the Triton kernel in kernels/distill_loss.py, the reference in
// fastkd/ops/distill_loss.py.
//
// Math, per row (student logits x_s, teacher logits x_t, temperature T), in shifted form:
//   u_s = (x_s - max x_s) / T, u_t = (x_t - max x_t) / T   (the subtraction is exact in float: no
//   Z_s = sum exp(u_s), Z_t = sum exp(u_t)                  cancellation at any logit offset)
//   log q = u_s - log Z_s, log p = u_t - log Z_t, c = loss_scale * row_scale[i]
//   KL        D = sum p (u_t - u_s) + log Z_s - log Z_t    dD/ds = q - p
//                                                          dD/dt = p (log p - log q - D)
//   REVERSE   D = sum q (u_s - u_t) + log Z_t - log Z_s    dD/ds = q (log q - log p - D)
//                                                          dD/dt = p - q
//   JSD(b)    m = b p + (1-b) q
//             D = b KL(p||m) + (1-b) KL(q||m)              dD/ds = (1-b) q (log q - log m - KL(q||m))
//                                                          dD/dt =  b    p (log p - log m - KL(p||m))
//   loss_i = c D_i, and the gradients written are c/T dD/ds, c/T dD/dt (chain rule through 1/T).
//   Every term is a difference of shifted logits, so offsets of 1e6 (or 1e30) cost no precision; the
//   form `sum p (t - s) + lse_s - lse_t` on raw logits would cancel two numbers of the offset's size.
//   A zero probability contributes nothing (a masked vocabulary entry at -inf is legitimate).
//   NaN contract: a NaN anywhere in a kept row makes both maxima NaN, hence the row's loss and both
//   gradient rows NaN; so does a row that is all -inf (its softmax is undefined: -inf - -inf) or
//   holds +inf. A row whose row_scale is 0 is skipped: loss 0, gradient 0, even if it holds NaN.
//
// Passes over a row (V = 32000 fp32: both rows and the scratch are 0.5 MiB, so passes C-D read L2):
//   B  block by block (1024 entries): the block's two maxima m_b (the block is read from memory once,
//      then from L1), u = (x - m_b) / T (in registers for float32 logits, through a block buffer for
//      bf16 / fp16), e = exp(u) into a per-thread scratch row (each exponential is taken once; u <= 0,
//      so fast_exp_nonpos), the block's sums Z_b and, for KL / reverse KL, sum e (u_t - u_s) (float per
//      block, two interleaved vector accumulators); then the row's maxima M and sums in double, block b
//      scaled by exp((m_b - M) / T) (there is no separate pass for the row maxima);
//   C  gradients from the scratch, each block's exponentials times its factor (KL's student gradient
//      needs only e_s f_s,b / Z_s - e_t f_t,b / Z_t);
//      JSD first accumulates KL(p||m), KL(q||m) with one log per element, then a last pass writes
//      its gradients.
// exp and log are fastkd's own (fast_math.h): range reduction plus a minimax polynomial with FMA.
#include "cpu_dispatch.h"
#include "distill_loss.h"
#include "fast_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd {
namespace CPU_CAPABILITY {
namespace distill_loss_impl {  // one namespace per file: the level's files compile as one unit
namespace {

using at::vec::Vectorized;
constexpr int64_t kBlock = 1024;  // elements per block: the block's u_s, u_t (8 KiB) stay in L1

template <typename acc_t>
inline acc_t vsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// The row maximum; NaN if any entry is NaN (at::vec::maximum propagates NaN).
template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* __restrict x, int64_t n) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t r = kNegInf;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    Vec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
    for (; j + 4 * W <= n; j += 4 * W) {
      m0 = at::vec::maximum(m0, Vec::loadu(x + j));
      m1 = at::vec::maximum(m1, Vec::loadu(x + j + W));
      m2 = at::vec::maximum(m2, Vec::loadu(x + j + 2 * W));
      m3 = at::vec::maximum(m3, Vec::loadu(x + j + 3 * W));
    }
    for (; j + W <= n; j += W) m0 = at::vec::maximum(m0, Vec::loadu(x + j));
    const Vec m = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    r = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  }
  for (; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    r = (v > r || std::isnan(v)) ? v : r;
  }
  return r;
}

// dst[j] = (src[j] - M) * inv_t: the shift is exact, only the scale rounds.
template <typename scalar_t, typename acc_t>
inline void load_shifted(const scalar_t* __restrict src, acc_t* __restrict dst, int64_t n, acc_t M, acc_t inv_t) {
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = Vectorized<acc_t>;
    const Vec vm(M), vi(inv_t);
    for (; j + Vec::size() <= n; j += Vec::size()) ((Vec::loadu(src + j) - vm) * vi).store(dst + j);
  }
  for (; j < n; ++j) dst[j] = (static_cast<acc_t>(src[j]) - M) * inv_t;
}

template <typename scalar_t, typename acc_t>
inline void store_cast(const acc_t* __restrict src, scalar_t* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// a where w != 0, else 0 (w * (NaN or inf) of a zero probability must not reach a sum).
template <typename acc_t>
inline Vectorized<acc_t> where_nonzero(const Vectorized<acc_t>& w, const Vectorized<acc_t>& a) {
  const Vectorized<acc_t> zero(acc_t(0));
  return Vectorized<acc_t>::blendv(a, zero, w == zero);
}

// A gradient output of N x V elements is fresh memory the kernel writes once: with 4 KiB pages its
// first touch costs one page fault per 4 KiB (a third of the time of the 4096 x 32000 case).
// Transparent huge pages, when the system allows them on request (enabled = madvise or always),
// cut that 512-fold; the advice is only a hint (torch's THP_MEM_ALLOC_ENABLE does the same).
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(8 * kHuge)) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> es, et;  // exp of the logits shifted by their block's maximum, whole row
  std::vector<double> ms, mt;  // per block: the shift used (the block's maximum; 0 for a block of -inf)
  std::vector<double> zs, zt, ab;  // per block: the sums of es, et and the KL / reverse-KL cross term
  std::vector<acc_t> fs, ft;  // per block: exp((shift - M) / T), the factor to the row's shift
  acc_t bs[kBlock], bt[kBlock], g[kBlock];
  explicit RowScratch(int64_t V)
      : es(V), et(V), ms(nblocks(V)), mt(nblocks(V)), zs(nblocks(V)), zt(nblocks(V)), ab(nblocks(V)),
        fs(nblocks(V)), ft(nblocks(V)) {}
  static int64_t nblocks(int64_t V) { return (V + kBlock - 1) / kBlock; }
};

// max with NaN propagation (a NaN maximum poisons the row, as the contract asks)
inline double nan_max(double a, double b) { return (b > a || std::isnan(b)) ? b : a; }

template <int DIV, typename scalar_t, typename acc_t>
double row_loss_and_grads(const scalar_t* __restrict xs, const scalar_t* __restrict xt, scalar_t* __restrict gs,
                          scalar_t* __restrict gt, int64_t V, acc_t inv_t, acc_t beta, acc_t c, RowScratch<acc_t>& w) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const int64_t nb = (V + kBlock - 1) / kBlock;
  acc_t* __restrict es_row = w.es.data();
  acc_t* __restrict et_row = w.et.data();

  // ---- pass B, block by block: the block's maxima (the block is read from memory once, then from
  // L1), logits shifted by them, exponentials into the scratch, the block's sums. float32 logits are
  // shifted in registers (no staging buffer); two vectors per iteration with their own accumulators
  // keep the exponentials' FMA chains overlapped. u <= 0 (or NaN), so the exp needs no upper clamp.
  // Shifting by the block's maximum instead of the row's (found in a separate pass over the whole row)
  // saves one pass over both rows; the row's sums are put together after the last block, each block's
  // scaled by exp((m_b - M) / T) <= 1, and pass C applies the same factor per block.
  double Ms = -std::numeric_limits<double>::infinity(), Mt = Ms;
  const Vec vit(inv_t);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
    const acc_t bms = row_max<scalar_t, acc_t>(xs + j0, n), bmt = row_max<scalar_t, acc_t>(xt + j0, n);
    Ms = nan_max(Ms, bms);
    Mt = nan_max(Mt, bmt);
    // a block of -inf only: shift by 0, so u = -inf and exp(u) = 0 there (as with the row's maximum)
    const acc_t ms_b = bms == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : bms;
    const acc_t mt_b = bmt == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : bmt;
    w.ms[b] = ms_b;
    w.mt[b] = mt_b;
    if constexpr (!kSame) {
      load_shifted(xs + j0, w.bs, n, ms_b, inv_t);
      load_shifted(xt + j0, w.bt, n, mt_b, inv_t);
    }
    const Vec vms(ms_b), vmt(mt_b);
    // the shifted logit u at j of the block: (x - m) / T (the subtraction exact, only the scale rounds)
    auto us_at = [&](int64_t j) {
      if constexpr (kSame) return (Vec::loadu(xs + j0 + j) - vms) * vit;
      else return Vec::loadu(w.bs + j);
    };
    auto ut_at = [&](int64_t j) {
      if constexpr (kSame) return (Vec::loadu(xt + j0 + j) - vmt) * vit;
      else return Vec::loadu(w.bt + j);
    };
    acc_t* __restrict es = es_row + j0;
    acc_t* __restrict et = et_row + j0;
    Vec zs(acc_t(0)), zt(acc_t(0)), a(acc_t(0)), zs2(acc_t(0)), zt2(acc_t(0)), a2(acc_t(0));
    int64_t j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {
      // the next block's logits are requested while this one's exponentials run (a prefetch past the
      // row's end is harmless: it never faults)
      __builtin_prefetch(xs + j0 + kBlock + j, 0, 3);
      __builtin_prefetch(xt + j0 + kBlock + j, 0, 3);
      __builtin_prefetch(xs + j0 + kBlock + j + W, 0, 3);
      __builtin_prefetch(xt + j0 + kBlock + j + W, 0, 3);
      const Vec us = us_at(j), ut = ut_at(j), us2 = us_at(j + W), ut2 = ut_at(j + W);
      const Vec vs = fast_exp_nonpos(us), vt = fast_exp_nonpos(ut);
      const Vec vs2 = fast_exp_nonpos(us2), vt2 = fast_exp_nonpos(ut2);
      vs.store(es + j);
      vt.store(et + j);
      vs2.store(es + j + W);
      vt2.store(et + j + W);
      zs = zs + vs;
      zt = zt + vt;
      zs2 = zs2 + vs2;
      zt2 = zt2 + vt2;
      if constexpr (DIV == KL) {
        a = a + where_nonzero(vt, vt * (ut - us));
        a2 = a2 + where_nonzero(vt2, vt2 * (ut2 - us2));
      }
      if constexpr (DIV == REVERSE_KL) {
        a = a + where_nonzero(vs, vs * (us - ut));
        a2 = a2 + where_nonzero(vs2, vs2 * (us2 - ut2));
      }
    }
    for (; j + W <= n; j += W) {
      const Vec us = us_at(j), ut = ut_at(j);
      const Vec vs = fast_exp_nonpos(us), vt = fast_exp_nonpos(ut);
      vs.store(es + j);
      vt.store(et + j);
      zs = zs + vs;
      zt = zt + vt;
      if constexpr (DIV == KL) a = a + where_nonzero(vt, vt * (ut - us));
      if constexpr (DIV == REVERSE_KL) a = a + where_nonzero(vs, vs * (us - ut));
    }
    acc_t szs = vsum(zs + zs2), szt = vsum(zt + zt2), sa = vsum(a + a2);
    for (; j < n; ++j) {
      const acc_t us = kSame ? (static_cast<acc_t>(xs[j0 + j]) - ms_b) * inv_t : w.bs[j];
      const acc_t ut = kSame ? (static_cast<acc_t>(xt[j0 + j]) - mt_b) * inv_t : w.bt[j];
      es[j] = fast_exp_nonpos(us);
      et[j] = fast_exp_nonpos(ut);
      szs += es[j];
      szt += et[j];
      if constexpr (DIV == KL) sa += (et[j] == acc_t(0)) ? acc_t(0) : et[j] * (ut - us);
      if constexpr (DIV == REVERSE_KL) sa += (es[j] == acc_t(0)) ? acc_t(0) : es[j] * (us - ut);
    }
    w.zs[b] = szs;
    w.zt[b] = szt;
    w.ab[b] = sa;
  }
  // the row's sums: block b's exponentials times exp(d_b), d_b = (m_b - M) / T <= 0 (NaN, and a row of
  // -inf or holding +inf, make them NaN); the cross term gains (d_t - d_s) per unit of mass, because
  // u_t - u_s = (u_t,b - u_s,b) + (d_t,b - d_s,b)
  double Zs = 0.0, Zt = 0.0, A = 0.0;
  const double dinv = static_cast<double>(inv_t);
  for (int64_t b = 0; b < nb; ++b) {
    const double ds = (w.ms[b] - Ms) * dinv, dt = (w.mt[b] - Mt) * dinv;
    // (the block that holds the row's maximum, the only one when V <= 1024, needs no exp)
    const double es_b = ds == 0.0 ? 1.0 : std::exp(ds), et_b = dt == 0.0 ? 1.0 : std::exp(dt);
    w.fs[b] = static_cast<acc_t>(es_b);
    w.ft[b] = static_cast<acc_t>(et_b);
    Zs += es_b * w.zs[b];
    Zt += et_b * w.zt[b];
    if constexpr (DIV == KL)
      if (w.zt[b] != 0.0) A += et_b * (w.ab[b] + (dt - ds) * w.zt[b]);
    if constexpr (DIV == REVERSE_KL)
      if (w.zs[b] != 0.0) A += es_b * (w.ab[b] + (ds - dt) * w.zs[b]);
  }
  const acc_t Ms_a = static_cast<acc_t>(Ms), Mt_a = static_cast<acc_t>(Mt);  // exact: maxima of acc_t values
  const double lZs = std::log(Zs), lZt = std::log(Zt);
  const acc_t cg = c * inv_t;
  const acc_t rzs = static_cast<acc_t>(1.0 / Zs), rzt = static_cast<acc_t>(1.0 / Zt);

  if constexpr (DIV == KL || DIV == REVERSE_KL) {
    const double D = (DIV == KL) ? A / Zt + lZs - lZt : A / Zs + lZt - lZs;
    if (gs == nullptr && gt == nullptr) return double(c) * D;
    // log p - log q - D = (u_t - u_s) + k with k = lZs - lZt - D (KL; the mirror for reverse KL)
    const acc_t k = static_cast<acc_t>((DIV == KL) ? lZs - lZt - D : lZt - lZs - D);
    const bool need_u = (DIV == KL) ? gt != nullptr : gs != nullptr;
    const Vec vk(k), vcg(cg);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
      const acc_t* __restrict es = es_row + j0;
      const acc_t* __restrict et = et_row + j0;
      // q = e_s * (f_s,b / Z_s), p = e_t * (f_t,b / Z_t): the block's factor to the row's shift
      const acc_t qs = rzs * w.fs[b], pt = rzt * w.ft[b];
      const Vec cq(cg * qs), cp(cg * pt), vrzs(qs), vrzt(pt);
      if (need_u) {
        load_shifted(xs + j0, w.bs, n, Ms_a, inv_t);
        load_shifted(xt + j0, w.bt, n, Mt_a, inv_t);
      }
      // The "difference" gradient (q - p for the student in KL, p - q for the teacher in reverse KL)
      scalar_t* gd = (DIV == KL) ? gs : gt;
      if (gd != nullptr) {
        acc_t* out = kSame ? reinterpret_cast<acc_t*>(gd + j0) : w.g;
        int64_t j = 0;
        if constexpr (DIV == KL) {
          for (; j + W <= n; j += W)
            at::vec::fmsub(Vec::loadu(es + j), cq, Vec::loadu(et + j) * cp).store(out + j);
          for (; j < n; ++j) out[j] = es[j] * (cg * qs) - et[j] * (cg * pt);
        } else {
          for (; j + W <= n; j += W)
            at::vec::fmsub(Vec::loadu(et + j), cp, Vec::loadu(es + j) * cq).store(out + j);
          for (; j < n; ++j) out[j] = et[j] * (cg * pt) - es[j] * (cg * qs);
        }
        if constexpr (!kSame) store_cast(w.g, gd + j0, n);
      }
      // The "log" gradient (p (log p - log q - D) for the teacher in KL, the mirror for the student)
      scalar_t* gl = (DIV == KL) ? gt : gs;
      if (gl != nullptr) {
        acc_t* out = kSame ? reinterpret_cast<acc_t*>(gl + j0) : w.g;
        // KL: weight p = e_t / Z_t, difference u_t - u_s; reverse: q = e_s / Z_s, u_s - u_t
        const acc_t* ew = (DIV == KL) ? et : es;
        const acc_t* ua = (DIV == KL) ? w.bt : w.bs;
        const acc_t* ub = (DIV == KL) ? w.bs : w.bt;
        const Vec vr = (DIV == KL) ? vrzt : vrzs;
        const acc_t r = (DIV == KL) ? pt : qs;
        int64_t j = 0;
        for (; j + W <= n; j += W) {
          const Vec pw = Vec::loadu(ew + j) * vr;
          const Vec g = pw * (Vec::loadu(ua + j) - Vec::loadu(ub + j) + vk) * vcg;
          where_nonzero(pw, g).store(out + j);
        }
        for (; j < n; ++j) {
          const acc_t pw = ew[j] * r;
          out[j] = (pw == acc_t(0)) ? acc_t(0) : pw * (ua[j] - ub[j] + k) * cg;
        }
        if constexpr (!kSame) store_cast(w.g, gl + j0, n);
      }
    }
    return double(c) * D;
  }

  // ---- JSD: pass C accumulates KL(p||m) and KL(q||m); pass D writes the gradients.
  const acc_t b1 = beta, b0 = acc_t(1) - beta;
  const acc_t flzs = static_cast<acc_t>(lZs), flzt = static_cast<acc_t>(lZt);
  const Vec vb1(b1), vb0(b0), vlzs(flzs), vlzt(flzt);
  double klp = 0.0, klq = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
    const acc_t qs = rzs * w.fs[b], pt = rzt * w.ft[b];  // the block's factor to the row's shift
    const Vec vrzs(qs), vrzt(pt);
    load_shifted(xs + j0, w.bs, n, Ms_a, inv_t);
    load_shifted(xt + j0, w.bt, n, Mt_a, inv_t);
    const acc_t* __restrict es = es_row + j0;
    const acc_t* __restrict et = et_row + j0;
    Vec ap(acc_t(0)), aq(acc_t(0));
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const Vec p = Vec::loadu(et + j) * vrzt, q = Vec::loadu(es + j) * vrzs;
      const Vec lm = fast_log(at::vec::fmadd(vb1, p, vb0 * q));
      ap = ap + where_nonzero(p, p * (Vec::loadu(w.bt + j) - vlzt - lm));
      aq = aq + where_nonzero(q, q * (Vec::loadu(w.bs + j) - vlzs - lm));
    }
    acc_t sp = vsum(ap), sq = vsum(aq);
    for (; j < n; ++j) {
      const acc_t p = et[j] * pt, q = es[j] * qs;
      const acc_t lm = fast_log(b1 * p + b0 * q);
      sp += (p == acc_t(0)) ? acc_t(0) : p * (w.bt[j] - flzt - lm);
      sq += (q == acc_t(0)) ? acc_t(0) : q * (w.bs[j] - flzs - lm);
    }
    klp += sp;
    klq += sq;
  }
  const double D = double(b1) * klp + double(b0) * klq;
  if (gs == nullptr && gt == nullptr) return double(c) * D;
  const acc_t fklp = static_cast<acc_t>(klp), fklq = static_cast<acc_t>(klq);
  const acc_t cs = b0 * cg, ct = b1 * cg;
  const Vec vcs(cs), vct(ct), vkp(flzt + fklp), vkq(flzs + fklq);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
    const acc_t qs = rzs * w.fs[b], pt = rzt * w.ft[b];
    const Vec vrzs(qs), vrzt(pt);
    load_shifted(xs + j0, w.bs, n, Ms_a, inv_t);
    load_shifted(xt + j0, w.bt, n, Mt_a, inv_t);
    const acc_t* __restrict es = es_row + j0;
    const acc_t* __restrict et = et_row + j0;
    acc_t* os = (gs == nullptr) ? nullptr : (kSame ? reinterpret_cast<acc_t*>(gs + j0) : w.g);
    acc_t* ot = (gt == nullptr) ? nullptr : (kSame ? reinterpret_cast<acc_t*>(gt + j0) : w.bt);
    // (with a cast, the teacher gradient overwrites w.bt after its last read of the element)
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const Vec p = Vec::loadu(et + j) * vrzt, q = Vec::loadu(es + j) * vrzs;
      const Vec lm = fast_log(at::vec::fmadd(vb1, p, vb0 * q));
      const Vec ut = Vec::loadu(w.bt + j), us = Vec::loadu(w.bs + j);
      if (os) where_nonzero(q, q * (us - vkq - lm) * vcs).store(os + j);
      if (ot) where_nonzero(p, p * (ut - vkp - lm) * vct).store(ot + j);
    }
    for (; j < n; ++j) {
      const acc_t p = et[j] * pt, q = es[j] * qs;
      const acc_t lm = fast_log(b1 * p + b0 * q);
      const acc_t ut = w.bt[j], us = w.bs[j];
      if (os) os[j] = (q == acc_t(0)) ? acc_t(0) : q * (us - (flzs + fklq) - lm) * cs;
      if (ot) ot[j] = (p == acc_t(0)) ? acc_t(0) : p * (ut - (flzt + fklp) - lm) * ct;
    }
    if constexpr (!kSame) {
      if (gs) store_cast(w.g, gs + j0, n);
      if (gt) store_cast(w.bt, gt + j0, n);
    }
  }
  return double(c) * D;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                const at::Tensor& row_scale, double temperature,
                                                                int64_t divergence, double beta, double loss_scale,
                                                                bool reduce, bool grad_student, bool grad_teacher) {
  check_distill_loss_args(student, teacher, row_scale, temperature, divergence, beta);
  const bool is_double = student.scalar_type() == at::kDouble;

  const int64_t N = student.size(0), V = student.size(1);
  auto rs = row_scale.contiguous();
  at::Tensor gs = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gt = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  at::Tensor rows = at::empty({N}, student.options().dtype(is_double ? at::kDouble : at::kFloat));
  if (grad_student) advise_huge_pages(gs.data_ptr(), gs.nbytes());
  if (grad_teacher) advise_huge_pages(gt.data_ptr(), gt.nbytes());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastkd_distill_loss_cpu", [&] {
    // float32 arithmetic for float32/bfloat16/float16 logits, float64 for float64 ones.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* ps = student.data_ptr<scalar_t>();
    const scalar_t* pt = teacher.data_ptr<scalar_t>();
    scalar_t* pgs = grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    scalar_t* pgt = grad_teacher ? gt.data_ptr<scalar_t>() : nullptr;
    const acc_t* prs = rs.data_ptr<acc_t>();
    acc_t* prow = rows.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    // A row is ~25 V vector-lane operations and 2 V exponentials: parallelise over rows, one row per task.
    // Grain: ~32k elements per task, so tiny inputs (a classification batch) stay on one thread.
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
      RowScratch<acc_t> w(V);
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t off = i * V;  // int64 offsets throughout
        const acc_t c = static_cast<acc_t>(loss_scale) * prs[i];
        if (c == acc_t(0)) {  // ignored row: nothing read, zeros written
          prow[i] = 0;
          if (pgs) std::fill(pgs + off, pgs + off + V, scalar_t(0));
          if (pgt) std::fill(pgt + off, pgt + off + V, scalar_t(0));
          continue;
        }
        scalar_t* rgs = pgs ? pgs + off : nullptr;
        scalar_t* rgt = pgt ? pgt + off : nullptr;
        const acc_t b = static_cast<acc_t>(beta);
        double r;
        if (divergence == KL)
          r = row_loss_and_grads<KL, scalar_t, acc_t>(ps + off, pt + off, rgs, rgt, V, inv_t, b, c, w);
        else if (divergence == REVERSE_KL)
          r = row_loss_and_grads<REVERSE_KL, scalar_t, acc_t>(ps + off, pt + off, rgs, rgt, V, inv_t, b, c, w);
        else
          r = row_loss_and_grads<JSD, scalar_t, acc_t>(ps + off, pt + off, rgs, rgt, V, inv_t, b, c, w);
        prow[i] = static_cast<acc_t>(r);
      }
    });
  });
  at::Tensor loss = reduce ? rows.sum() : rows;
  return {loss, gs, gt};
}

}  // namespace
}  // namespace distill_loss_impl
using distill_loss_impl::distill_loss_cpu;
}  // namespace CPU_CAPABILITY
}  // namespace fastkd

FASTKD_CPU_KERNEL(distill_loss_cpu)

#ifdef FASTKD_CPU_BASE
TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "distill_loss(Tensor student, Tensor teacher, Tensor row_scale, float temperature, int divergence, float beta, "
      "float loss_scale, bool reduce, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  // The same CPU kernel under a second name with no autograd registration: fastkd's eager fast path
  // (_EagerFusedLoss in fastkd/ops/distill_loss.py) calls it from inside its own autograd.Function,
  // where distill_loss would pass through torch.library's Python autograd wrapper first (~30 us a
  // call on a Zen 3 core, a sixth of the whole fwd+bwd at classification sizes). Not for users.
  m.def(
      "_distill_loss_eager(Tensor student, Tensor teacher, Tensor row_scale, float temperature, int divergence, "
      "float beta, float loss_scale, bool reduce, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("distill_loss", FASTKD_CPU_DISPATCH(distill_loss_cpu));
  m.impl("_distill_loss_eager", FASTKD_CPU_DISPATCH(distill_loss_cpu));
}
#endif
