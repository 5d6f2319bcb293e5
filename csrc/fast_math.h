// fastkd: fast float32 exp and log for the CPU kernels, one implementation per instruction-set level
// (AVX-512, AVX2+FMA, and a portable scalar version used by the default level and for loop tails).
//
// exp(x):  n = round(x / ln2), r = x - n ln2 (ln2 split in a short exact head and a tail, so n ln2 is
//          exact, |r| <= ln2/2), exp(r) = 1 + r + r^2 P(r) with P of degree 4 (Horner, FMA), and the
//          2^n factor added straight into the exponent bits. x < -87.3365 (below FLT_MIN) gives 0,
//          x > 88.7228 gives +inf, NaN stays NaN.
// fast_exp_nonpos(x): the same exp for x <= 0 (or NaN), as a softmax's shifted logits are: without
//          the clamp at the top and the +inf branch (3 instructions of ~20 at AVX2), identical results.
// log(x):  x = 2^e (1 + u) with 1 + u in [sqrt(1/2), sqrt(2)) taken from the bits (denormals are
//          scaled by 2^23 first), log(1 + u) = u - u^2/2 + u^3 Q(u) with Q of degree 6, plus e ln2 (split
//          as above). log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN stays NaN.
// The coefficients are minimax fits of the relative error (Lawson's algorithm, float32-rounded), made
// by scripts/fit_fast_math.py: polynomial error below 0.1 ulp (exp) and 0.3 ulp (log), so the
// results are within a few ulp of the exact values (tests/test_numerics.py measures it over the range).
//
// Include from a file compiled per level (cpu_dispatch.h); everything is in fastkd::CPU_CAPABILITY.
#pragma once

#include "cpu_dispatch.h"

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastkd {
namespace CPU_CAPABILITY {
namespace fm {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;             // 9 significant bits: n * kLn2Hi is exact for |n| < 2^15
constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln2 - kLn2Hi
constexpr float kExpLo = -87.3365479f;              // log(FLT_MIN)
constexpr float kExpHi = 88.7228f;                  // just below log(FLT_MAX)
// exp(r) = 1 + r + r^2 (E2 + E3 r + E4 r^2 + E5 r^3 + E6 r^4)
constexpr float kE2 = 0.49999994f, kE3 = 0.16666521f, kE4 = 0.04166839f, kE5 = 0.00836871f, kE6 = 0.0013814613f;
// log(1 + u) = u - u^2/2 + u^3 (Q0 + Q1 u + ... + Q6 u^6)
constexpr float kQ0 = 0.3333391f, kQ1 = -0.25001338f, kQ2 = 0.19963063f, kQ3 = -0.16577584f, kQ4 = 0.14914769f,
                kQ5 = -0.14267492f, kQ6 = 0.087004386f;
constexpr float kSqrt2 = 1.41421356f;
constexpr float kFltMin = 1.17549435e-38f;

inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float exp_scalar(float x) {
  if (std::isnan(x)) return x;
  if (x < kExpLo) return 0.0f;
  if (x > kExpHi) return std::numeric_limits<float>::infinity();
  const float n = std::nearbyint(x * kLog2e);
  float r = madd(n, -kLn2Hi, x);
  r = madd(n, -kLn2Lo, r);
  float p = kE6;
  p = madd(p, r, kE5);
  p = madd(p, r, kE4);
  p = madd(p, r, kE3);
  p = madd(p, r, kE2);
  p = madd(p, r, 1.0f);
  p = madd(p, r, 1.0f);
  return float_of(bits_of(p) + (static_cast<uint32_t>(static_cast<int32_t>(n)) << 23));
}

inline float log_scalar(float x) {
  if (!(x >= 0.0f)) return std::numeric_limits<float>::quiet_NaN();  // negative or NaN
  if (x == 0.0f) return -std::numeric_limits<float>::infinity();
  if (x == std::numeric_limits<float>::infinity()) return x;
  int32_t eadj = 0;
  if (x < kFltMin) {
    x *= 8388608.0f;  // 2^23
    eadj = 23;
  }
  const uint32_t b = bits_of(x);
  int32_t e = static_cast<int32_t>(b >> 23) - 127 - eadj;
  float f = float_of((b & 0x007fffffu) | 0x3f800000u);
  if (f > kSqrt2) {
    f *= 0.5f;
    e += 1;
  }
  const float u = f - 1.0f;
  float q = kQ6;
  q = madd(q, u, kQ5);
  q = madd(q, u, kQ4);
  q = madd(q, u, kQ3);
  q = madd(q, u, kQ2);
  q = madd(q, u, kQ1);
  q = madd(q, u, kQ0);
  q = madd(q, u, -0.5f);
  const float y = madd(q, u * u, u);
  const float ef = static_cast<float>(e);
  return madd(ef, kLn2Hi, madd(ef, kLn2Lo, y));
}

}  // namespace fm

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)

// exp for x <= kExpHi or NaN (the kernels call it on shifted logits, x <= 0): range reduction, the
// polynomial, 2^n into the exponent bits, 0 below log(FLT_MIN). No upper clamp: above kExpHi the
// result is garbage, and fast_exp (below) adds the clamp and the +inf branch.
inline Vectorized<float> fast_exp_nonpos(const Vectorized<float>& v) {
  const __m512 x = v;
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(fm::kExpLo), x);  // NaN stays NaN (second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(fm::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(fm::kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(fm::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(fm::kE6);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(fm::kE5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(fm::kE4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(fm::kE3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(fm::kE2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  const __m512 res = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(fm::kExpLo), _CMP_NLT_UQ), res);
}

// exp on the whole float32 range: fast_exp_nonpos of min(x, kExpHi) (for x <= kExpHi the same steps and
// bits: the clamp at the bottom, the underflow mask and NaN behave alike), then +inf above kExpHi.
inline Vectorized<float> fast_exp(const Vectorized<float>& v) {
  const __m512 x = v;
  const __m512 res = fast_exp_nonpos(Vectorized<float>(_mm512_min_ps(_mm512_set1_ps(fm::kExpHi), x)));  // NaN stays NaN
  return _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x, _mm512_set1_ps(fm::kExpHi), _CMP_GT_OQ),
                            _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

inline Vectorized<float> fast_log(const Vectorized<float>& v) {
  __m512 x = v;
  const __mmask16 small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(fm::kFltMin), _CMP_LT_OQ);
  x = _mm512_mask_mul_ps(x, small, x, _mm512_set1_ps(8388608.0f));
  const __m512i b = _mm512_castps_si512(x);
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(127));
  e = _mm512_mask_sub_epi32(e, small, e, _mm512_set1_epi32(23));
  __m512 f = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f800000)));
  const __mmask16 big = _mm512_cmp_ps_mask(f, _mm512_set1_ps(fm::kSqrt2), _CMP_GT_OQ);
  f = _mm512_mask_mul_ps(f, big, f, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
  const __m512 u = _mm512_sub_ps(f, _mm512_set1_ps(1.0f));
  __m512 q = _mm512_set1_ps(fm::kQ6);
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(fm::kQ5));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(fm::kQ4));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(fm::kQ3));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(fm::kQ2));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(fm::kQ1));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(fm::kQ0));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(-0.5f));
  const __m512 y = _mm512_fmadd_ps(q, _mm512_mul_ps(u, u), u);
  const __m512 ef = _mm512_cvtepi32_ps(e);
  __m512 res = _mm512_fmadd_ps(ef, _mm512_set1_ps(fm::kLn2Hi), _mm512_fmadd_ps(ef, _mm512_set1_ps(fm::kLn2Lo), y));
  const __m512 x0 = v;
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x0, _mm512_setzero_ps(), _CMP_EQ_OQ),
                           _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x0, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ),
                           x0);
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x0, _mm512_setzero_ps(), _CMP_NGE_UQ),
                           _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  return res;
}

#elif defined(CPU_CAPABILITY_AVX2)


// exp for x <= kExpHi or NaN (the kernels call it on shifted logits, x <= 0): range reduction, the
// polynomial, 2^n into the exponent bits, 0 below log(FLT_MIN). No upper clamp: above kExpHi the
// result is garbage, and fast_exp (below) adds the clamp and the +inf branch.
inline Vectorized<float> fast_exp_nonpos(const Vectorized<float>& v) {
  const __m256 x = v;
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(fm::kExpLo), x);  // NaN stays NaN (second operand)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(fm::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(fm::kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(fm::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(fm::kE6);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fm::kE5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fm::kE4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fm::kE3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fm::kE2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 res = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(res, _mm256_cmp_ps(x, _mm256_set1_ps(fm::kExpLo), _CMP_NLT_UQ));
}

// exp on the whole float32 range: fast_exp_nonpos of min(x, kExpHi) (for x <= kExpHi the same steps and
// bits: the clamp at the bottom, the underflow mask and NaN behave alike), then +inf above kExpHi.
inline Vectorized<float> fast_exp(const Vectorized<float>& v) {
  const __m256 x = v;
  const __m256 res = fast_exp_nonpos(Vectorized<float>(_mm256_min_ps(_mm256_set1_ps(fm::kExpHi), x)));  // NaN stays NaN
  return _mm256_blendv_ps(res, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                          _mm256_cmp_ps(x, _mm256_set1_ps(fm::kExpHi), _CMP_GT_OQ));
}

inline Vectorized<float> fast_log(const Vectorized<float>& v) {
  const __m256 x0 = v;
  const __m256 small = _mm256_cmp_ps(x0, _mm256_set1_ps(fm::kFltMin), _CMP_LT_OQ);
  const __m256 x = _mm256_blendv_ps(x0, _mm256_mul_ps(x0, _mm256_set1_ps(8388608.0f)), small);
  const __m256i b = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127));
  e = _mm256_sub_epi32(e, _mm256_and_si256(_mm256_castps_si256(small), _mm256_set1_epi32(23)));
  __m256 f = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(f, _mm256_set1_ps(fm::kSqrt2), _CMP_GT_OQ);
  f = _mm256_blendv_ps(f, _mm256_mul_ps(f, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big lanes are all ones = -1
  const __m256 u = _mm256_sub_ps(f, _mm256_set1_ps(1.0f));
  __m256 q = _mm256_set1_ps(fm::kQ6);
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(fm::kQ5));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(fm::kQ4));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(fm::kQ3));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(fm::kQ2));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(fm::kQ1));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(fm::kQ0));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(-0.5f));
  const __m256 y = _mm256_fmadd_ps(q, _mm256_mul_ps(u, u), u);
  const __m256 ef = _mm256_cvtepi32_ps(e);
  __m256 res = _mm256_fmadd_ps(ef, _mm256_set1_ps(fm::kLn2Hi), _mm256_fmadd_ps(ef, _mm256_set1_ps(fm::kLn2Lo), y));
  res = _mm256_blendv_ps(res, _mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                         _mm256_cmp_ps(x0, _mm256_setzero_ps(), _CMP_EQ_OQ));
  res = _mm256_blendv_ps(res, x0, _mm256_cmp_ps(x0, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ));
  res = _mm256_blendv_ps(res, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                         _mm256_cmp_ps(x0, _mm256_setzero_ps(), _CMP_NGE_UQ));
  return res;
}

#else  // default level: the scalar algorithm lane by lane

inline Vectorized<float> fast_exp(const Vectorized<float>& v) {
  alignas(64) float a[Vectorized<float>::size()];
  v.store(a);
  for (int i = 0; i < Vectorized<float>::size(); ++i) a[i] = fm::exp_scalar(a[i]);
  return Vectorized<float>::loadu(a);
}

inline Vectorized<float> fast_exp_nonpos(const Vectorized<float>& v) { return fast_exp(v); }

inline Vectorized<float> fast_log(const Vectorized<float>& v) {
  alignas(64) float a[Vectorized<float>::size()];
  v.store(a);
  for (int i = 0; i < Vectorized<float>::size(); ++i) a[i] = fm::log_scalar(a[i]);
  return Vectorized<float>::loadu(a);
}

#endif

inline float fast_exp(float x) { return fm::exp_scalar(x); }
inline float fast_exp_nonpos(float x) { return fm::exp_scalar(x); }
inline float fast_log(float x) { return fm::log_scalar(x); }
// float64 stays on the accurate at::vec / libm versions.
inline Vectorized<double> fast_exp(const Vectorized<double>& v) { return v.exp(); }
inline Vectorized<double> fast_exp_nonpos(const Vectorized<double>& v) { return v.exp(); }
inline Vectorized<double> fast_log(const Vectorized<double>& v) { return v.log(); }
inline double fast_exp(double x) { return std::exp(x); }
inline double fast_exp_nonpos(double x) { return std::exp(x); }
inline double fast_log(double x) { return std::log(x); }

}  // namespace CPU_CAPABILITY
}  // namespace fastkd
