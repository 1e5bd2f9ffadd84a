// The x86-64 vector support the CPU operators check at run time. The build targets baseline
// x86-64, so each vector function carries LORALITE_AVX2 (a per-function target) and runs only
// where cpu_has_avx2() says the CPU has AVX2 with FMA and F16C (every AVX2 CPU so far has all three).

#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#define LORALITE_HAVE_AVX2_PATH 1
#define LORALITE_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace loralite {

inline bool cpu_has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  return supported;
}

// 8 consecutive values widened to 8 float32 lanes.
LORALITE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

LORALITE_AVX2 inline __m256 load8(const c10::BFloat16* p) {  // a bfloat16 is the top half of a float32
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

LORALITE_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

LORALITE_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace loralite
#endif
