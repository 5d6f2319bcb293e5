// fastkd::topk_distill — forward KL(teacher || student) against a sparse (top-K) teacher, CPU kernel.
// The CUDA kernel is in topk_distill_cuda.cu, the Triton kernel in kernels/topk_distill.py, the reference
// in fastkd/ops/topk_distill.py.
//
// Math, per row (student logits x [V], teacher ids k_1..k_K (distinct) and teacher logits y_1..y_K
// at those ids, temperature T, c = loss_scale * row_scale[i]):
//   s = x / T, lse_s = logsumexp(s) over all V, q_j = exp(s_j - lse_s)  (the student, full softmax)
//   t_k = y_k / T
//   without teacher_logsumexp:  p_k = exp(t_k - logsumexp_k(t))        (top-K renormalised, r = 0)
//   with    teacher_logsumexp L (the logsumexp over the full vocabulary of the teacher logits / T):
//                               p_k = exp(t_k - L),  r = max(0, 1 - sum_k p_k)  (the teacher's tail mass)
//   q_tail = 1 - sum_k q_{k_k}                                                (the student's tail mass)
//   D = sum_k p_k (log p_k - log q_{k_k})  +  r log(r / q_tail)     (the last term only when r > 0;
//       r <= 1e-6 (1e-12 in double) is rounding, e.g. with K = V, and counts as 0)
// Gradient with respect to s (P = sum p_k, Q = sum q_{k_k}, P + r = 1):
//   d/ds_j sum_k p_k log q_{k_k} = p~_j - P q_j              (p~ = p scattered to the ids, 0 elsewhere)
//   d/ds_j log q_tail = -q_j ([j in ids] - Q) / q_tail
//   so  dD/ds_j = q_j - p_k               for j = k_k (an id)
//       dD/ds_j = q_j (1 - r / q_tail)    for j not an id (the teacher's tail mass spread like the student's)
//   loss_i = c D_i, and the gradient written is c/T dD/ds (chain rule through 1/T).
// One pass over the student row for its logsumexp (max, then sum of exponentials, on a per-thread
// float copy of s that stays in L2), K gathers, and one pass writing the gradient. A row whose
// row_scale is 0 is not read: loss 0, gradient 0. P, Q, q_tail and r are accumulated in double
// (q_tail = 1 - Q loses relative precision only when the student's tail mass is below ~1e-7).
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

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp_(const at::vec::Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) return v.exp_u20(); else return v.exp();
}

// s = x * inv_t into buf; returns (max, sum exp(s - max)).
template <typename scalar_t, typename acc_t>
inline void row_lse(const scalar_t* x, acc_t* buf, int64_t V, acc_t inv_t, acc_t& m_out, double& lse_out) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vm(kNegInf<acc_t>);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const Vec vi(inv_t);
    for (; j + Vec::size() <= V; j += Vec::size()) {
      const Vec v = Vec::loadu(x + j) * vi;
      v.store(buf + j);
      vm = at::vec::maximum(vm, v);
    }
  }
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  for (; j < V; ++j) {
    buf[j] = static_cast<acc_t>(x[j]) * inv_t;
    m = (buf[j] > m || std::isnan(buf[j])) ? buf[j] : m;
  }
  const acc_t shift = (m == kNegInf<acc_t>) ? acc_t(0) : m;
  const Vec vs(shift);
  Vec acc(acc_t(0));
  j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) acc = acc + vexp_<acc_t>(Vec::loadu(buf + j) - vs);
  double z = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < V; ++j) z += std::exp(double(buf[j]) - double(shift));
  m_out = shift;
  lse_out = double(shift) + std::log(z);
}

template <typename scalar_t, typename acc_t>
void topk_rows(const scalar_t* ps, const int64_t* pid, const acc_t* pv, const acc_t* plse, const acc_t* prs,
               acc_t* prow, scalar_t* pg, int64_t N, int64_t V, int64_t K, double temperature, double loss_scale) {
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(V);
    std::vector<double> logp(K), logq(K);
    using Vec = at::vec::Vectorized<acc_t>;
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t off = i * V;
      const double c = loss_scale * double(prs[i]);
      if (c == 0.0) {
        prow[i] = 0;
        if (pg) std::fill(pg + off, pg + off + V, scalar_t(0));
        continue;
      }
      acc_t m;
      double lse_s;
      row_lse<scalar_t, acc_t>(ps + off, buf.data(), V, inv_t, m, lse_s);
      const int64_t* id = pid + i * K;
      const acc_t* tv = pv + i * K;
      // teacher log-probabilities at the ids
      double lse_t;
      if (plse != nullptr) {
        lse_t = double(plse[i]);
      } else {
        double tm = -std::numeric_limits<double>::infinity();
        for (int64_t k = 0; k < K; ++k) tm = std::max(tm, double(tv[k]) * double(inv_t));
        const double sh = std::isinf(tm) && tm < 0 ? 0.0 : tm;
        double z = 0.0;
        for (int64_t k = 0; k < K; ++k) z += std::exp(double(tv[k]) * double(inv_t) - sh);
        lse_t = sh + std::log(z);
      }
      double P = 0.0, Q = 0.0, D = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        logp[k] = double(tv[k]) * double(inv_t) - lse_t;
        logq[k] = double(buf[id[k]]) - lse_s;
        const double p = std::exp(logp[k]);
        P += p;
        Q += std::exp(logq[k]);
        if (p != 0.0) D += p * (logp[k] - logq[k]);
      }
      double r = 0.0, qtail = std::max(0.0, 1.0 - Q);
      if (plse != nullptr) {
        r = std::max(0.0, 1.0 - P);
        if (r <= (std::is_same_v<acc_t, double> ? 1e-12 : 1e-6)) r = 0.0;
        if (r > 0.0) D += r * (std::log(r) - std::log(qtail));
      }
      prow[i] = static_cast<acc_t>(c * D);
      if (pg == nullptr) continue;
      // tail: c/T q_j (1 - r/q_tail); ids overwritten below with c/T (q_j - p_k)
      const double cg = c * double(inv_t);
      const double f = (r > 0.0) ? 1.0 - r / qtail : 1.0;
      const acc_t scale = static_cast<acc_t>(cg * f);
      const acc_t lsef = static_cast<acc_t>(lse_s);
      scalar_t* g = pg + off;
      int64_t j = 0;
      const Vec vl(lsef), vsc(scale);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        for (; j + Vec::size() <= V; j += Vec::size()) (vexp_<acc_t>(Vec::loadu(buf.data() + j) - vl) * vsc).store(g + j);
      }
      for (; j < V; ++j) g[j] = static_cast<scalar_t>(std::exp(buf[j] - lsef) * scale);
      for (int64_t k = 0; k < K; ++k) g[id[k]] = static_cast<scalar_t>(cg * (std::exp(logq[k]) - std::exp(logp[k])));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_distill_cpu(const at::Tensor& student, const at::Tensor& ids,
                                                    const at::Tensor& teacher, const c10::optional<at::Tensor>& lse,
                                                    const at::Tensor& row_scale, double temperature, double loss_scale,
                                                    bool reduce, bool grad_student) {
  FASTKD_CHECK_DIM(student, 2);
  FASTKD_CHECK_DIM(ids, 2);
  FASTKD_CHECK_DIM(teacher, 2);
  FASTKD_CHECK_CONTIGUOUS(student);
  FASTKD_CHECK_CONTIGUOUS(ids);
  FASTKD_CHECK_CONTIGUOUS(teacher);
  FASTKD_CHECK_FLOATING(student);
  const int64_t N = student.size(0), V = student.size(1), K = ids.size(1);
  const bool is_double = student.scalar_type() == at::kDouble;
  const auto acc = is_double ? at::kDouble : at::kFloat;
  FASTKD_CHECK(ids.scalar_type() == at::kLong && ids.size(0) == N, "teacher_ids must be int64 [N, K] with N = ", N,
               ", got ", ids.scalar_type(), " ", ids.sizes());
  FASTKD_CHECK(teacher.scalar_type() == acc && teacher.sizes() == ids.sizes(), "teacher_logits must be ", acc,
               " with the shape of teacher_ids ", ids.sizes(), ", got ", teacher.scalar_type(), " ", teacher.sizes());
  FASTKD_CHECK(!lse.has_value() || (lse->scalar_type() == acc && lse->dim() == 1 && lse->size(0) == N &&
                                    lse->is_contiguous()),
               "teacher_logsumexp must be a contiguous ", acc, " [N] tensor with N = ", N);
  FASTKD_CHECK(row_scale.scalar_type() == acc && row_scale.dim() == 1 && row_scale.size(0) == N,
               "row_scale must be [N] with N = ", N, " and dtype ", acc, ", got ", row_scale.scalar_type(), " ",
               row_scale.sizes());
  FASTKD_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be positive and finite, got ", temperature);
  FASTKD_CHECK(K >= 1 && K <= V, "teacher_ids must have 1 <= K <= V = ", V, " columns, got ", K);
  auto rs = row_scale.contiguous();
  at::Tensor g = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor rows = at::empty({N}, student.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastkd_topk_distill_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    topk_rows<scalar_t, acc_t>(student.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), teacher.data_ptr<acc_t>(),
                               lse.has_value() ? lse->data_ptr<acc_t>() : nullptr, rs.data_ptr<acc_t>(),
                               rows.data_ptr<acc_t>(), grad_student ? g.data_ptr<scalar_t>() : nullptr, N, V, K,
                               temperature, loss_scale);
  });
  at::Tensor loss = reduce ? rows.sum() : rows;
  return {loss, g};
}

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "topk_distill(Tensor student, Tensor ids, Tensor teacher, Tensor? lse, Tensor row_scale, float temperature, "
      "float loss_scale, bool reduce, bool grad_student) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("topk_distill", &topk_distill_cpu); }

}  // namespace fastkd
