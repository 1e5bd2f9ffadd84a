// NF4 (and FP4) quantization on the CPU, the torch operator loralite::nf4_quantize.
//
// The same arithmetic as the reference, loralite/nf4.py (quantize), one block at a time:
//
//   absmax_b = max_i |w_i|                      over the block's elements, in float32
//   s_i      = clamp(w_i * (1 / max(absmax_b, 1e-38)), -1, 1)     a full block
//            = clamp(w_i / max(absmax_b, 1e-38), -1, 1)           the partial last block
//   nibble_i = order[first j with midpoints[j] >= s_i, else 15]
//
// where midpoints are the 15 decision boundaries between the sorted codes and order maps a
// sorted position back to its nibble, both computed by the caller exactly as the reference
// computes them (a value on a boundary goes to the smaller code; NaN to position 15, as
// torch.bucketize). The stored absmax of a full block is unclamped, the last block's clamped
// (bitsandbytes' convention). Bytes hold element 2k in the high nibble; an odd count pads the
// last low nibble with the code of 0.0. Blocks are split over threads; no temporaries, so a
// weight of any size is quantized in one call.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "dispatch.h"

namespace loralite {
namespace {

constexpr float kMinScale = 1e-38f;  // bitsandbytes clamps a block absmax to this before dividing

// max(a, kMinScale) that keeps NaN, as torch.clamp does.
inline float clamp_min_scale(float a) { return a < kMinScale ? kMinScale : a; }

struct Codebook {
  float midpoints[15];
  uint8_t order[16];

  uint8_t nibble(float s) const {  // s in [-1, 1] or NaN
    if (std::isnan(s)) return order[15];
    int j = 0;  // the first boundary >= s = how many boundaries are below s (they are sorted); no branches
    for (int t = 0; t < 15; ++t) j += midpoints[t] < s;
    return order[j];
  }
};

template <typename T>
void quantize_block(const T* w, int64_t begin, int64_t end, bool full, const Codebook& book, float* absmax,
                    uint8_t* data) {
  float top = 0.0f;
  bool nan = false;
  for (int64_t i = begin; i < end; ++i) {
    const float v = std::fabs(static_cast<float>(w[i]));
    nan |= std::isnan(v);
    top = std::max(top, v);
  }
  if (nan) top = std::numeric_limits<float>::quiet_NaN();  // torch.amax propagates NaN
  const float scale = clamp_min_scale(top);
  *absmax = full ? top : scale;
  const float inverse = 1.0f / scale;
  auto scaled = [&](int64_t i) {
    const float v = static_cast<float>(w[i]);
    const float s = full ? v * inverse : v / scale;
    return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);  // NaN stays NaN
  };
  // begin is even (blocksizes are even), so the block owns bytes begin / 2 ...
  for (int64_t i = begin; i < end; i += 2) {
    const uint8_t high = book.nibble(scaled(i));
    const uint8_t low = i + 1 < end ? book.nibble(scaled(i + 1)) : book.nibble(0.0f);  // odd count: pad 0.0
    data[i / 2] = static_cast<uint8_t>(high << 4 | low);
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& w, int64_t blocksize, const at::Tensor& midpoints,
                                                const at::Tensor& order) {
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, "nf4_quantize: blocksize must be even, got ", blocksize);
  TORCH_CHECK(midpoints.scalar_type() == at::kFloat && midpoints.numel() == 15 && order.numel() == 16,
              "nf4_quantize: midpoints must be 15 float32 boundaries and order 16 nibbles");
  Codebook book;
  const at::Tensor m = midpoints.contiguous(), o = order.to(at::kLong).contiguous();
  for (int j = 0; j < 15; ++j) book.midpoints[j] = m.data_ptr<float>()[j];
  for (int j = 0; j < 16; ++j) book.order[j] = static_cast<uint8_t>(o.data_ptr<int64_t>()[j]);
  const at::Tensor flat = w.contiguous().view(-1);
  const int64_t n = flat.numel(), blocks = (n + blocksize - 1) / blocksize;
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  at::Tensor data = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  dispatch_float(w.scalar_type(), "nf4_quantize", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = flat.data_ptr<T>();
    float* a = absmax.data_ptr<float>();
    uint8_t* d = data.data_ptr<uint8_t>();
    at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
        quantize_block<T>(x, begin, end, end - begin == blocksize, book, a + b, d);
      }
    });
  });
  return {absmax, data};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loralite, m) {
  m.def("nf4_quantize(Tensor w, int blocksize, Tensor midpoints, Tensor order) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(loralite, CPU, m) { m.impl("nf4_quantize", &nf4_quantize); }

}  // namespace loralite
