// fastkd: device-side helpers shared by the CUDA kernels. This header needs only the CUDA language
// (no torch or c10/cuda headers), so the kernels that use it can also be compiled for the host by the
// CUDA emulation in tests/cuda_emu/ (which defines the CUDA built-ins before including them).
#pragma once

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

template <typename scalar_t>
__device__ __forceinline__ Vec16<scalar_t> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec16<scalar_t>*>(p);
}

// Streaming load (ld.global.cs, evict first): data that will not be read from global memory again.
template <typename scalar_t>
__device__ __forceinline__ Vec16<scalar_t> load_vec_stream(const scalar_t* p) {
  const int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
  return *reinterpret_cast<const Vec16<scalar_t>*>(&raw);
}

// Streaming store (st.global.cs, evict first): results this kernel does not read again.
template <typename scalar_t>
__device__ __forceinline__ void store_vec_stream(scalar_t* p, const Vec16<scalar_t>& v) {
  __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));
}

}  // namespace fastkd

// The block's dynamic shared memory as int4[]; the host emulation supplies its own definition.
#ifndef FASTKD_DYNAMIC_SMEM
#define FASTKD_DYNAMIC_SMEM(name) extern __shared__ int4 name[]
#endif
