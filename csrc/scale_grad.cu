// fastkd::scale_grad_ — CUDA kernels: grad[i, ...] *= scale (0-d) or scale[i] (scale [N]), in place.
// Same semantics as the CPU kernel (scale_grad.cpp, which declares the schema).
//
// The fused losses write d(loss)/d(input) in their forward; backward multiplies by the upstream
// gradient here. The upstream gradient is read on the device, by every block, and a block whose
// scale is exactly 1 returns at once, so the usual `loss.backward()` (upstream gradient 1) moves no
// gradient bytes and never synchronises with the host. The grids are grid-stride loops capped at a
// few blocks per SM, so that early return costs a few hundred block launches whatever the tensor size.
// Accesses are 16-byte vectors where the rows allow it; offsets are int64.
#include "common.h"

#include "cuda_common.cuh"

#include <ATen/Dispatch.h>

#include <cstdint>
#include <type_traits>

namespace fastkd {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void scale_vec(scalar_t* p, acc_t s) {
  auto* vp = reinterpret_cast<Vec16<scalar_t>*>(p);
  Vec16<scalar_t> v = *vp;
#pragma unroll
  for (int i = 0; i < Vec16<scalar_t>::kN; ++i) v.v[i] = static_cast<scalar_t>(static_cast<acc_t>(v.v[i]) * s);
  *vp = v;
}

// Scales n elements at p by s with `count` cooperating threads, this one being `tid`: a scalar head
// up to 16-byte alignment, 16-byte vectors, a scalar tail.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void scale_span(scalar_t* p, int64_t n, acc_t s, int64_t tid, int64_t count) {
  constexpr int kN = Vec16<scalar_t>::kN;
  const int64_t head = head_to_align16(p, n);
  const int64_t nvec = (n - head) / kN;
  for (int64_t k = tid; k < nvec; k += count) scale_vec<scalar_t, acc_t>(p + head + k * kN, s);
  for (int64_t j = tid; j < head; j += count) p[j] = static_cast<scalar_t>(static_cast<acc_t>(p[j]) * s);
  for (int64_t j = head + nvec * kN + tid; j < n; j += count)
    p[j] = static_cast<scalar_t>(static_cast<acc_t>(p[j]) * s);
}

// 0-d scale: the whole tensor, flattened to [numel]; grid-stride over 16-byte vectors.
template <typename scalar_t, typename acc_t, typename scale_t>
__global__ void __launch_bounds__(kThreads) scale_all_kernel(scalar_t* __restrict__ g, const scale_t* __restrict__ scale,
                                                             int64_t numel) {
  const acc_t s = static_cast<acc_t>(*scale);
  if (s == acc_t(1)) return;  // the upstream gradient is 1: nothing to do
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  scale_span<scalar_t, acc_t>(g, numel, s, tid, static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// scale [rows]: g is [rows, cols]; one block per row at a time (grid-stride over rows).
template <typename scalar_t, typename acc_t, typename scale_t>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(scalar_t* __restrict__ g, const scale_t* __restrict__ scale,
                                                              int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const acc_t s = static_cast<acc_t>(scale[r]);
    if (s == acc_t(1)) continue;  // a row whose upstream gradient is 1 is left as it is
    scale_span<scalar_t, acc_t>(g + r * cols, cols, s, threadIdx.x, blockDim.x);
  }
}

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

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("scale_grad_", &scale_grad_cuda); }

}  // namespace fastkd
