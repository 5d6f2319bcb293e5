// Host-side helpers declared in distill_loss.h, embedding_ascent.h, nearest_tokens.h and hidden_match.h: the checks of a
// direct torch.ops call and the row layout of strided operands, shared by the CPU kernels and the CUDA
// entry points. They are defined here, once, and not inline in the headers: an inline function
// included by both a C++ file and a .cu file is compiled twice, by the C++ compiler and by nvcc's host
// pass with other flags (no -fvisibility=hidden, no -DNDEBUG), and the linker keeps one copy for both
// callers, so the CPU kernels could run nvcc's. Here they are compiled by the C++ compiler only. (This
// was a suspect for the C++-exception crash of the first GPU runs; moving them did not cure it:
// benchmarks/results/nvidia-h200/NOTES.md.)
#include "distill_loss.h"
#include "embedding_ascent.h"
#include "hidden_match.h"
#include "nearest_tokens.h"

#include <cmath>

namespace fastkd {

void check_distill_loss_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_scale,
                             double temperature, int64_t divergence, double beta) {
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
}

}  // namespace fastkd

namespace fastkd::ascent {

int64_t row_stride(const at::Tensor& t) {
  const int64_t H = t.size(-1);
  if (H > 1 && t.stride(-1) != 1) return -1;
  int64_t rs = -1, expect = -1;
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (rs == -1) {
      rs = t.stride(i);
    } else if (t.stride(i) != expect) {
      return -1;
    }
    expect = t.stride(i) * t.size(i);
  }
  return rs == -1 ? H : rs;
}

Rows as_rows(const at::Tensor& x, bool writable) {
  const int64_t H = x.size(-1);
  const int64_t N = H == 0 ? 0 : x.numel() / H;
  const int64_t rs = row_stride(x);
  // A writable operand needs rows that do not overlap each other (rs >= H) unless there is one row.
  if (rs >= 0 && (!writable || N <= 1 || rs >= H)) return {x, at::Tensor(), rs};
  at::Tensor c = x.contiguous();
  return {c, writable ? x : at::Tensor(), H};
}

void check_writable(const at::Tensor& x, const char* name) {
  FASTKD_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, name,
               " has elements that share memory (e.g. an expanded tensor); the in-place update needs one "
               "memory location per element: pass a .clone()");
}

void check_group(const at::Tensor& embeds, const at::Tensor& grad, const std::optional<at::Tensor>& origin,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& buf, bool need_origin,
                 int64_t idx) {
  const std::string at_ = idx >= 0 ? "[" + std::to_string(idx) + "]" : "";
  FASTKD_CHECK(embeds.dim() >= 1, "embeds", at_, " must have shape [..., H], got a 0-d tensor");
  FASTKD_CHECK(at::isFloatingType(embeds.scalar_type()), "embeds", at_, " must be a floating-point tensor, got ",
               embeds.scalar_type());
  FASTKD_CHECK(grad.sizes() == embeds.sizes(), "grad", at_, " must have the shape of embeds ", embeds.sizes(), ", got ",
               grad.sizes());
  FASTKD_CHECK(grad.scalar_type() == embeds.scalar_type(), "grad", at_, " must have the dtype of embeds (",
               embeds.scalar_type(), "), got ", grad.scalar_type());
  FASTKD_CHECK_DEVICE(grad, embeds.device());
  check_writable(embeds, "embeds");
  if (need_origin) {
    FASTKD_CHECK(origin.has_value() && origin->defined(), "origin", at_, " is required when radius is given");
    FASTKD_CHECK(origin->sizes() == embeds.sizes(), "origin", at_, " must have the shape of embeds ", embeds.sizes(),
                 ", got ", origin->sizes());
    FASTKD_CHECK(origin->scalar_type() == embeds.scalar_type(), "origin", at_, " must have the dtype of embeds (",
                 embeds.scalar_type(), "), got ", origin->scalar_type());
    FASTKD_CHECK_DEVICE((*origin), embeds.device());
  }
  const int64_t H = embeds.size(-1);
  const int64_t N = H == 0 ? 0 : embeds.numel() / H;
  if (mask.has_value() && mask->defined()) {
    FASTKD_CHECK(mask->scalar_type() == at::kBool, "mask", at_, " must be a boolean tensor, got ", mask->scalar_type());
    FASTKD_CHECK(mask->numel() == N && mask->sizes() == embeds.sizes().slice(0, embeds.dim() - 1), "mask", at_,
                 " must have the leading shape of embeds ", embeds.sizes().slice(0, embeds.dim() - 1), ", got ",
                 mask->sizes());
    FASTKD_CHECK_DEVICE((*mask), embeds.device());
  }
  if (buf.has_value() && buf->defined()) {
    FASTKD_CHECK(buf->sizes() == embeds.sizes(), "momentum_buffer", at_, " must have the shape of embeds ",
                 embeds.sizes(), ", got ", buf->sizes());
    const auto acc = embeds.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    FASTKD_CHECK(buf->scalar_type() == embeds.scalar_type() || buf->scalar_type() == acc, "momentum_buffer", at_,
                 " must have the dtype of embeds (", embeds.scalar_type(), ") or ", acc, ", got ", buf->scalar_type());
    FASTKD_CHECK_DEVICE((*buf), embeds.device());
    check_writable(*buf, "momentum_buffer");
    const auto st = at::get_overlap_status(embeds, *buf);
    FASTKD_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, "momentum_buffer", at_,
                 " must not share memory with embeds");
  }
}

void check_scalars(double step_size, int64_t norm, std::optional<double> radius, std::optional<double> max_norm,
                   double momentum) {
  FASTKD_CHECK(std::isfinite(step_size) && step_size > 0, "step_size must be positive and finite, got ", step_size);
  FASTKD_CHECK(norm >= L2 && norm <= NONE, "norm code must be 0 (l2), 1 (linf / sign) or 2 (none), got ", norm);
  FASTKD_CHECK(!radius.has_value() || (std::isfinite(*radius) && *radius > 0), "radius must be positive and finite, got ",
               radius.value_or(0));
  FASTKD_CHECK(!max_norm.has_value() || (std::isfinite(*max_norm) && *max_norm > 0),
               "max_norm must be positive and finite, got ", max_norm.value_or(0));
  FASTKD_CHECK(std::isfinite(momentum) && momentum >= 0, "momentum must be finite and >= 0, got ", momentum);
}

Group make_group(const at::Tensor& embeds, const at::Tensor& grad, const std::optional<at::Tensor>& origin,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& buf, bool use_origin) {
  Group gr;
  gr.H = embeds.size(-1);
  gr.rows = gr.H == 0 ? 0 : embeds.numel() / gr.H;
  gr.e = as_rows(embeds, true);
  gr.g = as_rows(grad, false);
  if (use_origin) gr.o = as_rows(*origin, false);
  if (buf.has_value() && buf->defined()) gr.b = as_rows(*buf, true);
  if (mask.has_value() && mask->defined()) gr.m = mask->reshape({-1}).contiguous();
  return gr;
}

void bump_version(const at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void write_back(std::vector<Group>& groups, const std::vector<at::Tensor>& embeds,
                const std::vector<std::optional<at::Tensor>>& bufs) {
  for (auto& gr : groups) {
    if (gr.e.writeback.defined()) gr.e.writeback.copy_(gr.e.t);
    if (gr.b.writeback.defined()) gr.b.writeback.copy_(gr.b.t);
  }
  for (size_t i = 0; i < embeds.size(); ++i) {
    bump_version(embeds[i]);
    if (bufs[i].has_value() && bufs[i]->defined()) bump_version(*bufs[i]);
  }
}

Prepared prepare(const std::vector<at::Tensor>& embeds, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& origins,
                 const std::vector<std::optional<at::Tensor>>& masks,
                 const std::vector<std::optional<at::Tensor>>& bufs, double step_size, int64_t norm,
                 std::optional<double> radius, std::optional<double> max_norm, double momentum,
                 c10::DeviceType device_type) {
  check_scalars(step_size, norm, radius, max_norm, momentum);
  Prepared out;
  const int64_t G = static_cast<int64_t>(embeds.size());
  if (G == 0) return out;
  const bool multi = G > 1;
  out.dtype = embeds[0].scalar_type();
  for (int64_t i = 0; i < G; ++i) {
    check_group(embeds[i], grads[i], origins[i], masks[i], bufs[i], radius.has_value(), multi ? i : -1);
    FASTKD_CHECK(embeds[i].device().type() == device_type, "embeds must be ", device_type,
                 " tensors for this kernel, got ", embeds[i].device());
    FASTKD_CHECK(embeds[i].device() == embeds[0].device(), "embeds[", i, "] must be on embeds[0]'s device ",
                 embeds[0].device(), ", got ", embeds[i].device());
    FASTKD_CHECK(embeds[i].scalar_type() == out.dtype, "embeds[", i, "] must have the dtype of embeds[0] (", out.dtype,
                 "), got ", embeds[i].scalar_type());
    const bool hb = bufs[i].has_value() && bufs[i]->defined();
    FASTKD_CHECK(i == 0 || hb == out.has_buf, "momentum_buffers must be given for every tensor or for none");
    FASTKD_CHECK(!hb || i == 0 || bufs[i]->scalar_type() == bufs[0]->scalar_type(),
                 "momentum_buffers must share one dtype");
    out.has_buf = hb;
  }
  out.buf_same = !out.has_buf || bufs[0]->scalar_type() == out.dtype;
  out.groups.reserve(G);
  for (int64_t i = 0; i < G; ++i)
    out.groups.push_back(make_group(embeds[i], grads[i], origins[i], masks[i], bufs[i], radius.has_value()));
  return out;
}

Lists unpack_lists(at::TensorList embeds, at::TensorList grads, at::TensorList origins,
                   const c10::List<std::optional<at::Tensor>>& masks, at::TensorList momentum_buffers) {
  const size_t G = embeds.size();
  FASTKD_CHECK(grads.size() == G, "grads must have one tensor per embeds tensor (", G, "), got ", grads.size());
  FASTKD_CHECK(origins.empty() || origins.size() == G, "origins must be empty or have one tensor per embeds tensor (",
               G, "), got ", origins.size());
  FASTKD_CHECK(masks.empty() || masks.size() == G, "masks must be empty or have one entry per embeds tensor (", G,
               "), got ", masks.size());
  FASTKD_CHECK(momentum_buffers.empty() || momentum_buffers.size() == G,
               "momentum_buffers must be empty or have one tensor per embeds tensor (", G, "), got ",
               momentum_buffers.size());
  Lists l;
  l.e.assign(embeds.begin(), embeds.end());
  l.g.assign(grads.begin(), grads.end());
  l.o.resize(G);
  l.m.resize(G);
  l.b.resize(G);
  for (size_t i = 0; i < G; ++i) {
    if (!origins.empty()) l.o[i] = origins[i];
    if (!masks.empty()) l.m[i] = masks.get(i);
    if (!momentum_buffers.empty()) l.b[i] = momentum_buffers[i];
  }
  return l;
}

}  // namespace fastkd::ascent

namespace fastkd::nearest {

void check_inputs(const at::Tensor& embeds, const at::Tensor& embedding_matrix, int64_t k, int64_t metric) {
  FASTKD_CHECK_DIM(embeds, 2);
  FASTKD_CHECK_DIM(embedding_matrix, 2);
  FASTKD_CHECK_FLOATING(embeds);
  FASTKD_CHECK_DEVICE(embedding_matrix, embeds.device());
  FASTKD_CHECK(embedding_matrix.scalar_type() == embeds.scalar_type(), "embedding_matrix must have the dtype of embeds (",
               embeds.scalar_type(), "), got ", embedding_matrix.scalar_type());
  FASTKD_CHECK(embedding_matrix.size(1) == embeds.size(1), "embedding_matrix must be [V, H] with H = ", embeds.size(1),
               " (embeds' last dimension), got ", embedding_matrix.sizes());
  const int64_t V = embedding_matrix.size(0);
  FASTKD_CHECK(k >= 1 && k <= V, "k must be in [1, V] with V = ", V, " (embedding_matrix rows), got ", k);
  FASTKD_CHECK(metric >= COSINE && metric <= L2DIST, "metric code must be 0 (cosine), 1 (dot) or 2 (l2), got ", metric);
}

}  // namespace fastkd::nearest

namespace fastkd {

void check_hidden_match_args(const at::Tensor& student, const at::Tensor& teacher,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& row_scale, int64_t loss, double eps) {
  FASTKD_CHECK_DIM(student, 3);
  FASTKD_CHECK_DIM(teacher, 3);
  FASTKD_CHECK_CONTIGUOUS(student);
  FASTKD_CHECK_CONTIGUOUS(teacher);
  FASTKD_CHECK_FLOATING(student);
  FASTKD_CHECK(student.scalar_type() == teacher.scalar_type(), "student and teacher must share a dtype, got ",
               student.scalar_type(), " and ", teacher.scalar_type());
  FASTKD_CHECK_DEVICE(teacher, student.device());
  FASTKD_CHECK(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
               "student [L, N, Hs] and teacher [L, N, Ht] must agree on L and N, got ", student.sizes(), " and ",
               teacher.sizes());
  const int64_t L = student.size(0), N = student.size(1), Hs = student.size(2), Ht = teacher.size(2);
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w) {
    const auto& W = *weight;
    FASTKD_CHECK_CONTIGUOUS(W);
    FASTKD_CHECK_DEVICE(W, student.device());
    FASTKD_CHECK(W.scalar_type() == student.scalar_type(), "weight must have the student's dtype ",
                 student.scalar_type(), ", got ", W.scalar_type());
    FASTKD_CHECK((W.dim() == 3 && W.size(0) == L && W.size(1) == Ht && W.size(2) == Hs) ||
                     (W.dim() == 2 && W.size(0) == Ht && W.size(1) == Hs),
                 "weight must be [L, Ht, Hs] = [", L, ", ", Ht, ", ", Hs, "] or [Ht, Hs], got ", W.sizes());
  } else {
    FASTKD_CHECK(Hs == Ht, "without a weight the student and teacher widths must match, got ", Hs, " and ", Ht);
  }
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    FASTKD_CHECK_CONTIGUOUS(b);
    FASTKD_CHECK_DEVICE(b, student.device());
    FASTKD_CHECK(b.scalar_type() == student.scalar_type(), "bias must have the student's dtype ",
                 student.scalar_type(), ", got ", b.scalar_type());
    FASTKD_CHECK((b.dim() == 2 && b.size(0) == L && b.size(1) == Ht) || (b.dim() == 1 && b.size(0) == Ht),
                 "bias must be [L, Ht] or [Ht] with Ht = ", Ht, ", got ", b.sizes());
  }
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  FASTKD_CHECK(row_scale.scalar_type() == acc && row_scale.dim() == 2 && row_scale.size(0) == L &&
                   row_scale.size(1) == N && row_scale.is_contiguous(),
               "row_scale must be a contiguous [L, N] = [", L, ", ", N, "] tensor of dtype ", acc, ", got ",
               row_scale.scalar_type(), " ", row_scale.sizes());
  FASTKD_CHECK_DEVICE(row_scale, student.device());
  FASTKD_CHECK(loss >= HM_MSE && loss <= HM_NMSE, "loss code must be 0 (mse), 1 (cosine) or 2 (nmse), got ", loss);
  FASTKD_CHECK(eps > 0 && std::isfinite(eps), "eps must be positive and finite, got ", eps);
}

}  // namespace fastkd
