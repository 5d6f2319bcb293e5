// fastkd::hidden_match — fused multi-layer hidden-state matching (projection + MSE / cosine / NMSE),
// CUDA kernel. The loss math and gradient coefficients are in hidden_match.h (shared with the CPU
// kernel in hidden_match.cpp); the Triton version is kernels/hidden_match.py.
//
// Schedule: layers go in groups of G (all L at once unless one projected layer group would exceed
// kGroupBytes). Per group, with cuBLAS through ATen (tensor cores for bf16/fp16, fp32 accumulation):
//   P   = S W^T                  one bmm (per-layer W) or one mm over G*N rows (shared W)
//   row kernel                   one launch for the group: bias, loss, dP in place over P, dT
//   dS  = dP W                   one bmm / mm straight into the dS output
//   dW  = dP^T S                 one bmm into dW (per layer), or mm over all G*N rows (shared)
//   db  = colsum(dP)             one fp32 reduction
// P lives in a [G, N, Ht] buffer (input dtype) only during the call; the gradients are complete when
// the forward returns, so backward is an in-place scale. The row kernel is one block per row: a
// strided pass for the sums (|P|^2, |T|^2, P.T or sum (P-T)^2), a block reduction, and a second
// pass writing dP / dT (MSE needs no second pass). Offsets are int64.
#include "hidden_match.h"

#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>

namespace fastkd {
namespace {

constexpr int kThreads = 256;

// The current CUDA stream of a device, through c10's device-generic interface (so this file builds
// against any torch's headers, including a CPU-only install's, for the nvcc compile check).
cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}
constexpr int64_t kGroupBytes = int64_t(256) << 20;  // P buffer of one layer group

// Sum over the block, the same order on every run (no atomics); every thread gets the result.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with `shared`
  if (lane == 0) shared[wid] = v;
  __syncthreads();
  acc_t r = acc_t(0);
  for (int i = 0; i < int(blockDim.x >> 5); ++i) r += shared[i];
  return r;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) hm_rows_kernel(
    const scalar_t* p,                  // [R, H] projected rows without bias (or the student rows: no projection)
    const scalar_t* __restrict__ bias,  // bias [L, H] / [H] (layer stride bias_stride), or nullptr
    int64_t bias_stride,
    const scalar_t* __restrict__ t,     // [R, H] teacher rows
    const acc_t* __restrict__ rs,       // [R] row_scale (0 = excluded row)
    scalar_t* dp,                       // out: [R, H] dP (may alias p: element j is read then written by one thread), or nullptr
    scalar_t* __restrict__ dt,          // out: [R, H] teacher gradient, or nullptr
    acc_t* __restrict__ loss_rows,      // out: [R] w * loss
    int64_t N, int64_t H, int64_t loss, acc_t eps) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t r = blockIdx.x;  // row within the group, int64 from here on
  const int64_t layer = r / N;   // layer within the group (the bias pointer is already offset to the group)
  const int64_t o = r * H;
  const acc_t w = rs[r];
  if (w == acc_t(0)) {  // excluded row: loss 0, zero gradients, nothing read
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      if (dp) dp[o + j] = scalar_t(0);
      if (dt) dt[o + j] = scalar_t(0);
    }
    if (threadIdx.x == 0) loss_rows[r] = acc_t(0);
    return;
  }
  const scalar_t* b = bias ? bias + layer * bias_stride : nullptr;
  auto x_at = [&](int64_t j) -> acc_t {
    return static_cast<acc_t>(p[o + j]) + (b ? static_cast<acc_t>(b[j]) : acc_t(0));
  };
  if (loss == HM_MSE) {
    const acc_t c = w * acc_t(2) / acc_t(H);
    acc_t s = acc_t(0);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const acc_t d = x_at(j) - static_cast<acc_t>(t[o + j]);
      s += d * d;
      if (dp) dp[o + j] = static_cast<scalar_t>(c * d);
      if (dt) dt[o + j] = static_cast<scalar_t>(-c * d);
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) loss_rows[r] = w * s / acc_t(H);
    return;
  }
  acc_t pp = acc_t(0), tt = acc_t(0), pt = acc_t(0);
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const acc_t x = x_at(j), y = static_cast<acc_t>(t[o + j]);
    pp += x * x;
    tt += y * y;
    pt += x * y;
  }
  pp = block_sum(pp, shared);
  tt = block_sum(tt, shared);
  pt = block_sum(pt, shared);
  const RowCoef<acc_t> k = norm_loss_coef<acc_t>(loss, pp, tt, pt, acc_t(H), eps, w);
  const bool nmse = loss == HM_NMSE;
  acc_t l = acc_t(0);
  if (dp || dt || nmse) {
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const acc_t x = x_at(j), y = static_cast<acc_t>(t[o + j]);
      if (nmse) {
        const acc_t d = x * k.inv_np - y * k.inv_nt;
        l += d * d;
      }
      if (dp) dp[o + j] = static_cast<scalar_t>(k.aP * x + k.bP * y);
      if (dt) dt[o + j] = static_cast<scalar_t>(k.aT * y + k.bT * x);
    }
  }
  if (nmse) l = block_sum(l, shared);
  if (threadIdx.x == 0) loss_rows[r] = nmse ? w * l / acc_t(H) : k.loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_match_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& row_scale, int64_t loss, double eps, bool reduce,
    bool grad_student, bool grad_weight, bool grad_bias, bool grad_teacher) {
  check_hidden_match_args(student, teacher, weight, bias, row_scale, loss, eps);
  FASTKD_CHECK(student.is_cuda(), "student must be a CUDA tensor, got ", student.device());
  const c10::DeviceGuard guard(student.device());
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
  FASTKD_CHECK(N <= (int64_t(1) << 31) - 1, "student has too many rows per layer for one launch: ", N);
  const int64_t G_launch = std::max<int64_t>(1, ((int64_t(1) << 31) - 1) / std::max<int64_t>(N, 1));
  const bool need_buf = has_w || (need_dp && !grad_student);
  at::Tensor buf = (need_buf && L > 0 && N > 0) ? at::empty({G, N, Ht}, student.options()) : at::Tensor();
  cudaStream_t stream = current_stream(student.device());

  for (int64_t l0 = 0; l0 < L && N > 0; l0 += std::min(G, G_launch)) {
    const int64_t g = std::min(std::min(G, G_launch), L - l0);
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
      const scalar_t* pb = nullptr;
      int64_t bstride = 0;
      if (has_b) {
        pb = bias->data_ptr<scalar_t>() + (shared_b ? 0 : l0 * Ht);
        bstride = shared_b ? 0 : Ht;
      }
      hm_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(g * N), kThreads, 0, stream>>>(
          P.data_ptr<scalar_t>(), pb, bstride, teacher.data_ptr<scalar_t>() + l0 * N * Ht,
          row_scale.data_ptr<acc_t>() + l0 * N, dP.defined() ? dP.data_ptr<scalar_t>() : nullptr,
          grad_teacher ? gT.data_ptr<scalar_t>() + l0 * N * Ht : nullptr, rows.data_ptr<acc_t>() + l0 * N, N, Ht,
          loss, static_cast<acc_t>(eps));
      const cudaError_t err = cudaGetLastError();
      FASTKD_CHECK(err == cudaSuccess, "hm_rows_kernel launch failed: ", cudaGetErrorString(err));
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
