// fastkd::embedding_ascent_ — the CUDA kernel (embedding_ascent_cuda.cu registers the op and launches
// it; the math is written in embedding_ascent.cpp and kernels/embedding_ascent.py). This header
// needs no torch headers, so tests/cuda_emu/ also runs the kernel on the host.
//
// One thread block per token row; each thread keeps VPT elements of the row in registers
// (element j = threadIdx.x + v * blockDim.x, so loads and stores are coalesced), and every
// per-row norm is a block reduction (warp shuffles, then one value per warp through shared memory).
// Each operand is read once and written once: the memory floor of the update.
// Multi-tensor form: the per-tensor pointers, strides, first global row and H are passed by value
// in the kernel parameters (kMaxGroups tensors per launch; a longer list takes ceil(n / kMaxGroups)
// launches), so there is no host-to-device copy and no synchronisation. Offsets are int64.
#pragma once

#include "cuda_device.cuh"

#include <cstdint>
#include <utility>

namespace fastkd {
namespace ascent_cuda {

// Norm codes, shared with embedding_ascent.h (ascent::Norm) and the Python layers.
constexpr int kL2 = 0, kSign = 1, kNone = 2;

constexpr int kMaxGroups = 16;
constexpr int kMaxVpt = 32;  // elements per thread: H <= 32 * 1024

struct GroupArg {
  void* e;
  const void* g;
  const void* o;
  const bool* m;  // nullptr: no mask
  void* b;        // nullptr: no momentum buffer
  int64_t se, sg, so, sb;
  int64_t first;  // first global row of this tensor within the launch
  int64_t H;
};

struct Batch {
  GroupArg gr[kMaxGroups];
  int n;
};

template <typename acc_t>
struct DevParams {
  acc_t step, sgn, momentum, radius, max_norm;
  bool has_buf, has_radius, has_max_norm;
  int norm;
};

// Block shape for rows of at most max_h elements: about 4 elements per thread, 32..1024 threads,
// VPT a power of two (0 when max_h needs more than kMaxVpt per thread).
struct Plan {
  int threads, vpt;
};

inline Plan plan_threads(int64_t max_h) {
  int threads = 32;
  while (threads < 1024 && static_cast<int64_t>(threads) * 4 < max_h) threads *= 2;
  int vpt = 1;
  while (static_cast<int64_t>(vpt) * threads < max_h) vpt *= 2;
  return {threads, vpt <= kMaxVpt ? vpt : 0};
}

// f(std::integral_constant<int, VPT>{}) for the runtime vpt of a Plan.
template <typename F>
void dispatch_vpt(int vpt, F&& f) {
  switch (vpt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 32>{}); break;
  }
}

// Sum over the block; every thread gets the total. `shm` holds 33 values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();  // the previous reduction's readers are done with shm
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nw ? shm[lane] : acc_t(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) shm[32] = v;
  }
  __syncthreads();
  return shm[32];
}

template <typename acc_t>
__device__ __forceinline__ acc_t sign_step(acc_t v, acc_t c) {
  // c * sign(v), with NaN (and signed zero) passing through so that NaN gradients propagate
  return v > acc_t(0) ? c : (v < acc_t(0) ? -c : v * c);
}

template <typename scalar_t, typename buf_t, typename acc_t, int VPT>
__global__ void __launch_bounds__(1024) ascent_kernel(const Batch batch, const DevParams<acc_t> p) {
  __shared__ acc_t shm[33];
  const int64_t r = blockIdx.x;
  int gi = 0;
  while (gi + 1 < batch.n && r >= batch.gr[gi + 1].first) ++gi;
  const GroupArg& G = batch.gr[gi];
  const int64_t i = r - G.first;
  const int64_t H = G.H;
  if (G.m != nullptr && !G.m[i]) return;  // uniform over the block: no thread reaches a barrier

  scalar_t* e = static_cast<scalar_t*>(G.e) + i * G.se;
  const scalar_t* gp = static_cast<const scalar_t*>(G.g) + i * G.sg;
  acc_t x[VPT], g[VPT];
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
    x[v] = j < H ? static_cast<acc_t>(e[j]) : acc_t(0);
    g[v] = j < H ? static_cast<acc_t>(gp[j]) : acc_t(0);
  }
  acc_t c = p.step * p.sgn;
  if (p.has_buf) {
    buf_t* b = static_cast<buf_t*>(G.b) + i * G.sb;
    acc_t l1 = 0;
#pragma unroll
    for (int v = 0; v < VPT; ++v) l1 += fabs(g[v]);
    l1 = block_sum(l1, shm);
    const acc_t inv = l1 == acc_t(0) ? acc_t(0) : p.sgn / l1;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
      if (j < H) {
        const buf_t nb = static_cast<buf_t>(p.momentum * static_cast<acc_t>(b[j]) + g[v] * inv);
        b[j] = nb;
        g[v] = static_cast<acc_t>(nb);  // the step uses exactly the stored momentum
      }
    }
    c = p.step;  // the buffer already carries the sign
  }
  acc_t sq = 0;
#pragma unroll
  for (int v = 0; v < VPT; ++v) sq += g[v] * g[v];
  sq = block_sum(sq, shm);
  if (sq != acc_t(0)) {  // a zero gradient row is not stepped; NaN steps (and propagates)
    const acc_t f = p.norm == kL2 ? c / sqrt(sq) : c;
#pragma unroll
    for (int v = 0; v < VPT; ++v) x[v] += p.norm == kSign ? sign_step(g[v], c) : f * g[v];
  }
  if (p.has_radius) {
    const scalar_t* op = static_cast<const scalar_t*>(G.o) + i * G.so;
    acc_t o[VPT];
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
      o[v] = j < H ? static_cast<acc_t>(op[j]) : acc_t(0);
    }
    if (p.norm == kSign) {
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        const acc_t d = x[v] - o[v];
        if (fabs(d) > p.radius) x[v] = o[v] + (d < acc_t(0) ? -p.radius : p.radius);
      }
    } else {
      acc_t dn = 0;
#pragma unroll
      for (int v = 0; v < VPT; ++v) dn += (x[v] - o[v]) * (x[v] - o[v]);
      dn = sqrt(block_sum(dn, shm));
      if (dn > p.radius) {
        const acc_t f = p.radius / dn;
#pragma unroll
        for (int v = 0; v < VPT; ++v) x[v] = o[v] + (x[v] - o[v]) * f;
      }
    }
  }
  if (p.has_max_norm) {
    acc_t xn = 0;
#pragma unroll
    for (int v = 0; v < VPT; ++v) xn += x[v] * x[v];
    xn = sqrt(block_sum(xn, shm));
    if (xn > p.max_norm) {
      const acc_t f = p.max_norm / xn;
#pragma unroll
      for (int v = 0; v < VPT; ++v) x[v] *= f;
    }
  }
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
    if (j < H) e[j] = static_cast<scalar_t>(x[v]);
  }
}

}  // namespace ascent_cuda
}  // namespace fastkd
