// fastkd::hidden_match — fused multi-layer hidden-state matching (projection + MSE / cosine / NMSE),
// CUDA implementation: the schedule, the cuBLAS calls and the registration. The row kernel is in
// hidden_match.cuh, the per-row math in hidden_match_math.h (shared with the CPU kernel in
// hidden_match.cpp); the Triton version is kernels/hidden_match.py.
//
// Schedule: layers go in groups of G (all L at once unless one projected layer group would exceed
// kGroupBytes). Per group, with cuBLAS through ATen (tensor cores for bf16/fp16, fp32 accumulation):
//   P   = S W^T                  one bmm (per-layer W) or one mm over G*N rows (shared W)
//   row kernel                   one launch for the group: bias, loss, dP in place over P, dT
//   dS  = dP W                   one bmm / mm straight into the dS output
//   dW  = dP^T S                 one bmm into dW (per layer), or mm over all G*N rows (shared)
//   db  = colsum(dP)             one fp32 reduction
// P lives in a [G, N, Ht] buffer (input dtype) only during the call; the gradients are complete when
// the forward returns, so backward is an in-place scale. Offsets are int64.
#include "hidden_match.h"

#include "cuda_common.cuh"
#include "hidden_match.cuh"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastkd {
namespace {

using hidden_cuda::kThreads;
constexpr int64_t kGroupBytes = int64_t(256) << 20;  // P buffer of one layer group
constexpr int64_t kMaxGrid = (int64_t(1) << 31) - 1;  // the row kernel grid-strides over the rest

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_match_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& row_scale, int64_t loss, double eps, bool reduce,
    bool grad_student, bool grad_weight, bool grad_bias, bool grad_teacher) {
  check_hidden_match_args(student, teacher, weight, bias, row_scale, loss, eps);
  FASTKD_CHECK(student.is_cuda(), "student must be a CUDA tensor, got ", student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  grad_weight = grad_weight && has_w;
  grad_bias = grad_bias && has_b;
  const int64_t L = student.size(0), N = student.size(1), Hs = student.size(2), Ht = teacher.size(2);
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = student.options().dtype(acc);
  at::Tensor rows = at::empty({L, N}, acc_opts);
  at::Tensor gS = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gT = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  const bool shared_w = has_w && weight->dim() == 2;
  const bool shared_b = has_b && bias->dim() == 1;
  at::Tensor gW = grad_weight ? (shared_w ? at::zeros(weight->sizes(), acc_opts) : at::empty_like(*weight))
                              : at::empty({0}, student.options());
  at::Tensor gb = grad_bias ? at::zeros(bias->sizes(), acc_opts) : at::Tensor();
  const bool need_dp = grad_student || grad_weight || grad_bias;

  const int64_t layer_bytes = std::max<int64_t>(1, N * Ht * int64_t(student.element_size()));
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(L, kGroupBytes / layer_bytes));
  const bool need_buf = has_w || (need_dp && !grad_student);
  at::Tensor buf = (need_buf && L > 0 && N > 0) ? at::empty({G, N, Ht}, student.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();

  for (int64_t l0 = 0; l0 < L && N > 0; l0 += G) {
    const int64_t g = std::min(G, L - l0);
    const at::Tensor Sg = student.narrow(0, l0, g);
    at::Tensor dS = grad_student ? gS.narrow(0, l0, g) : at::Tensor();
    at::Tensor P;   // the projected rows (without bias) the row kernel reads
    at::Tensor dP;  // where the row kernel writes dP
    if (has_w) {
      P = buf.narrow(0, 0, g);
      if (shared_w) {
        at::Tensor P2 = P.view({g * N, Ht});
        at::mm_out(P2, Sg.reshape({g * N, Hs}), weight->t());
      } else {
        at::bmm_out(P, Sg, weight->narrow(0, l0, g).transpose(1, 2));
      }
      if (need_dp) dP = P;
    } else {
      P = Sg;
      if (need_dp) dP = grad_student ? dS : buf.narrow(0, 0, g);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastkd_hidden_match_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      hidden_cuda::RowParams<scalar_t, acc_t> p;
      p.p = P.data_ptr<scalar_t>();
      p.bias = has_b ? bias->data_ptr<scalar_t>() + (shared_b ? 0 : l0 * Ht) : nullptr;
      p.bias_stride = shared_b ? 0 : Ht;
      p.t = teacher.data_ptr<scalar_t>() + l0 * N * Ht;
      p.rs = row_scale.data_ptr<acc_t>() + l0 * N;
      p.dp = dP.defined() ? dP.data_ptr<scalar_t>() : nullptr;
      p.dt = grad_teacher ? gT.data_ptr<scalar_t>() + l0 * N * Ht : nullptr;
      p.loss_rows = rows.data_ptr<acc_t>() + l0 * N;
      p.R = g * N;
      p.N = N;
      p.H = Ht;
      p.loss = loss;
      p.eps = static_cast<acc_t>(eps);
      const int64_t blocks = std::min<int64_t>(g * N, kMaxGrid);
      hidden_cuda::hm_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (grad_student && has_w) {
      if (shared_w) {
        at::Tensor dS2 = dS.view({g * N, Hs});
        at::mm_out(dS2, dP.view({g * N, Ht}), *weight);
      } else {
        at::bmm_out(dS, dP, weight->narrow(0, l0, g));
      }
    }
    if (grad_weight) {
      if (shared_w) {
        gW.add_(at::mm(dP.view({g * N, Ht}).t(), Sg.reshape({g * N, Hs})));
      } else {
        at::Tensor gWg = gW.narrow(0, l0, g);
        at::bmm_out(gWg, dP.transpose(1, 2), Sg);
      }
    }
    if (grad_bias) {
      if (shared_b) {
        gb.add_(dP.view({g * N, Ht}).sum(0, false, acc));
      } else {
        gb.narrow(0, l0, g).copy_(dP.sum(1, false, acc));
      }
    }
  }
  if (N == 0 && grad_weight && !shared_w) gW.zero_();
  at::Tensor out_gW = (grad_weight && shared_w) ? gW.to(weight->scalar_type()) : gW;
  at::Tensor out_gb = grad_bias ? gb.to(bias->scalar_type()) : at::empty({0}, student.options());
  at::Tensor out = reduce ? rows.sum() : rows;
  return {out, gS, out_gW, out_gb, gT};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("hidden_match", &hidden_match_cuda); }

}  // namespace fastkd
