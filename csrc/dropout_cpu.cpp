// Inverted dropout on the CPU, the torch operator loralite::dropout.
//
//   keep_i = u_i >= p          u_i uniform in [0, 1) with 32 random bits
//   y_i    = keep_i ? x_i / (1 - p) : 0
//
// returning y and the bool mask `keep` (one byte per element, for the backward pass).
//
// Random bits: SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
// generators", 2014) of a counter. Pair j of elements (2j, 2j + 1) takes the low and high 32
// bits of splitmix64(seed + j): stateless, so every mask bit depends only on (seed, index),
// whatever the number of threads. The seed is drawn from torch's generator by the caller, so
// torch.manual_seed reproduces the masks. torch's own bernoulli_ draws one Mersenne Twister
// number per element, serially, at ~10 ns an element. Here, on CPUs with AVX2 (checked at run
// time), four SplitMix64 streams run side by side in one register (64-bit multiplies built from
// three 32 x 32-bit ones), giving eight elements per step; elsewhere a scalar loop computes the
// same bits. Tasks split over threads.
//
// The operator loralite::dropout_backward(grad, keep, scale) is the gradient, keep ? grad * scale
// : 0, in one pass (aten's native_dropout_backward converts the mask to the gradient's dtype
// and multiplies twice).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cpu_features.h"
#include "dispatch.h"

namespace loralite {
namespace {

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

#ifdef LORALITE_HAVE_AVX2_PATH
// a * b mod 2^64 in each of four 64-bit lanes: lo(a) lo(b) + (hi(a) lo(b) + lo(a) hi(b)) 2^32.
LORALITE_AVX2 inline __m256i mul64(__m256i a, __m256i b) {
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), b),
                                         _mm256_mul_epu32(a, _mm256_srli_epi64(b, 32)));
  return _mm256_add_epi64(_mm256_mul_epu32(a, b), _mm256_slli_epi64(cross, 32));
}

LORALITE_AVX2 inline __m256i splitmix64_x4(__m256i z) {
  z = _mm256_add_epi64(z, _mm256_set1_epi64x(static_cast<int64_t>(0x9E3779B97F4A7C15ull)));
  z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), _mm256_set1_epi64x(static_cast<int64_t>(0xBF58476D1CE4E5B9ull)));
  z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), _mm256_set1_epi64x(static_cast<int64_t>(0x94D049BB133111EBull)));
  return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

// Pairs [first, last) four at a time (elements 2 first ... in eights); returns the first pair not done.
// The 32-bit lanes of four splitmix64 outputs are, in order, the bits of eight consecutive elements.
template <typename T>
LORALITE_AVX2 int64_t dropout_avx2(const T* x, int64_t first, int64_t last, uint32_t threshold, float scale,
                                   uint64_t seed, T* y, bool* keep) {
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);  // flips unsigned order into signed order
  const __m256i limit = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int32_t>(threshold)), sign);
  __m256i counter = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(seed + first)), _mm256_setr_epi64x(0, 1, 2, 3));
  int64_t j = first;
  for (; j + 4 <= last; j += 4) {
    const __m256i bits = splitmix64_x4(counter);
    counter = _mm256_add_epi64(counter, _mm256_set1_epi64x(4));
    const __m256i dropped = _mm256_cmpgt_epi32(limit, _mm256_xor_si256(bits, sign));  // u < threshold: -1
    const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(dropped), _mm256_extracti128_si256(dropped, 1));
    const __m128i bytes = _mm_add_epi8(_mm_packs_epi16(halves, halves), _mm_set1_epi8(1));  // 0 dropped, 1 kept
    _mm_storel_epi64(reinterpret_cast<__m128i*>(keep + 2 * j), bytes);
    if constexpr (std::is_same_v<T, float>) {
      const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(x + 2 * j), _mm256_set1_ps(scale));
      _mm256_storeu_ps(y + 2 * j, _mm256_andnot_ps(_mm256_castsi256_ps(dropped), scaled));
    } else {
      for (int64_t i = 2 * j; i < 2 * j + 8; ++i) y[i] = static_cast<T>(keep[i] ? static_cast<float>(x[i]) * scale : 0.0f);
    }
  }
  return j;
}
#endif

template <typename T>
void dropout_typed(const T* x, int64_t numel, uint64_t threshold, float scale, uint64_t seed, T* y,
                   bool* keep) {
  // Tasks start on even elements, so each splitmix64 output serves one pair.
  at::parallel_for(0, (numel + 1) / 2, 16384, [&](int64_t first_pair, int64_t last_pair) {
    int64_t j = first_pair;
#ifdef LORALITE_HAVE_AVX2_PATH
    if (cpu_has_avx2() && threshold <= 0xFFFFFFFFull) {
      // every full pair; the last pair of an odd numel holds one element, so stops short of it
      const int64_t full_pairs = std::min<int64_t>(last_pair, numel / 2);
      j = dropout_avx2<T>(x, first_pair, full_pairs, static_cast<uint32_t>(threshold), scale, seed, y, keep);
    }
#endif
    for (; j < last_pair; ++j) {
      const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(j));
      const int64_t i = 2 * j;
      const int64_t n = std::min<int64_t>(2, numel - i);
      for (int64_t h = 0; h < n; ++h) {
        const bool k = ((bits >> (32 * h)) & 0xFFFFFFFFull) >= threshold;
        keep[i + h] = k;
        y[i + h] = static_cast<T>(k ? static_cast<float>(x[i + h]) * scale : 0.0f);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dropout(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  const at::Tensor xs = x.contiguous();
  at::Tensor y = at::empty_like(xs);
  at::Tensor keep = at::empty(xs.sizes(), xs.options().dtype(at::kBool));
  // Keep when the 32 bits, read as an integer u * 2^32, reach p * 2^32.
  const uint64_t threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const auto s = static_cast<uint64_t>(seed);
  dispatch_float(xs.scalar_type(), "dropout", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_typed(xs.data_ptr<T>(), xs.numel(), threshold, scale, s, y.data_ptr<T>(), keep.data_ptr<bool>());
  });
  return {y, keep};
}

#ifdef LORALITE_HAVE_AVX2_PATH
// float32 elements [first, last) eight at a time; returns the first element not done.
LORALITE_AVX2 int64_t dropout_backward_avx2(const float* grad, const bool* keep, int64_t first, int64_t last,
                                            float scale, float* out) {
  int64_t i = first;
  for (; i + 8 <= last; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + i));
    const __m256i kept = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setzero_si256());
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(grad + i), _mm256_set1_ps(scale));
    _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_castsi256_ps(kept), scaled));
  }
  return i;
}
#endif

template <typename T>
void dropout_backward_typed(const T* grad, const bool* keep, int64_t numel, float scale, T* out) {
  at::parallel_for(0, numel, 32768, [&](int64_t first, int64_t last) {
    int64_t i = first;
#ifdef LORALITE_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float>) {
      if (cpu_has_avx2()) i = dropout_backward_avx2(grad, keep, first, last, scale, out);
    }
#endif
    for (; i < last; ++i) out[i] = keep[i] ? static_cast<T>(static_cast<float>(grad[i]) * scale) : T(0.0f);
  });
}

at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& keep, double scale) {
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.sizes() == grad.sizes(),
              "dropout_backward: keep must be a bool mask of grad's shape ", grad.sizes(), ", got ", keep.sizes());
  const at::Tensor g = grad.contiguous(), k = keep.contiguous();
  at::Tensor out = at::empty_like(g);
  dispatch_float(g.scalar_type(), "dropout_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dropout_backward_typed(g.data_ptr<T>(), k.data_ptr<bool>(), g.numel(), static_cast<float>(scale),
                           out.data_ptr<T>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loralite, m) {
  m.def("dropout(Tensor x, float p, int seed) -> (Tensor, Tensor)");
  m.def("dropout_backward(Tensor grad, Tensor keep, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(loralite, CPU, m) {
  m.impl("dropout", &dropout);
  m.impl("dropout_backward", &dropout_backward);
}

}  // namespace loralite
