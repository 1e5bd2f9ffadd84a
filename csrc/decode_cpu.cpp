// The small steps of a decoded token on the CPU, each one torch operator:
//
//   rms_norm(x, w, eps)      y = w * round(x / sqrt(mean(x^2) + eps))   x: (..., D), w: (D,)
//   rotary(x, cos, sin)      y = x * cos + rotate_half(x) * sin         x: (B, T, H, hd), cos, sin: (B or 1, T, hd)
//   decode_attention(q, k, v, mask, scale)
//                            y = softmax(scale * q k^T) v               q: (B, 1, H, hd), k, v: (B, Hkv, S, hd)
//
// At batch 1 a token reads every weight once (loralite::gemv) and, around those reads, takes
// per layer two RMSNorms (eight aten ops each), two rotary embeddings (six each) and one
// single-query attention. Each aten op costs microseconds of dispatch and allocation however
// little it computes, and torch's CPU attention is tuned for many queries, not one: together
// they cost about as much as the weight reads. These operators do each step in one call.
//
// Rounding follows the PyTorch references in loralite/ops.py. rms_norm and rotary compute in
// float32 and round to the tensor's dtype exactly where the references do (build flag
// -ffp-contract=off: no fused multiply-adds), so rotary is bit-identical and rms_norm differs
// only in the order and precision of the mean's sum (double here). decode_attention accumulates in float32, as torch's CPU
// flash attention does, in its own order. The CPU-dependent part is the attention's dot
// products and weighted sums: AVX2/FMA where the CPU has it (checked at run time), plain loops
// elsewhere.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "dispatch.h"

namespace loralite {
namespace {

// float -> T, rounded to nearest even (the identity for float).
template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// ---------------------------------------------------------------------------------------------
// rms_norm

template <typename T>
void rms_norm_rows(const T* x, const T* w, float eps, int64_t d, int64_t first, int64_t last, T* y) {
  for (int64_t row = first; row < last; ++row) {
    const T* xr = x + row * d;
    T* yr = y + row * d;
    double squares = 0.0;  // double: closer to torch's pairwise float sum than a float loop
    for (int64_t i = 0; i < d; ++i) {
      const float v = static_cast<float>(xr[i]);
      squares += static_cast<double>(v * v);
    }
    const float mean = static_cast<float>(squares) / static_cast<float>(d);
    const float inv_rms = 1.0f / std::sqrt(mean + eps);
    for (int64_t i = 0; i < d; ++i) {
      const T h = round_to<T>(static_cast<float>(xr[i]) * inv_rms);  // normalized, in x's dtype
      yr[i] = round_to<T>(static_cast<float>(w[i]) * static_cast<float>(h));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be (D,) for x (..., D), got ", weight.sizes(), " and ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and x must share a dtype");
  const at::Tensor xs = x.contiguous(), ws = weight.contiguous();
  at::Tensor y = at::empty_like(xs);
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  dispatch_float(x.scalar_type(), "rms_norm", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *xp = xs.data_ptr<T>(), *wp = ws.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t a, int64_t b) {
      rms_norm_rows<T>(xp, wp, static_cast<float>(eps), d, a, b, yp);
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// rotary

// Positions pos = b * T + t in [first, last); cos and sin hold one table for all b when shared.
template <typename T>
void rotary_rows(const T* x, const T* cos, const T* sin, int64_t seq, bool shared, int64_t heads, int64_t hd,
                 int64_t first, int64_t last, T* y) {
  const int64_t half = hd / 2;
  for (int64_t pos = first; pos < last; ++pos) {
    const int64_t row = shared ? pos % seq : pos;
    const T *c = cos + row * hd, *s = sin + row * hd;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xr = x + (pos * heads + h) * hd;
      T* yr = y + (pos * heads + h) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        // rotate_half(x)[i] = -x[i + hd/2] in the first half, x[i - hd/2] in the second
        const float rotated = i < half ? -static_cast<float>(xr[i + half]) : static_cast<float>(xr[i - half]);
        const T a = round_to<T>(static_cast<float>(xr[i]) * static_cast<float>(c[i]));
        const T b = round_to<T>(rotated * static_cast<float>(s[i]));
        yr[i] = round_to<T>(static_cast<float>(a) + static_cast<float>(b));
      }
    }
  }
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary: x must be (B, T, H, hd) with hd even, got ", x.sizes());
  const auto expected = std::vector<int64_t>{x.size(0), x.size(1), x.size(3)};
  const bool shared = cos.dim() == 3 && cos.size(0) == 1 && x.size(0) != 1;  // one table for every sequence
  auto table = expected;
  if (shared) table[0] = 1;
  TORCH_CHECK(cos.sizes() == table && sin.sizes() == table, "rotary: cos and sin must be (B, T, hd) = ", expected,
              " or (1, T, hd), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary: cos and sin must have x's dtype");
  const at::Tensor xs = x.contiguous(), cs = cos.contiguous(), ss = sin.contiguous();
  at::Tensor y = at::empty_like(xs);
  const int64_t positions = x.size(0) * x.size(1), heads = x.size(2), hd = x.size(3);
  dispatch_float(x.scalar_type(), "rotary", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(heads * hd, 1));
    at::parallel_for(0, positions, grain, [&](int64_t a, int64_t b) {
      rotary_rows<T>(xs.data_ptr<T>(), cs.data_ptr<T>(), ss.data_ptr<T>(), x.size(1), shared, heads, hd, a, b,
                     y.data_ptr<T>());
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// decode_attention: per (batch, query head), scores s_j = scale * q . k_j over the S keys of its
// key/value head, p = softmax(s) (masked keys get p_j = 0), y = sum_j p_j v_j.

// dot(a, b) for n floats of a and n values of b; and acc += p * b.
template <typename T>
float dot_scalar(const float* a, const T* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <typename T>
void axpy_scalar(float p, const T* b, int64_t n, float* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += p * static_cast<float>(b[i]);
}

#ifdef LORALITE_HAVE_AVX2_PATH
template <typename T>
LORALITE_AVX2 float dot_avx2(const float* a, const T* b, int64_t n) {  // n % 8 == 0
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  return horizontal_sum(acc);
}

template <typename T>
LORALITE_AVX2 void axpy_avx2(float p, const T* b, int64_t n, float* acc) {  // n % 8 == 0
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t i = 0; i < n; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, load8(b + i), _mm256_loadu_ps(acc + i)));
  }
}
#endif

// Strides, in elements, of the (B, Hkv, S, hd) keys and values; the last one is 1.
struct KVStrides {
  int64_t batch, head, position;
};

template <typename T>
void attend_one(const T* q, const T* k, const T* v, KVStrides ks, KVStrides vs, const bool* mask, int64_t keys,
                int64_t hd, float scale, bool vector, float* query, float* scores, float* acc, T* y) {
  for (int64_t i = 0; i < hd; ++i) query[i] = static_cast<float>(q[i]);  // widened once
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < keys; ++j) {
    if (mask != nullptr && !mask[j]) continue;
    const T* kj = k + j * ks.position;
#ifdef LORALITE_HAVE_AVX2_PATH
    const float s = vector ? dot_avx2<T>(query, kj, hd) : dot_scalar<T>(query, kj, hd);
#else
    const float s = dot_scalar<T>(query, kj, hd);
#endif
    scores[j] = s * scale;
    top = std::max(top, scores[j]);
  }
  std::fill(acc, acc + hd, 0.0f);
  float total = 0.0f;
  for (int64_t j = 0; j < keys; ++j) {
    if (mask != nullptr && !mask[j]) continue;
    const float p = std::exp(scores[j] - top);  // unnormalized; divided by the total below
    total += p;
    const T* vj = v + j * vs.position;
#ifdef LORALITE_HAVE_AVX2_PATH
    if (vector) {
      axpy_avx2<T>(p, vj, hd, acc);
      continue;
    }
#endif
    axpy_scalar<T>(p, vj, hd, acc);
  }
  // every key masked: 0, as torch's SDPA gives since 2.5 (not 0 / 0)
  for (int64_t i = 0; i < hd; ++i) y[i] = round_to<T>(total > 0.0f ? acc[i] / total : 0.0f);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(1) == 1, "decode_attention: q must be (B, 1, H, hd), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "decode_attention: k and v must be (B, Hkv, S, hd) for q ", q.sizes(), ", got ", k.sizes(), " and ",
              v.sizes());
  const int64_t batch = q.size(0), heads = q.size(2), hd = q.size(3), kv_heads = k.size(1), keys = k.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode_attention: ", kv_heads,
              " key/value heads do not divide ", heads, " query heads");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "decode_attention: q, k and v must share a dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v must be contiguous in hd");
  std::optional<at::Tensor> m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == batch &&
                    mask->size(1) == keys,
                "decode_attention: mask must be bool (B, S) = (", batch, ", ", keys, "), got ", mask->sizes());
    m = mask->contiguous();
  }
  const at::Tensor qs = q.contiguous();
  at::Tensor y = at::empty_like(qs);
  const KVStrides ks{k.stride(0), k.stride(1), k.stride(2)}, vs{v.stride(0), v.stride(1), v.stride(2)};
#ifdef LORALITE_HAVE_AVX2_PATH
  const bool vector = cpu_has_avx2() && hd % 8 == 0;
#else
  const bool vector = false;
#endif
  dispatch_float(q.scalar_type(), "decode_attention", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *qp = qs.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const bool* mp = m.has_value() ? m->data_ptr<bool>() : nullptr;
    // Tasks of at least ~128k multiply-adds (about 30 us): below that, waking a thread costs more
    // than it saves, so short contexts stay on the calling thread.
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(keys * hd, 1));
    at::parallel_for(0, batch * heads, grain, [&](int64_t first, int64_t last) {
      std::vector<float> query(hd), scores(keys), acc(hd);
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / heads, h = task % heads, g = h / (heads / kv_heads);
        attend_one<T>(qp + task * hd, kp + b * ks.batch + g * ks.head, vp + b * vs.batch + g * vs.head, ks, vs,
                      mp == nullptr ? nullptr : mp + b * keys, keys, hd, static_cast<float>(scale), vector,
                      query.data(), scores.data(), acc.data(), yp + task * hd);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loralite, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(loralite, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
  m.impl("decode_attention", &decode_attention);
}

}  // namespace loralite
