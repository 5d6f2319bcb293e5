// fastkd::embedding_ascent_ / embedding_ascent_multi_ — CUDA kernel. The math is written in
// embedding_ascent.cpp (and kernels/embedding_ascent.py); the host-side checks and the row layout
// of strided operands are shared through embedding_ascent.h.
//
// One thread block per token row; each thread keeps VPT elements of the row in registers
// (element j = threadIdx.x + v * blockDim.x, so loads and stores are coalesced), and every
// per-row norm is a block reduction (warp shuffles, then one value per warp through shared memory).
// Each operand is read once and written once: the memory floor of the update.
// Multi-tensor form: the per-tensor pointers, strides, first global row and H are passed by value
// in the kernel parameters (kMaxGroups tensors per launch; a longer list takes ceil(n / kMaxGroups)
// launches), so there is no host-to-device copy and no synchronisation. Offsets are int64.
#include "embedding_ascent.h"

#include <ATen/Dispatch.h>

#include <limits>

#include "cuda_utils.cuh"

namespace fastkd {
namespace {

using namespace fastkd::ascent;

constexpr int kMaxGroups = 16;

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
    const acc_t f = p.norm == L2 ? c / sqrt(sq) : c;
#pragma unroll
    for (int v = 0; v < VPT; ++v) x[v] += p.norm == SIGN ? sign_step(g[v], c) : f * g[v];
  }
  if (p.has_radius) {
    const scalar_t* op = static_cast<const scalar_t*>(G.o) + i * G.so;
    acc_t o[VPT];
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
      o[v] = j < H ? static_cast<acc_t>(op[j]) : acc_t(0);
    }
    if (p.norm == SIGN) {
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

template <typename scalar_t, typename buf_t, typename acc_t>
void launch(const Batch& batch, int64_t rows, int threads, int vpt, const DevParams<acc_t>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  switch (vpt) {
#define FASTKD_ASCENT_CASE(V) \
  case V:                     \
    ascent_kernel<scalar_t, buf_t, acc_t, V><<<grid, threads, 0, stream>>>(batch, p); \
    break;
    FASTKD_ASCENT_CASE(1)
    FASTKD_ASCENT_CASE(2)
    FASTKD_ASCENT_CASE(4)
    FASTKD_ASCENT_CASE(8)
    FASTKD_ASCENT_CASE(16)
    FASTKD_ASCENT_CASE(32)
#undef FASTKD_ASCENT_CASE
    default:
      FASTKD_CHECK(false, "internal: unsupported elements per thread ", vpt);
  }
  FASTKD_CUDA_LAUNCH_CHECK();
}

template <typename scalar_t, typename buf_t>
void run_groups(std::vector<Group>& groups, bool has_buf, double step_size, int64_t norm, std::optional<double> radius,
                std::optional<double> max_norm, double momentum, bool maximize) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  DevParams<acc_t> p;
  p.step = static_cast<acc_t>(step_size);
  p.sgn = maximize ? acc_t(1) : acc_t(-1);
  p.momentum = static_cast<acc_t>(momentum);
  p.radius = static_cast<acc_t>(radius.value_or(0));
  p.max_norm = static_cast<acc_t>(max_norm.value_or(0));
  p.has_buf = has_buf;
  p.has_radius = radius.has_value();
  p.has_max_norm = max_norm.has_value();
  p.norm = static_cast<int>(norm);
  cudaStream_t stream = current_cuda_stream(groups.front().e.t.device());

  size_t gi = 0;
  while (gi < groups.size()) {
    Batch batch{};
    int64_t rows = 0, maxH = 0;
    while (gi < groups.size() && batch.n < kMaxGroups) {
      Group& gr = groups[gi++];
      if (gr.rows == 0 || gr.H == 0) continue;
      GroupArg& a = batch.gr[batch.n++];
      a.e = gr.e.t.data_ptr();
      a.g = gr.g.t.data_ptr();
      a.o = p.has_radius ? gr.o.t.data_ptr() : nullptr;
      a.m = gr.m.defined() ? gr.m.data_ptr<bool>() : nullptr;
      a.b = has_buf ? gr.b.t.data_ptr() : nullptr;
      a.se = gr.e.stride;
      a.sg = gr.g.stride;
      a.so = p.has_radius ? gr.o.stride : 0;
      a.sb = has_buf ? gr.b.stride : 0;
      a.first = rows;
      a.H = gr.H;
      rows += gr.rows;
      maxH = std::max(maxH, gr.H);
    }
    if (rows == 0) continue;
    FASTKD_CHECK(rows <= std::numeric_limits<int32_t>::max(), "embeds has more than 2^31 - 1 rows (", rows,
                 "); split it into several calls");
    // ~4 elements per thread; blocks of 32..1024 threads; up to 32 elements per thread (H <= 32768).
    int threads = 32;
    while (threads < 1024 && threads * 4 < maxH) threads *= 2;
    int vpt = 1;
    while (static_cast<int64_t>(vpt) * threads < maxH) vpt *= 2;
    FASTKD_CHECK(vpt <= 32, "the cuda kernel supports H <= 32768, got H = ", maxH,
                 " (use backend='triton' or backend='torch')");
    launch<scalar_t, buf_t, acc_t>(batch, rows, threads, vpt, p, stream);
  }
}

void ascent_impl(const std::vector<at::Tensor>& embeds, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& origins,
                 const std::vector<std::optional<at::Tensor>>& masks,
                 const std::vector<std::optional<at::Tensor>>& bufs, double step_size, int64_t norm,
                 std::optional<double> radius, std::optional<double> max_norm, double momentum, bool maximize) {
  Prepared pr =
      prepare(embeds, grads, origins, masks, bufs, step_size, norm, radius, max_norm, momentum, c10::DeviceType::CUDA);
  if (pr.groups.empty()) return;
  const c10::DeviceGuard guard(embeds[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pr.dtype, "fastkd_embedding_ascent_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (pr.buf_same) {
      run_groups<scalar_t, scalar_t>(pr.groups, pr.has_buf, step_size, norm, radius, max_norm, momentum, maximize);
    } else {
      run_groups<scalar_t, acc_t>(pr.groups, pr.has_buf, step_size, norm, radius, max_norm, momentum, maximize);
    }
  });
  write_back(pr.groups, embeds, bufs);
}

void embedding_ascent_cuda(at::Tensor embeds, const at::Tensor& grad, const std::optional<at::Tensor>& origin,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& momentum_buffer,
                           double step_size, int64_t norm, std::optional<double> radius,
                           std::optional<double> max_norm, double momentum, bool maximize) {
  ascent_impl({embeds}, {grad}, {origin}, {mask}, {momentum_buffer}, step_size, norm, radius, max_norm, momentum,
              maximize);
}

void embedding_ascent_multi_cuda(at::TensorList embeds, at::TensorList grads, at::TensorList origins,
                                 const c10::List<std::optional<at::Tensor>>& masks, at::TensorList momentum_buffers,
                                 double step_size, int64_t norm, std::optional<double> radius,
                                 std::optional<double> max_norm, double momentum, bool maximize) {
  Lists l = unpack_lists(embeds, grads, origins, masks, momentum_buffers);
  ascent_impl(l.e, l.g, l.o, l.m, l.b, step_size, norm, radius, max_norm, momentum, maximize);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("embedding_ascent_", &embedding_ascent_cuda);
  m.impl("embedding_ascent_multi_", &embedding_ascent_multi_cuda);
}

}  // namespace fastkd
