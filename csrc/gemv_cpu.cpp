// Few-row matrix products for decoding on the CPU, the torch operator loralite::gemv.
//
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n]      x: (M, K), W: (N, K), M <= 4
//
// x may carry leading dimensions, (..., K) holding M rows; y then has them too, (..., N).
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

template <typename T>
void gemv_typed(const at::Tensor& x, const at::Tensor& weight, const float* bias, at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  // x widened to float32 once (a few KiB), on the stack of this call rather than through aten.
  std::vector<float> widened(rows * k);
  const T* x_data = x.data_ptr<T>();
  for (int64_t i = 0; i < rows * k; ++i) widened[i] = widen(x_data[i]);
  const float* xs = widened.data();
  const T* w = weight.data_ptr<T>();
  T* y = out.data_ptr<T>();
  // Tasks of at least 64 KiB of weights: enough to pay for waking a thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (k * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
    switch (rows) {
      case 1: gemv_range<T, 1>(xs, w, bias, k, n, first, last, y); break;
      case 2: gemv_range<T, 2>(xs, w, bias, k, n, first, last, y); break;
      case 3: gemv_range<T, 3>(xs, w, bias, k, n, first, last, y); break;
      default: gemv_range<T, 4>(xs, w, bias, k, n, first, last, y); break;
    }
  });
}

// x: (..., K) with M = x.numel() / K rows; returns (..., N).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1) && weight.size(1) > 0,
              "gemv: x must be (..., K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  const int64_t rows = x.numel() / x.size(-1);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "gemv takes 1 to ", kMaxRows, " rows, got ", rows);
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gemv: weight must be float32 or bfloat16, not ",
              dtype);
  TORCH_CHECK(x.scalar_type() == dtype && weight.is_contiguous(),
              "gemv: x must have the weight's dtype and the weight must be contiguous");
  const at::Tensor xs = x.contiguous().view({rows, x.size(-1)});
  std::optional<at::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "gemv: bias must be (N,), got ",
                bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({rows, weight.size(0)}, weight.options());
  const float* bias_data = b.has_value() ? b->data_ptr<float>() : nullptr;
  if (dtype == at::kFloat) {
    gemv_typed<float>(xs, weight, bias_data, out);
  } else {
    gemv_typed<c10::BFloat16>(xs, weight, bias_data, out);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loralite, m) { m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(loralite, CPU, m) { m.impl("gemv", &gemv); }

}  // namespace loralite
