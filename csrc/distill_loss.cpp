// fastkd::distill_loss — fused temperature-softmax distillation loss, CPU kernel (at::vec SIMD,
// at::parallel_for over rows). The CUDA kernel is in distill_loss.cu, the Triton kernel in
// kernels/distill_loss.py, the reference in fastkd/ops/distill_loss.py.
//
// Math, per row (student logits x_s, teacher logits x_t, temperature T):
//   s = x_s / T, t = x_t / T, q = softmax(s), p = softmax(t), c = loss_scale * row_scale[i]
//   KL        D = sum p (log p - log q)         dD/ds = q - p
//                                               dD/dt = p (log p - log q - D)
//   REVERSE   D = sum q (log q - log p)         dD/ds = q (log q - log p - D)
//                                               dD/dt = p - q
//   JSD(b)    m = b p + (1-b) q
//             D = b KL(p||m) + (1-b) KL(q||m)   dD/ds = (1-b) q (log q - log m - KL(q||m))
//                                               dD/dt =  b    p (log p - log m - KL(p||m))
//   loss_i = c D_i, and the gradients written are c/T dD/ds, c/T dD/dt (chain rule through 1/T).
//   A zero probability contributes nothing (a masked vocabulary entry at -inf is legitimate);
//   a row whose row_scale is 0 is skipped: loss 0, gradient 0, even if it holds NaN.
//
// Passes over a row: pass 1 computes, block by block, exp(t - block max) and exp(s - block max)
// into a per-thread scratch row (so each exponential is taken once) and the online sums that give
// both log-sum-exps and D for KL / reverse KL; pass 2 turns the scratch into p and q with one scale
// per block and writes the gradients. JSD needs sum p log m before its gradients, so it has a third
// pass. A row of fp32 logits at V = 32000 is 125 KiB, so passes 2-3 read the row from L2, not DRAM.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

namespace fastkd {
namespace {

using at::vec::Vectorized;
constexpr int64_t kBlock = 512;  // elements per block; the block's s and t (4 KiB) stay in L1
template <typename acc_t>
constexpr acc_t kNegInfT = -std::numeric_limits<acc_t>::infinity();

// Exponential of a vector: the fast (u20, ~2e-7 relative) float version, the exact one for double.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) return v.exp_u20(); else return v.exp();
}

template <typename scalar_t, typename acc_t>
inline void load_scaled(const scalar_t* __restrict src, acc_t* __restrict dst, int64_t n, acc_t inv_t) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const Vec vi(inv_t);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(src + j) * vi).store(dst + j);
    for (; j < n; ++j) dst[j] = src[j] * inv_t;
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]) * inv_t;
  }
}

template <typename scalar_t, typename acc_t>
inline void store_cast(const acc_t* __restrict src, scalar_t* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

template <typename acc_t>
inline acc_t block_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec m(kNegInfT<acc_t>);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) m = at::vec::maximum(m, Vec::loadu(x + j));
  acc_t r = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  for (; j < n; ++j) r = (x[j] > r || std::isnan(x[j])) ? x[j] : r;
  return r;
}

// e[j] = exp(x[j] - m); returns sum e. With m = -inf (all entries -inf) every e is 0.
template <typename acc_t>
inline acc_t exp_shift_sum(const acc_t* x, acc_t* e, int64_t n, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t shift = (m == kNegInfT<acc_t>) ? acc_t(0) : m;
  const Vec vm(shift);
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = vexp<acc_t>(Vec::loadu(x + j) - vm);
    v.store(e + j);
    acc = acc + v;
  }
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    e[j] = std::exp(x[j] - shift);
    s += e[j];
  }
  return s;
}

// sum_j e[j] * (a[j] - b[j]), with e[j] == 0 contributing 0 even when a - b is infinite or NaN.
template <typename acc_t>
inline acc_t weighted_diff_sum(const acc_t* e, const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec zero(0.0f);
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec ev = Vec::loadu(e + j);
    const Vec prod = ev * (Vec::loadu(a + j) - Vec::loadu(b + j));
    acc = acc + Vec::blendv(prod, zero, ev == zero);
  }
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; j < n; ++j) s += (e[j] == 0.0f) ? 0.0f : e[j] * (a[j] - b[j]);
  return s;
}

// Running log-sum-exp state combined block by block (double: one update per block).
struct Online {
  double m = -std::numeric_limits<double>::infinity();
  double z = 0.0;  // sum exp(x - m)
  double a = 0.0;  // sum exp(x - m) * (x - y), the KL / reverse-KL numerator
  void add(double bm, double bz, double ba) {
    if (bz == 0.0 && !std::isnan(ba)) return;  // an all -inf block adds nothing
    const double nm = std::max<double>(m, bm);
    const double f_old = std::isinf(m) && m < 0 ? 0.0 : std::exp(m - nm);
    const double f_new = std::exp(double(bm) - nm);
    z = z * f_old + double(bz) * f_new;
    a = a * f_old + double(ba) * f_new;
    m = nm;
  }
  double lse() const { return m + std::log(z); }
};

template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> es, et;  // exp(x - block max), whole row
  std::vector<acc_t> ms, mt;  // block maxima
  acc_t bs[kBlock], bt[kBlock], g[kBlock];
  explicit RowScratch(int64_t V) : es(V), et(V), ms((V + kBlock - 1) / kBlock), mt((V + kBlock - 1) / kBlock) {}
};

template <typename acc_t>
inline acc_t block_factor(acc_t bm, double lse) {
  return (bm == kNegInfT<acc_t>) ? acc_t(0) : static_cast<acc_t>(std::exp(double(bm) - lse));
}

template <typename scalar_t, typename acc_t>
double row_loss_and_grads(const scalar_t* xs, const scalar_t* xt, scalar_t* gs, scalar_t* gt, int64_t V,
                         acc_t inv_t, int64_t div, acc_t beta, acc_t c, RowScratch<acc_t>& w) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t kNegInf = kNegInfT<acc_t>;
  const int64_t nb = (V + kBlock - 1) / kBlock;
  Online os, ot;
  // ---- pass 1: block maxima, exponentials into scratch, online sums
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
    load_scaled(xs + j0, w.bs, n, inv_t);
    load_scaled(xt + j0, w.bt, n, inv_t);
    const acc_t mb_s = block_max(w.bs, n), mb_t = block_max(w.bt, n);
    w.ms[b] = mb_s;
    w.mt[b] = mb_t;
    const acc_t zs = exp_shift_sum(w.bs, w.es.data() + j0, n, mb_s);
    const acc_t zt = exp_shift_sum(w.bt, w.et.data() + j0, n, mb_t);
    const acc_t at = (div == KL) ? weighted_diff_sum(w.et.data() + j0, w.bt, w.bs, n) : acc_t(0);
    const acc_t as = (div == REVERSE_KL) ? weighted_diff_sum(w.es.data() + j0, w.bs, w.bt, n) : acc_t(0);
    // exp_shift_sum used shift 0 for an all -inf block; record -inf so pass 2 knows p = 0 there.
    os.add(mb_s == kNegInf ? acc_t(0) : mb_s, zs, as);
    ot.add(mb_t == kNegInf ? acc_t(0) : mb_t, zt, at);
  }
  const double lse_s = os.lse(), lse_t = ot.lse();
  double D = 0.0;
  if (div == KL) D = ot.a / ot.z + lse_s - lse_t;
  if (div == REVERSE_KL) D = os.a / os.z + lse_t - lse_s;
  const acc_t fls = static_cast<acc_t>(lse_s), flt = static_cast<acc_t>(lse_t);
  const acc_t cg = c * inv_t;
  const Vec zero(acc_t(0));

  if (div == KL || div == REVERSE_KL) {
    const acc_t fD = static_cast<acc_t>(D);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
      const acc_t sfs = block_factor(w.ms[b], lse_s), sft = block_factor(w.mt[b], lse_t);
      const Vec fs(sfs), ft(sft);
      const acc_t* es = w.es.data() + j0;
      const acc_t* et = w.et.data() + j0;
      const bool need_logs = (div == KL) ? (gt != nullptr) : (gs != nullptr);
      if (need_logs) {
        load_scaled(xs + j0, w.bs, n, inv_t);
        load_scaled(xt + j0, w.bt, n, inv_t);
      }
      // student gradient
      if (gs != nullptr) {
        int64_t j = 0;
        if (div == KL) {
          const Vec vc(cg);
          for (; j + Vec::size() <= n; j += Vec::size())
            ((Vec::loadu(es + j) * fs - Vec::loadu(et + j) * ft) * vc).store(w.g + j);
        } else {
          // q (log q - log p - D) = q ((s - lse_s) - (t - lse_t) - D)
          const Vec k(flt - fls - fD), vc(cg);
          for (; j + Vec::size() <= n; j += Vec::size()) {
            const Vec q = Vec::loadu(es + j) * fs;
            const Vec r = q * (Vec::loadu(w.bs + j) - Vec::loadu(w.bt + j) + k) * vc;
            Vec::blendv(r, zero, q == zero).store(w.g + j);
          }
        }
        for (; j < n; ++j) {
          const acc_t q = es[j] * sfs, p = et[j] * sft;
          w.g[j] = (div == KL) ? (q - p) * cg : (q == acc_t(0) ? acc_t(0) : q * (w.bs[j] - w.bt[j] + flt - fls - fD) * cg);
        }
        store_cast(w.g, gs + j0, n);
      }
      // teacher gradient
      if (gt != nullptr) {
        int64_t j = 0;
        if (div == KL) {
          // p (log p - log q - D) = p ((t - lse_t) - (s - lse_s) - D)
          const Vec k(fls - flt - fD), vc(cg);
          for (; j + Vec::size() <= n; j += Vec::size()) {
            const Vec p = Vec::loadu(et + j) * ft;
            const Vec r = p * (Vec::loadu(w.bt + j) - Vec::loadu(w.bs + j) + k) * vc;
            Vec::blendv(r, zero, p == zero).store(w.g + j);
          }
        } else {
          const Vec vc(cg);
          for (; j + Vec::size() <= n; j += Vec::size())
            ((Vec::loadu(et + j) * ft - Vec::loadu(es + j) * fs) * vc).store(w.g + j);
        }
        for (; j < n; ++j) {
          const acc_t q = es[j] * sfs, p = et[j] * sft;
          w.g[j] = (div == REVERSE_KL) ? (p - q) * cg : (p == acc_t(0) ? acc_t(0) : p * (w.bt[j] - w.bs[j] + fls - flt - fD) * cg);
        }
        store_cast(w.g, gt + j0, n);
      }
    }
    return double(c) * D;
  }

  // ---- JSD: pass 2 accumulates KL(p||m) and KL(q||m); pass 3 writes the gradients.
  const acc_t b1 = beta, b0 = acc_t(1) - beta;
  auto jsd_block = [&](int64_t b, int64_t n, acc_t* logm, acc_t* p, acc_t* q) {
    const int64_t j0 = b * kBlock;
    load_scaled(xs + j0, w.bs, n, inv_t);
    load_scaled(xt + j0, w.bt, n, inv_t);
    const acc_t fs = block_factor(w.ms[b], lse_s), ft = block_factor(w.mt[b], lse_t);
    const Vec vfs(fs), vft(ft), vb1(b1), vb0(b0);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec pv = Vec::loadu(w.et.data() + j0 + j) * vft, qv = Vec::loadu(w.es.data() + j0 + j) * vfs;
      pv.store(p + j);
      qv.store(q + j);
      (vb1 * pv + vb0 * qv).log().store(logm + j);
    }
    for (; j < n; ++j) {
      p[j] = w.et[j0 + j] * ft;
      q[j] = w.es[j0 + j] * fs;
      logm[j] = std::log(b1 * p[j] + b0 * q[j]);
    }
  };
  acc_t logm[kBlock], p[kBlock], q[kBlock];
  double klp = 0.0, klq = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t n = std::min(kBlock, V - b * kBlock);
    jsd_block(b, n, logm, p, q);
    acc_t sp = acc_t(0), sq = acc_t(0);
    for (int64_t j = 0; j < n; ++j) {
      sp += (p[j] == acc_t(0)) ? acc_t(0) : p[j] * ((w.bt[j] - flt) - logm[j]);
      sq += (q[j] == acc_t(0)) ? acc_t(0) : q[j] * ((w.bs[j] - fls) - logm[j]);
    }
    klp += sp;
    klq += sq;
  }
  D = double(b1) * klp + double(b0) * klq;
  if (gs != nullptr || gt != nullptr) {
    const acc_t fklp = static_cast<acc_t>(klp), fklq = static_cast<acc_t>(klq);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
      jsd_block(b, n, logm, p, q);
      if (gs != nullptr) {
        for (int64_t j = 0; j < n; ++j)
          w.g[j] = (q[j] == acc_t(0)) ? acc_t(0) : b0 * q[j] * ((w.bs[j] - fls) - logm[j] - fklq) * cg;
        store_cast(w.g, gs + j0, n);
      }
      if (gt != nullptr) {
        for (int64_t j = 0; j < n; ++j)
          w.g[j] = (p[j] == acc_t(0)) ? acc_t(0) : b1 * p[j] * ((w.bt[j] - flt) - logm[j] - fklp) * cg;
        store_cast(w.g, gt + j0, n);
      }
    }
  }
  return double(c) * D;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                const at::Tensor& row_scale, double temperature,
                                                                int64_t divergence, double beta, double loss_scale,
                                                                bool reduce, bool grad_student, bool grad_teacher) {
  FASTKD_CHECK_DIM(student, 2);
  FASTKD_CHECK_DIM(teacher, 2);
  FASTKD_CHECK_CONTIGUOUS(student);
  FASTKD_CHECK_CONTIGUOUS(teacher);
  FASTKD_CHECK_FLOATING(student);
  FASTKD_CHECK(student.sizes() == teacher.sizes(), "student_logits and teacher_logits must have the same shape, got ",
               student.sizes(), " and ", teacher.sizes());
  FASTKD_CHECK(student.scalar_type() == teacher.scalar_type(), "student_logits and teacher_logits must share a dtype, got ",
               student.scalar_type(), " and ", teacher.scalar_type());
  const bool is_double = student.scalar_type() == at::kDouble;
  FASTKD_CHECK(row_scale.scalar_type() == (is_double ? at::kDouble : at::kFloat) && row_scale.dim() == 1 &&
                   row_scale.size(0) == student.size(0),
               "row_scale must be [N] with N = ", student.size(0), " and dtype float32 (float64 for float64 logits), got ",
               row_scale.scalar_type(), " ", row_scale.sizes());
  FASTKD_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be positive and finite, got ", temperature);
  FASTKD_CHECK(divergence >= KL && divergence <= JSD, "divergence code must be 0 (kl), 1 (reverse_kl) or 2 (jsd)");
  FASTKD_CHECK(beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1], got ", beta);

  const int64_t N = student.size(0), V = student.size(1);
  auto rs = row_scale.contiguous();
  at::Tensor gs = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gt = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  at::Tensor rows = at::empty({N}, student.options().dtype(is_double ? at::kDouble : at::kFloat));

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
    // A row is ~10 V flops and 2 V exponentials: parallelise over rows, one row per task.
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
        prow[i] = static_cast<acc_t>(row_loss_and_grads<scalar_t, acc_t>(
            ps + off, pt + off, pgs ? pgs + off : nullptr, pgt ? pgt + off : nullptr, V, inv_t, divergence,
            static_cast<acc_t>(beta), c, w));
      }
    });
  });
  at::Tensor loss = reduce ? rows.sum() : rows;
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "distill_loss(Tensor student, Tensor teacher, Tensor row_scale, float temperature, int divergence, float beta, "
      "float loss_scale, bool reduce, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("distill_loss", &distill_loss_cpu); }

}  // namespace fastkd
