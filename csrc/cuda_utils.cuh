// fastkd: helpers for the CUDA sources that need only c10/core headers, so the .cu files compile
// (scripts/nvcc_check.sh) against a CPU-only torch too, whose include tree lacks the c10/cuda and
// ATen/cuda configuration headers. On a CUDA build of torch they resolve to the same objects.
#pragma once

#include <cuda_runtime.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "common.h"

namespace fastkd {

// The current torch CUDA stream of device d (what at::cuda::getCurrentCUDAStream() returns).
inline cudaStream_t current_cuda_stream(const c10::Device& d) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(d).native_handle());
}

}  // namespace fastkd

#define FASTKD_CUDA_LAUNCH_CHECK()                                                                  \
  do {                                                                                              \
    const cudaError_t fastkd_err_ = cudaGetLastError();                                             \
    FASTKD_CHECK(fastkd_err_ == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(fastkd_err_)); \
  } while (0)
