// The x86-64 vector support the CPU operators check at run time. The build targets baseline
// x86-64, so each vector function carries LORALITE_AVX2 (a per-function target) and runs only
// where cpu_has_avx2() says the CPU has AVX2 with FMA and F16C (every AVX2 CPU so far has all three).

#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LORALITE_HAVE_AVX2_PATH 1
#define LORALITE_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace loralite {

inline bool cpu_has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  return supported;
}

}  // namespace loralite
#endif
