// fastkd: which instruction-set level the CPU kernels run at (see cpu_dispatch.h).
// Compiled once, at the baseline level: nothing here may use instructions above it.
#include "cpu_dispatch.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <mutex>

namespace fastkd {
namespace dispatch {
namespace {

constexpr const char* kNames[kNumLevels] = {"default", "avx2", "avx512"};

Level detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0), so a CPU
  // whose kernel disabled AVX-512 reports avx2 here.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512) return Level::AVX512;
  if (avx2) return Level::AVX2;
#endif
  return Level::DEFAULT;
}

Level built() {
#if defined(FASTKD_BUILT_AVX512)
  return Level::AVX512;
#elif defined(FASTKD_BUILT_AVX2)
  return Level::AVX2;
#else
  return Level::DEFAULT;
#endif
}

std::string list_upto(Level l) {
  std::string s;
  for (int i = 0; i <= static_cast<int>(l); ++i) s += (i ? ", " : "") + std::string(kNames[i]);
  return s;
}

// The level for a name, checked against this CPU and this build; errors name what is possible.
Level parse(std::string name, const char* what) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  int want = -1;
  for (int i = 0; i < kNumLevels; ++i)
    if (name == kNames[i]) want = i;
  TORCH_CHECK_VALUE(want >= 0, "fastkd: ", what, "=", name, " is not a CPU capability; use one of default, avx2, avx512");
  const Level cpu = detect(), lib = built();
  TORCH_CHECK_VALUE(want <= static_cast<int>(cpu), "fastkd: ", what, "=", name,
                    " is more than this CPU supports (it supports: ", list_upto(cpu), ")");
  TORCH_CHECK_VALUE(want <= static_cast<int>(lib), "fastkd: ", what, "=", name,
                    " was not compiled into fastkd._C (compiled levels: ", list_upto(lib),
                    "; see FASTKD_CPU_LEVELS in setup.py)");
  return static_cast<Level>(want);
}

std::atomic<int> g_active{-1};
std::mutex g_mutex;

}  // namespace

const char* level_name(Level l) { return kNames[static_cast<int>(l)]; }
Level cpu_level() { return detect(); }
Level built_level() { return built(); }

Level active_level() {
  int l = g_active.load(std::memory_order_relaxed);
  if (l >= 0) return static_cast<Level>(l);
  std::lock_guard<std::mutex> lock(g_mutex);
  l = g_active.load();
  if (l < 0) {
    const char* env = std::getenv("FASTKD_CPU_CAPABILITY");
    if (env != nullptr && env[0] != '\0') {
      l = static_cast<int>(parse(env, "FASTKD_CPU_CAPABILITY"));  // throws (stays unset) on a bad value
    } else {
      l = std::min(static_cast<int>(detect()), static_cast<int>(built()));
    }
    g_active.store(l);
  }
  return static_cast<Level>(l);
}

Level set_active_level(const std::string& name) {
  const Level want = parse(name, "cpu capability");
  std::lock_guard<std::mutex> lock(g_mutex);
  const int old = g_active.exchange(static_cast<int>(want));
  return old < 0 ? std::min(detect(), built()) : static_cast<Level>(old);
}

std::vector<std::string> supported_levels() {
  std::vector<std::string> out;
  const int top = std::min(static_cast<int>(detect()), static_cast<int>(built()));
  for (int i = 0; i <= top; ++i) out.emplace_back(kNames[i]);
  return out;
}

bool cpu_has_int8_dot() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace dispatch
}  // namespace fastkd
