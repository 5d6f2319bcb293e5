// fastkd::scale_grad_ — the CUDA kernels: grad[i, ...] *= scale (0-d) or scale[i] (scale [N]), in place.
// Same semantics as the CPU kernel (scale_grad.cpp, which declares the schema); scale_grad_cuda.cu
// registers the op and launches these. This header needs no torch headers (tests/cuda_emu/ runs the
// kernels on the host).
//
// The fused losses write d(loss)/d(input) in their forward; backward multiplies by the upstream
// gradient here. The upstream gradient is read on the device, by every block, and a block whose
// scale is exactly 1 returns at once, so the usual `loss.backward()` (upstream gradient 1) moves no
// gradient bytes and never synchronises with the host. The grids are grid-stride loops capped at a
// few blocks per SM, so that early return costs a few hundred block launches whatever the tensor size.
// Accesses are 16-byte vectors (after a scalar head that reaches alignment); offsets are int64.
#pragma once

#include "cuda_device.cuh"

#include <cstdint>

namespace fastkd {
namespace scale_cuda {

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

}  // namespace scale_cuda
}  // namespace fastkd
