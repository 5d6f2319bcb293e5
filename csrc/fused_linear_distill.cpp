// fastkd::fused_linear_distill — lm_head + distillation loss without the [N, V] logits.
//
// The chunk loop, for rows [r0, r0 + C) of the hidden states (C = chunk):
//   S = h_s[r0:] W_s^T + b_s                     (ATen GEMM, [C, V])
//   T = h_t[r0:] W_t^T + b_t | teacher_logits[r0:] | (teacher top-K ids, logits, logsumexp)[r0:]
//   loss rows, dL/dS (, dL/dT) = fastkd::distill_loss(S, T, row_scale[r0:], ...)   (the fused
//       softmax-divergence kernel of distill_loss.cpp / .cu, through the dispatcher)
//     or fastkd::topk_distill(S, ids, logits, lse, ...)                             (topk_distill.cpp / .cu)
//   dL/dh_s[r0:] = dL/dS W_s,   dL/dW_s += dL/dS^T h_s[r0:],   dL/db_s += sum_rows dL/dS
//   (and the same on the teacher side when its gradients are asked for).
// The gradients are computed in the forward pass and already carry the reduction weights
// (row_scale) and loss_scale; the autograd backward (fastkd/ops/fused_linear_distill.py) scales them
// by the upstream gradient. Peak extra memory: the C x V chunk buffers (S, T and their gradients)
// plus the gradient buffers of the inputs. Weight and bias gradients of bfloat16 / float16 inputs
// are accumulated across chunks in float32 and rounded once.
//
// The loop only calls ATen and dispatcher ops, so the same code serves CPU and CUDA tensors: each
// chunk's GEMMs and kernel run on the tensors' device (on CUDA asynchronously, on the current stream).
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <vector>

namespace fastkd {
namespace {

using DistillSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, double, int64_t, double, double,
                                                                   bool, bool, bool);
using TopkSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&, const at::Tensor&, double, double,
                                                   bool, bool);

at::Tensor linear_chunk(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  if (b.has_value() && b->defined()) return at::addmm(*b, h, w.t());
  return at::mm(h, w.t());
}

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

struct SideGrads {
  at::Tensor h, w, b;          // results (h in the input dtype; w, b accumulated in acc then cast)
  at::ScalarType out_dtype;
  bool low_precision = false;
  void init(const at::Tensor& hid, const at::Tensor& weight, bool with_bias) {
    out_dtype = weight.scalar_type();
    low_precision = out_dtype != at::kFloat && out_dtype != at::kDouble;
    const auto acc = low_precision ? weight.options().dtype(at::kFloat) : weight.options();
    h = at::empty_like(hid);
    w = at::zeros(weight.sizes(), acc);
    b = with_bias ? at::zeros({weight.size(0)}, acc) : at::empty({0}, weight.options());
  }
  void add(const at::Tensor& g, const at::Tensor& hid, const at::Tensor& weight, int64_t r0, int64_t n, bool with_bias) {
    auto hc = h.narrow(0, r0, n);
    at::mm_out(hc, g, weight);
    if (low_precision) {
      w.add_(at::mm(g.t(), hid));
    } else {
      w.addmm_(g.t(), hid);
    }
    if (with_bias) b.add_(g.sum(0, false, w.scalar_type()));
  }
  void finish(const at::Tensor& weight) {
    if (low_precision) {
      w = w.to(out_dtype);
      if (b.numel() > 0) b = b.to(out_dtype);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_distill(const at::Tensor& hs, const at::Tensor& ws, const c10::optional<at::Tensor>& bs,
                     const c10::optional<at::Tensor>& ht, const c10::optional<at::Tensor>& wt,
                     const c10::optional<at::Tensor>& bt, const c10::optional<at::Tensor>& tlogits,
                     const c10::optional<at::Tensor>& tids, const c10::optional<at::Tensor>& tvals,
                     const c10::optional<at::Tensor>& tlse, const at::Tensor& row_scale, double temperature,
                     int64_t divergence, double beta, double loss_scale, bool reduce, int64_t chunk,
                     bool grad_student_in, bool grad_teacher_in) {
  // Gradients are computed only for a reduced loss; without reduce the autograd backward reruns
  // this loop, reduced, with the upstream per-row gradient folded into row_scale.
  const bool grad_student = grad_student_in && reduce, grad_teacher = grad_teacher_in && reduce;
  FASTKD_CHECK_DIM(hs, 2);
  FASTKD_CHECK_DIM(ws, 2);
  FASTKD_CHECK_FLOATING(hs);
  FASTKD_CHECK(hs.size(1) == ws.size(1), "student_weight must be [V, Hs] with Hs = ", hs.size(1), ", got ", ws.sizes());
  FASTKD_CHECK(hs.scalar_type() == ws.scalar_type(), "student_hidden and student_weight must share a dtype, got ",
               hs.scalar_type(), " and ", ws.scalar_type());
  FASTKD_CHECK(chunk >= 1, "chunk_size must be >= 1, got ", chunk);
  const bool linear = has(ht) && has(wt), logits = has(tlogits), topk = has(tids) && has(tvals);
  FASTKD_CHECK(int(linear) + int(logits) + int(topk) == 1,
               "exactly one teacher is needed: (teacher_hidden, teacher_weight), teacher_logits or teacher_topk");
  FASTKD_CHECK(!(topk && grad_teacher), "teacher_topk has no gradient (grad_teacher must be false)");
  const int64_t N = hs.size(0), V = ws.size(0);
  if (linear) {
    FASTKD_CHECK_DIM((*ht), 2);
    FASTKD_CHECK(ht->size(0) == N && wt->size(0) == V && ht->size(1) == wt->size(1),
                 "teacher_hidden must be [N, Ht] and teacher_weight [V, Ht] with N = ", N, ", V = ", V, ", got ",
                 ht->sizes(), " and ", wt->sizes());
    FASTKD_CHECK(ht->scalar_type() == hs.scalar_type() && wt->scalar_type() == hs.scalar_type(),
                 "the teacher's hidden states and weight must have the student's dtype ", hs.scalar_type());
  }
  if (logits) {
    FASTKD_CHECK(tlogits->dim() == 2 && tlogits->size(0) == N && tlogits->size(1) == V && tlogits->is_contiguous() &&
                     tlogits->scalar_type() == hs.scalar_type(),
                 "teacher_logits must be contiguous [N, V] = [", N, ", ", V, "] of dtype ", hs.scalar_type());
  }
  const bool is_double = hs.scalar_type() == at::ScalarType::Double;
  const at::ScalarType acc_type = is_double ? at::ScalarType::Double : at::ScalarType::Float;
  FASTKD_CHECK(row_scale.dim() == 1 && row_scale.size(0) == N && row_scale.scalar_type() == acc_type,
               "row_scale must be [N] with N = ", N, " and dtype ", acc_type, " for ", hs.scalar_type(),
               " inputs, got ", row_scale.scalar_type(), " ", row_scale.sizes());

  const c10::OptionalDeviceGuard guard(hs.device());
  // This kernel runs below autograd; the ATen calls inside must not record a graph.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  static auto distill_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastkd::distill_loss", "").typed<DistillSig>();
  static auto topk_op = c10::Dispatcher::singleton().findSchemaOrThrow("fastkd::topk_distill", "").typed<TopkSig>();

  const auto hs_c = hs.contiguous();
  const auto ws_c = ws.contiguous();
  at::Tensor ht_c, wt_c;
  if (linear) {
    ht_c = ht->contiguous();
    wt_c = wt->contiguous();
  }
  at::Tensor rows = at::empty({N}, hs.options().dtype(acc_type));
  SideGrads gs, gt;
  const bool bias_s = has(bs), bias_t = linear && has(bt);
  if (grad_student) gs.init(hs_c, ws_c, bias_s);
  const bool grad_t_linear = grad_teacher && linear, grad_t_logits = grad_teacher && logits;
  if (grad_t_linear) gt.init(ht_c, wt_c, bias_t);
  at::Tensor g_tl = grad_t_logits ? at::empty_like(*tlogits) : at::empty({0}, hs.options());

  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t n = std::min(chunk, N - r0);
    const auto h = hs_c.narrow(0, r0, n);
    const auto S = linear_chunk(h, ws_c, bs);
    const auto rs = row_scale.narrow(0, r0, n);
    at::Tensor loss_c, g_s, g_t;
    if (topk) {
      c10::optional<at::Tensor> lse_c;
      if (has(tlse)) lse_c = tlse->narrow(0, r0, n);
      std::tie(loss_c, g_s) = topk_op.call(S, tids->narrow(0, r0, n), tvals->narrow(0, r0, n), lse_c, rs, temperature,
                                           loss_scale, false, grad_student);
    } else {
      const at::Tensor hts = linear ? ht_c.narrow(0, r0, n) : at::Tensor();
      const at::Tensor T = linear ? linear_chunk(hts, wt_c, bt) : tlogits->narrow(0, r0, n);
      std::tie(loss_c, g_s, g_t) = distill_op.call(S, T, rs, temperature, divergence, beta, loss_scale, false,
                                                   grad_student, grad_teacher);
      if (grad_t_linear) gt.add(g_t, hts, wt_c, r0, n, bias_t);
      if (grad_t_logits) g_tl.narrow(0, r0, n).copy_(g_t);
    }
    rows.narrow(0, r0, n).copy_(loss_c);
    if (grad_student) gs.add(g_s, h, ws_c, r0, n, bias_s);
  }
  if (grad_student) gs.finish(ws_c);
  if (grad_t_linear) gt.finish(wt_c);
  // every output its own tensor (no two outputs alias)
  auto empty = [&] { return at::empty({0}, hs.options()); };
  at::Tensor loss = reduce ? rows.sum() : rows;
  return {loss,
          grad_student ? gs.h : empty(),
          grad_student ? gs.w : empty(),
          grad_student && bias_s ? gs.b : empty(),
          grad_t_linear ? gt.h : empty(),
          grad_t_linear ? gt.w : empty(),
          grad_t_linear && bias_t ? gt.b : empty(),
          g_tl};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "fused_linear_distill(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, "
      "Tensor? teacher_ids, Tensor? teacher_topk_logits, Tensor? teacher_logsumexp, Tensor row_scale, "
      "float temperature, int divergence, float beta, float loss_scale, bool reduce, int chunk, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("fused_linear_distill", &fused_linear_distill); }

#ifdef FASTKD_WITH_CUDA
// The same chunk loop: its GEMMs and the per-chunk distill_loss / topk_distill kernels run on CUDA.
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("fused_linear_distill", &fused_linear_distill); }
#endif

}  // namespace fastkd
