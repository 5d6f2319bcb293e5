// fastkd::distill_loss — CUDA implementation: registration and launch of the kernels in
// distill_loss.cuh (the math, the passes and the memory traffic are described there).
#include "common.h"
#include "distill_loss.h"

#include "cuda_common.cuh"
#include "distill_loss.cuh"

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fastkd {
namespace {

using namespace distill_cuda;
static_assert(kKL == KL && kReverseKL == REVERSE_KL && kJSD == JSD, "divergence codes differ from common.h");

int max_dynamic_smem(int device) {
  // Per-device query (a cheap attribute read; no synchronisation).
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return optin;
}

template <typename scalar_t, typename acc_t, int kDiv>
void launch(Params<scalar_t, acc_t> P, int device, cudaStream_t stream) {
  constexpr int64_t kMaxGrid = (int64_t(1) << 31) - 1;  // grid-stride loops cover any N
  auto block_kernel = distill_loss_block_kernel<scalar_t, acc_t, kDiv>;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, block_kernel));
  const int64_t avail = static_cast<int64_t>(max_dynamic_smem(device)) - static_cast<int64_t>(attr.sharedSizeBytes);
  const LaunchPlan plan = plan_launch<scalar_t>(P.V, P.vec_ok, avail);
  if (plan.warp_per_row) {
    const int64_t blocks = std::min<int64_t>((P.N + kWarpRows - 1) / kWarpRows, kMaxGrid);
    distill_loss_warp_kernel<scalar_t, acc_t, kDiv>
        <<<static_cast<unsigned>(blocks), kWarp * kWarpRows, 0, stream>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  P.cache_vecs = plan.cache_vecs;
  if (plan.smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.smem_bytes)));
  const int64_t blocks = std::min<int64_t>(P.N, kMaxGrid);
  block_kernel<<<static_cast<unsigned>(blocks), kBlockThreads, static_cast<size_t>(plan.smem_bytes), stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                 const at::Tensor& row_scale, double temperature,
                                                                 int64_t divergence, double beta, double loss_scale,
                                                                 bool reduce, bool grad_student, bool grad_teacher) {
  FASTKD_CHECK(student.is_cuda(), "student must be a CUDA tensor, got ", student.device());
  FASTKD_CHECK_DEVICE(teacher, student.device());
  FASTKD_CHECK_DEVICE(row_scale, student.device());
  check_distill_loss_args(student, teacher, row_scale, temperature, divergence, beta);
  FASTKD_CHECK(student.size(1) > 0, "student_logits must have a non-empty last dimension V");
  const bool is_double = student.scalar_type() == at::kDouble;

  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  auto rs = row_scale.contiguous();
  at::Tensor gs = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gt = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  at::Tensor rows = at::empty({N}, student.options().dtype(is_double ? at::kDouble : at::kFloat));
  if (N > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastkd_distill_loss_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const Params<scalar_t, acc_t> P = make_params<scalar_t, acc_t>(
          student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), rs.data_ptr<acc_t>(), rows.data_ptr<acc_t>(),
          grad_student ? gs.data_ptr<scalar_t>() : nullptr, grad_teacher ? gt.data_ptr<scalar_t>() : nullptr, N, V,
          temperature, beta, loss_scale);
      const int device = student.device().index();
      if (divergence == KL)
        launch<scalar_t, acc_t, KL>(P, device, stream);
      else if (divergence == REVERSE_KL)
        launch<scalar_t, acc_t, REVERSE_KL>(P, device, stream);
      else
        launch<scalar_t, acc_t, JSD>(P, device, stream);
    });
  }
  at::Tensor loss = reduce ? rows.sum() : rows;
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("distill_loss", &distill_loss_cuda); }

}  // namespace fastkd
