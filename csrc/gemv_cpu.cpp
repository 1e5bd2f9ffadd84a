// Few-row matrix products for decoding on the CPU, the torch operator loralite::gemv.
//
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n]      x: (M, K), W: (N, K), M <= 4
//
// x may carry leading dimensions, (..., K) holding M rows; y then has them too, (..., N).
// loralite::gemv_group takes several weights of the same K for one x (a layer's q, k and v) and
// streams them all in one parallel pass.
//
// At batch 1 a decoded token takes one row through every weight of the model, so decoding is
// bound by how fast the weights stream from memory. torch's matmul for a single row reads them
// at about half the bandwidth a plain sum reaches on a small x86 machine; this operator streams
// each weight row exactly once, for all M input rows together, and splits the output features
// over threads (at::parallel_for). Sums are float32 whatever the weight dtype (float32 or
// bfloat16, widened in registers), in a different order than torch's: results agree with
// F.linear to float32 rounding, not bit for bit.
//
// On x86-64 CPUs with AVX2 and FMA (checked at run time; the build targets the baseline) the
// inner loop is 16 weights per step into two accumulators per input row; elsewhere a plain
// loop computes the same sums.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_features.h"

namespace loralite {
namespace {

constexpr int64_t kMaxRows = 4;
// The vector loop asks for the weights this many bytes ahead of those it reads. On a 2-core
// AVX2 EPYC, with the hardware prefetchers alone one row streamed bfloat16 weights at a median
// 14.6 GB/s; 1 KiB ahead gave 17.5 GB/s, about what a plain float32 max over them reads
// (512 B and 2-3 KiB ahead did less well).
constexpr int64_t kPrefetchBytes = 1024;

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

// Scalar dot products of M rows of x with one weight row: the portable path.
template <typename W, int M>
void rows_scalar(const float* x, const W* w, int64_t k, float* sums) {
  for (int m = 0; m < M; ++m) {
    float s = 0.0f;
    for (int64_t i = 0; i < k; ++i) s += x[m * k + i] * widen(w[i]);
    sums[m] = s;
  }
}

#ifdef LORALITE_HAVE_AVX2_PATH
template <typename W, int M>
LORALITE_AVX2 void rows_avx2(const float* x, const W* w, int64_t k, float* sums) {
  __m256 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchBytes, _MM_HINT_T0);
    const __m256 w0 = load8(w + i), w1 = load8(w + i + 8);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * k + i), w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * k + i + 8), w1, acc[m][1]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float s = horizontal_sum(_mm256_add_ps(acc[m][0], acc[m][1]));
    for (int64_t j = i; j < k; ++j) s += x[m * k + j] * widen(w[j]);  // the last k % 16
    sums[m] = s;
  }
}
#endif  // LORALITE_HAVE_AVX2_PATH

// out[:, first:last] for M input rows; x is float32, W and out in T.
template <typename T, int M>
void gemv_range(const float* x, const T* w, const float* bias, int64_t k, int64_t n, int64_t first,
                int64_t last, T* out) {
#ifdef LORALITE_HAVE_AVX2_PATH
  const bool vector = cpu_has_avx2();
#endif
  float sums[M];
  for (int64_t j = first; j < last; ++j) {
#ifdef LORALITE_HAVE_AVX2_PATH
    if (vector) {
      rows_avx2<T, M>(x, w + j * k, k, sums);
    } else {
      rows_scalar<T, M>(x, w + j * k, k, sums);
    }
#else
    rows_scalar<T, M>(x, w + j * k, k, sums);
#endif
    for (int m = 0; m < M; ++m) out[m * n + j] = static_cast<T>(sums[m] + (bias ? bias[j] : 0.0f));
  }
}

// One weight of a group: W (n, K), its float32 bias or null, and its output (M, n).
template <typename T>
struct Product {
  const T* weight;
  const float* bias;
  int64_t n;
  T* out;
};

// y_p = x W_p^T + b_p for every product p of the group, in one parallel pass over all their rows
// (the q, k and v projections of a layer, say): one wake of the threads instead of one per weight.
template <typename T>
void gemv_typed(const at::Tensor& x, const std::vector<Product<T>>& products) {
  const int64_t rows = x.size(0), k = x.size(1);
  // x widened to float32 once (a few KiB), on the stack of this call rather than through aten.
  std::vector<float> widened(rows * k);
  const T* x_data = x.data_ptr<T>();
  for (int64_t i = 0; i < rows * k; ++i) widened[i] = widen(x_data[i]);
  const float* xs = widened.data();
  std::vector<int64_t> starts{0};  // product p owns rows [starts[p], starts[p + 1]) of the group
  for (const auto& p : products) starts.push_back(starts.back() + p.n);
  // Tasks of at least 64 KiB of weights: enough to pay for waking a thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (k * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, starts.back(), grain, [&](int64_t first, int64_t last) {
    for (size_t i = 0; i < products.size(); ++i) {
      const Product<T>& p = products[i];
      const int64_t lo = std::max(first, starts[i]) - starts[i], hi = std::min(last, starts[i + 1]) - starts[i];
      if (lo >= hi) continue;
      switch (rows) {
        case 1: gemv_range<T, 1>(xs, p.weight, p.bias, k, p.n, lo, hi, p.out); break;
        case 2: gemv_range<T, 2>(xs, p.weight, p.bias, k, p.n, lo, hi, p.out); break;
        case 3: gemv_range<T, 3>(xs, p.weight, p.bias, k, p.n, lo, hi, p.out); break;
        default: gemv_range<T, 4>(xs, p.weight, p.bias, k, p.n, lo, hi, p.out); break;
      }
    }
  });
}

// x: (..., K) with M = x.numel() / K rows; weights[i]: (N_i, K); returns [(..., N_i)].
std::vector<at::Tensor> gemv_group(const at::Tensor& x, at::TensorList weights,
                                   const std::vector<std::optional<at::Tensor>>& biases) {
  TORCH_CHECK(!weights.empty() && weights.size() == biases.size(),
              "gemv_group: give one bias (or None) per weight, and at least one weight");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "gemv: x must be (..., K), got ", x.sizes());
  const int64_t rows = x.numel() / x.size(-1);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "gemv takes 1 to ", kMaxRows, " rows, got ", rows);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gemv: weight must be float32 or bfloat16, not ",
              weights[0].scalar_type());
  std::vector<at::Tensor> outs, float_biases;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), "gemv: x must be (..., K) and weight (N, K), got ",
                x.sizes(), " and ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype && w.is_contiguous(),
                "gemv: x must have the weight's dtype and the weight must be contiguous");
    if (biases[i].has_value()) {
      TORCH_CHECK(biases[i]->dim() == 1 && biases[i]->size(0) == w.size(0), "gemv: bias must be (N,), got ",
                  biases[i]->sizes());
      float_biases.push_back(biases[i]->to(at::kFloat).contiguous());
    } else {
      float_biases.emplace_back();
    }
    outs.push_back(at::empty({rows, w.size(0)}, w.options()));
  }
  const at::Tensor xs = x.contiguous().view({rows, x.size(-1)});
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    std::vector<Product<T>> products;
    for (size_t i = 0; i < weights.size(); ++i) {
      products.push_back({weights[i].data_ptr<T>(),
                          float_biases[i].defined() ? float_biases[i].data_ptr<float>() : nullptr,
                          weights[i].size(0), outs[i].data_ptr<T>()});
    }
    gemv_typed<T>(xs, products);
  };
  if (dtype == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  for (auto& out : outs) {
    shape.back() = out.size(1);
    out = out.view(shape);
  }
  return outs;
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "gemv: x must be (..., K) and weight (N, K), got ", x.sizes(), " and ",
              weight.sizes());
  return gemv_group(x, {weight}, {bias})[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loralite, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("gemv_group(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(loralite, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_group", &gemv_group);
}

}  // namespace loralite
