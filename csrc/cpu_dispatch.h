// fastkd: run-time instruction-set dispatch of the CPU kernels (the scheme of ATen's DispatchStub).
//
// How it works
//   setup.py compiles every source file that carries the marker line `// fastkd:cpu-dispatch`
//   once per instruction-set level (all such files of a level as one generated translation unit,
//   build/fastkd_cpu_units/fastkd_cpu_<level>.cpp), each time with its own flags and macros:
//     level    compiler flags (added to the build's)                      macros
//     default  none (the baseline: x86-64 / SSE2, or FASTKD_CPU_ARCH)      CPU_CAPABILITY=DEFAULT
//     avx2     -mavx2 -mfma -mf16c                                         CPU_CAPABILITY=AVX2, CPU_CAPABILITY_AVX2
//     avx512   -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma ... CPU_CAPABILITY=AVX512, CPU_CAPABILITY_AVX512
//   (plus FASTKD_CPU_BASE in the default-level copy). ATen's at::vec reads the same macros, so
//   Vectorized<float> is 16 lanes in the avx512 copy, 8 in the avx2 copy, a portable array in the
//   default copy, and lives in a namespace per level (at::vec::AVX2::...), as the kernel code must:
//   everything a level copy defines goes into namespace fastkd::CPU_CAPABILITY (usually inside an
//   anonymous namespace there), so the copies never clash at link time.
//   Each copy registers a pointer to its entry function in a Stub at load time
//   (FASTKD_CPU_KERNEL); the torch op is registered once, in the default copy, with a caller that
//   asks the Stub for the level chosen for this process (cpu_dispatch.cpp: the best the CPU
//   supports, or a lower one forced with FASTKD_CPU_CAPABILITY=default|avx2|avx512).
//   Inline functions outside the level namespaces (c10, std) that the compiler emits out of line are
//   merged by the linker keeping the first copy; setup.py links the baseline objects first, so a
//   shared helper never runs AVX-512 code on an AVX2 host (tests/test_cpu_dispatch.py checks the
//   library's disassembly for that).
//
// How a new kernel file joins the multi-level build (see csrc/distill_loss.cpp for a full example)
//   1. First line of the file (anywhere in its first 40 lines):   // fastkd:cpu-dispatch
//   2. #include "cpu_dispatch.h" (it includes common.h), and put the implementation in a namespace
//      of the file's own (all dispatched files of a level are compiled as one translation unit, so
//      their helpers must not clash), then name the entry function in fastkd::CPU_CAPABILITY:
//        namespace fastkd { namespace CPU_CAPABILITY { namespace my_op_impl { namespace {
//          ... my_op_cpu(...) ...
//        } }  using my_op_impl::my_op_cpu;  } }
//      Vectorized code uses at::vec; fast exp/log for float come from fast_math.h.
//   3. After that namespace:   FASTKD_CPU_KERNEL(my_op_cpu)
//   4. Op schema and registration go in the default copy only:
//        #ifdef FASTKD_CPU_BASE
//        TORCH_LIBRARY_FRAGMENT(fastkd, m) { m.def("my_op(...) -> ..."); }
//        TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("my_op", FASTKD_CPU_DISPATCH(my_op_cpu)); }
//        #endif
//   Files without the marker are compiled once at the baseline level (module.cpp, scale_grad.cpp,
//   cpu_dispatch.cpp, CUDA sources); setup.py needs no list to be edited.
#pragma once

#include "common.h"

#include <atomic>
#include <string>
#include <utility>
#include <vector>

#ifndef CPU_CAPABILITY
// A file compiled outside setup.py's multi-level build (or a non-dispatched file): baseline.
#define CPU_CAPABILITY DEFAULT
#define FASTKD_CPU_BASE 1
#endif

namespace fastkd {
namespace dispatch {

// Ordered: a higher level implies the lower ones. The enumerator names are the CPU_CAPABILITY
// macro's values, so `Level::CPU_CAPABILITY` names the level of the file being compiled.
enum class Level : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kNumLevels = 3;

const char* level_name(Level l);           // "default", "avx2", "avx512"
Level cpu_level();                         // the best level this CPU (and OS) supports
Level built_level();                       // the highest level compiled into this library
Level active_level();                      // the level kernels run at (FASTKD_CPU_CAPABILITY or the best)
Level set_active_level(const std::string& name);  // tests: switch for this process; returns the old one
std::vector<std::string> supported_levels();      // levels both compiled and supported by this CPU
// Whether int8 GEMMs (torch's at::_int_mm on CPU) run at speed here: the CPU has VNNI (AVX512-VNNI or
// AVX-VNNI). Without it torch falls back to a reference loop, ~70x slower than a float32 GEMM (Zen 3).
bool cpu_has_int8_dot();

template <typename Fn>
struct Stub {
  Fn fns[kNumLevels] = {nullptr, nullptr, nullptr};
  constexpr Stub() = default;
  int set(Level l, Fn f) {
    fns[static_cast<int>(l)] = f;
    return 0;
  }
  // The active level's kernel, else the highest compiled one below it.
  Fn get() const {
    for (int l = static_cast<int>(active_level()); l >= 0; --l)
      if (fns[l] != nullptr) return fns[l];
    TORCH_CHECK(false, "fastkd: internal error: no CPU kernel registered");
  }
};

template <typename Fn, Stub<Fn>* S>
struct Caller;
template <typename R, typename... A, Stub<R (*)(A...)>* S>
struct Caller<R (*)(A...), S> {
  static R call(A... a) { return S->get()(std::forward<A>(a)...); }
};

}  // namespace dispatch
}  // namespace fastkd

#define FASTKD_CPU_STUB_TYPE(name) ::fastkd::dispatch::Stub<decltype(&::fastkd::CPU_CAPABILITY::name)>

#ifdef FASTKD_CPU_BASE
#define FASTKD_CPU_STUB_DEFINE(name) FASTKD_CPU_STUB_TYPE(name) name##_stub;
#else
#define FASTKD_CPU_STUB_DEFINE(name)
#endif

// Declares (and, in the default copy, defines) the Stub fastkd::dispatch::<name>_stub and
// registers this copy's <name> in it at load time.
#define FASTKD_CPU_KERNEL(name)                                                                         \
  namespace fastkd {                                                                                    \
  namespace dispatch {                                                                                  \
  extern FASTKD_CPU_STUB_TYPE(name) name##_stub;                                                        \
  FASTKD_CPU_STUB_DEFINE(name)                                                                          \
  namespace CPU_CAPABILITY {                                                                            \
  namespace {                                                                                           \
  [[maybe_unused]] const int name##_registered =                                                        \
      name##_stub.set(Level::CPU_CAPABILITY, &::fastkd::CPU_CAPABILITY::name);                          \
  }                                                                                                     \
  }                                                                                                     \
  }                                                                                                     \
  }

// The function registered with TORCH_LIBRARY_IMPL: calls the active level's kernel.
#define FASTKD_CPU_DISPATCH(name) \
  (&::fastkd::dispatch::Caller<decltype(&::fastkd::CPU_CAPABILITY::name), &::fastkd::dispatch::name##_stub>::call)
