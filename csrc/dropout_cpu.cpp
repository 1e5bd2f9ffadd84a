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
// number per element, serially, at ~10 ns an element; this is ~1 ns on one core and splits
// over threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace loralite {
namespace {

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
void dropout_typed(const T* x, int64_t numel, uint64_t threshold, float scale, uint64_t seed, T* y,
                   bool* keep) {
  // Tasks start on even elements, so each splitmix64 output serves one pair.
  at::parallel_for(0, (numel + 1) / 2, 16384, [&](int64_t first_pair, int64_t last_pair) {
    for (int64_t j = first_pair; j < last_pair; ++j) {
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
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dropout takes float32, bfloat16 or float16, not ", dtype);
  const at::Tensor xs = x.contiguous();
  at::Tensor y = at::empty_like(xs);
  at::Tensor keep = at::empty(xs.sizes(), xs.options().dtype(at::kBool));
  // Keep when the 32 bits, read as an integer u * 2^32, reach p * 2^32.
  const uint64_t threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const auto s = static_cast<uint64_t>(seed);
  bool* k = keep.data_ptr<bool>();
  switch (dtype) {
    case at::kFloat:
      dropout_typed(xs.data_ptr<float>(), xs.numel(), threshold, scale, s, y.data_ptr<float>(), k);
      break;
    case at::kBFloat16:
      dropout_typed(xs.data_ptr<c10::BFloat16>(), xs.numel(), threshold, scale, s, y.data_ptr<c10::BFloat16>(), k);
      break;
    default:
      dropout_typed(xs.data_ptr<c10::Half>(), xs.numel(), threshold, scale, s, y.data_ptr<c10::Half>(), k);
      break;
  }
  return {y, keep};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loralite, m) { m.def("dropout(Tensor x, float p, int seed) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(loralite, CPU, m) { m.impl("dropout", &dropout); }

}  // namespace loralite
