// fastkd::scale_grad_kernel_ — CUDA implementation: registration and launch of the kernels in scale_grad.cuh
// (which describes them: device-side check of the upstream gradient, no work when it is 1).
#include "common.h"

#include "cuda_common.cuh"
#include "scale_grad.cuh"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastkd {
namespace {

using namespace scale_cuda;

int64_t grid_cap(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int64_t>(std::max(sms, 1)) * 4;  // 4 blocks of 256 threads per SM
}

void scale_grad_cuda(at::Tensor grad, const at::Tensor& scale) {
  FASTKD_CHECK_CONTIGUOUS(grad);
  FASTKD_CHECK(at::isFloatingType(scale.scalar_type()), "scale must be a floating-point tensor, got ", scale.scalar_type());
  FASTKD_CHECK_DEVICE(scale, grad.device());
  if (grad.numel() == 0) return;
  const bool per_row = scale.dim() > 0;
  const int64_t rows = grad.dim() >= 1 ? grad.size(0) : 1;
  FASTKD_CHECK(!per_row || (grad.dim() >= 1 && scale.numel() == rows),
               "scale of shape [N] must match grad.size(0); got scale ", scale.sizes(), ", grad ", grad.sizes());
  FASTKD_CHECK(per_row || scale.numel() == 1, "scale must be 0-d or [N], got ", scale.sizes());
  const int64_t cols = grad.numel() / rows;
  const c10::cuda::CUDAGuard guard(grad.device());
  // float32 / float64 scales are read as they are; another float dtype is converted on the device
  // (an asynchronous kernel, no host synchronisation).
  at::Tensor sc = scale.contiguous();
  if (sc.scalar_type() != at::kFloat && sc.scalar_type() != at::kDouble) sc = sc.to(at::kFloat);
  const int device = grad.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t cap = grid_cap(device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastkd_scale_grad_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t kN = Vec16<scalar_t>::kN;
    auto run = [&](auto* scale_ptr) {
      using scale_t = std::remove_const_t<std::remove_pointer_t<decltype(scale_ptr)>>;
      scalar_t* g = grad.data_ptr<scalar_t>();
      if (per_row) {
        const int64_t blocks = std::min<int64_t>(rows, cap);
        scale_rows_kernel<scalar_t, acc_t, scale_t>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(g, scale_ptr, rows, cols);
      } else {
        const int64_t numel = grad.numel();
        const int64_t work = numel / kN + kN;  // vectors, plus at most kN - 1 head and kN - 1 tail elements
        const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, cap);
        scale_all_kernel<scalar_t, acc_t, scale_t>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(g, scale_ptr, numel);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (sc.scalar_type() == at::kDouble)
      run(sc.data_ptr<double>());
    else
      run(sc.data_ptr<float>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("scale_grad_kernel_", &scale_grad_cuda); }

}  // namespace fastkd
