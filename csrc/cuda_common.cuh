// fastkd: helpers shared by the CUDA sources (include after common.h).
#pragma once

// The CPU-only torch wheels ship the c10/cuda headers without the CMake-generated
// c10/cuda/impl/cuda_cmake_macros.h; scripts/nvcc_check.sh compiles against them. With a CUDA torch
// the file exists and this changes nothing.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastkd {

// 16 bytes of scalar_t, loaded and stored as one 128-bit access (the pointer must be 16-byte aligned).
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(scalar_t);
  scalar_t v[kN];
};

// Elements before p + head is 16-byte aligned (at most n); always reachable, as a tensor's data is
// aligned to its element size.
template <typename scalar_t>
__host__ __device__ __forceinline__ int64_t head_to_align16(const scalar_t* p, int64_t n) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  const int64_t head = ((16 - mis) % 16) / static_cast<int64_t>(sizeof(scalar_t));
  return head < n ? head : n;
}

}  // namespace fastkd
