// A small host emulation of the CUDA execution model, for testing fastkd's CUDA kernels on machines
// without a GPU (tests/test_distill_loss.py builds emu_kernels.cpp with g++ and runs it through
// ctypes). Include it before the kernel headers (csrc/*.cuh).
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack, run by a round-robin
// scheduler on one OS thread; the blocks of a grid run one after the other, so a function-static
// __shared__ variable is the block's shared memory. A fiber runs until it waits at a barrier:
// __syncthreads waits for the whole block, __shfl_xor_sync writes its value into a per-warp buffer
// and waits for the 32 lanes twice (write, then read), so all lanes must take part, as the hardware
// requires for a full mask. A barrier that some threads never reach is reported (abort) instead of
// hanging. The dynamic shared memory is filled with 0xFF bytes (NaN in every float format) so that
// reading a cache entry that was never written shows up as NaN. Math functions are the host's (exact
// where the device uses the approximations of --use_fast_math); what runs is the kernels' logic:
// indexing, alignment, passes, reductions, -inf / NaN handling, the shared-memory cache.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) int4 {
  int x, y, z, w;
};

struct EmuDim3 {
  unsigned x = 0, y = 1, z = 1;
};
// One fiber runs at a time: the scheduler sets these before switching to it.
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fastkd_emu {

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  unsigned idx = 0;
  bool done = false;
};

inline ucontext_t g_scheduler;
inline Fiber* g_current = nullptr;
inline const std::function<void()>* g_body = nullptr;
inline uint64_t g_events = 0;  // arrivals at barriers and finished fibers: progress of the scheduler

inline void yield() { swapcontext(&g_current->ctx, &g_scheduler); }

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    ++g_events;
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      return;
    }
    while (gen_ == gen) yield();
  }

 private:
  int n_, arrived_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  alignas(16) unsigned char slot[32][16];
};

inline Barrier* g_block_barrier = nullptr;
inline std::vector<std::unique_ptr<Warp>>* g_warps = nullptr;
inline int4* g_dynamic_smem = nullptr;

inline void fiber_main() {
  (*g_body)();
  g_current->done = true;
  ++g_events;
}  // returns to uc_link, the scheduler

// Runs body() as grid x block CUDA threads (1-D), with smem_bytes of dynamic shared memory per block.
inline void launch(unsigned grid, unsigned block, size_t smem_bytes, const std::function<void()>& body) {
  constexpr size_t kStack = 256 * 1024;
  if (block % 32 != 0) {
    std::fprintf(stderr, "cuda_host_emu: block size must be a multiple of 32\n");
    std::abort();
  }
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  g_body = &body;
  std::vector<int4> smem(smem_bytes / sizeof(int4) + 1);
  std::vector<Fiber> fibers(block);
  for (auto& f : fibers) f.stack.reset(new char[kStack]);
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(static_cast<void*>(smem.data()), 0xFF, smem.size() * sizeof(int4));
    g_dynamic_smem = smem.data();
    Barrier bar(static_cast<int>(block));
    g_block_barrier = &bar;
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w < block / 32; ++w) warps.push_back(std::make_unique<Warp>());
    g_warps = &warps;
    for (unsigned i = 0; i < block; ++i) {
      Fiber& f = fibers[i];
      f.idx = i;
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &g_scheduler;
      makecontext(&f.ctx, fiber_main, 0);
    }
    blockIdx = {b, 1, 1};
    unsigned remaining = block;
    while (remaining > 0) {
      const uint64_t before = g_events;
      for (auto& f : fibers) {
        if (f.done) continue;
        g_current = &f;
        threadIdx = {f.idx, 1, 1};
        swapcontext(&g_scheduler, &f.ctx);
        if (f.done) --remaining;
      }
      if (remaining > 0 && g_events == before) {
        std::fprintf(stderr, "cuda_host_emu: a barrier is not reached by all threads (deadlock)\n");
        std::abort();
      }
    }
  }
}

}  // namespace fastkd_emu

inline void __syncthreads() { fastkd_emu::g_block_barrier->wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 16, "shuffle of a value wider than 16 bytes");
  const unsigned lane = threadIdx.x % 32;
  fastkd_emu::Warp& w = *(*fastkd_emu::g_warps)[threadIdx.x / 32];
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.wait();
  T r;
  std::memcpy(&r, w.slot[lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  w.bar.wait();
  return r;
}

// IEEE round-to-nearest division (what the device intrinsic guarantees under --use_fast_math)
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int4 __ldcs(const int4* p) { return *p; }
inline void __stcs(int4* p, int4 v) { *p = v; }

#define FASTKD_DYNAMIC_SMEM(name) int4* name = ::fastkd_emu::g_dynamic_smem
