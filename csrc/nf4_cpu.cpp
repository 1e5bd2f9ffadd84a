// NF4 dequantization on the CPU, registered as the torch operator loralite::nf4_dequantize.
//
// The format (see loralite/nf4.py): element j of the flattened weight is
//
//   nibble_j = data[j / 2] >> 4 (j even, the high nibble) or data[j / 2] & 0xF (j odd)
//   scale_b  = absmax[b]                                                   (plain)
//            = nested_code[absmax[b]] * nested_absmax[b / 256] + offset    (double quant)
//   W_j      = code[nibble_j] * scale_(j / blocksize), rounded to the output dtype.
//
// Within one block every element is one of only 16 values, code[i] * scale. So each block
// first builds that 16-entry table in the output dtype (16 multiplies and roundings, the
// same float32 operations as the reference, hence bit-identical results), then every
// element is a single table lookup: the inner loop is pure loads and stores, which the
// compiler unrolls, and the whole operation runs near memory bandwidth. Blocks are split
// over threads with at::parallel_for (OpenMP in the standard torch build).
//
// The schema lives here; csrc/nf4_gemv_binding.cpp adds the CUDA GEMV when it is built.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace loralite {
namespace {

// Absmax values are quantized again in groups of this many (bitsandbytes' fixed size).
constexpr int64_t kNestedBlocksize = 256;

// The scale of block b, in float32 exactly as the reference computes it (no fused multiply-add:
// the build passes -ffp-contract=off).
struct Scales {
  const float* absmax = nullptr;         // plain: one float32 per block
  const uint8_t* absmax_code = nullptr;  // double quant: one uint8 code per block
  const float* nested_absmax = nullptr;  // double quant: one float32 per 256 blocks
  const float* nested_code = nullptr;    // double quant: the 256-entry signed dynamic map
  float offset = 0.0f;                   // double quant: mean of the absmaxes

  float operator()(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    return nested_code[absmax_code[b]] * nested_absmax[b / kNestedBlocksize] + offset;
  }
};

// Bytes [byte_begin, byte_end) of one block -> elements [2 * byte_begin, ...) of out, through the
// block's 16-entry table. The last element is skipped when numel is odd.
template <typename T>
void decode_block(const uint8_t* data, int64_t byte_begin, int64_t byte_end, int64_t numel,
                  const T* table, T* out) {
  int64_t full_end = byte_end;
  if (2 * byte_end > numel) full_end = byte_end - 1;  // the final byte holds one element
  for (int64_t p = byte_begin; p < full_end; ++p) {
    const uint8_t byte = data[p];
    out[2 * p] = table[byte >> 4];
    out[2 * p + 1] = table[byte & 0xF];
  }
  if (full_end < byte_end) out[2 * full_end] = table[data[full_end] >> 4];
}

template <typename T>
void dequantize_into(const uint8_t* data, const Scales& scales, const float* code, int64_t blocksize,
                     int64_t numel, T* out) {
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const int64_t bytes_per_block = blocksize / 2;
  const int64_t n_bytes = (numel + 1) / 2;
  // Enough blocks per task to amortise the scheduling: ~64k elements.
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);
  at::parallel_for(0, n_blocks, grain, [&](int64_t first, int64_t last) {
    T table[16];
    for (int64_t b = first; b < last; ++b) {
      const float scale = scales(b);
      for (int i = 0; i < 16; ++i) table[i] = static_cast<T>(code[i] * scale);
      const int64_t begin = b * bytes_per_block;
      decode_block(data, begin, std::min(begin + bytes_per_block, n_bytes), numel, table, out);
    }
  });
}

// Checks the inputs and writes the dense weight into `out` (numel elements, contiguous).
at::Tensor& nf4_dequantize_out(const at::Tensor& data, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double offset,
                               const at::Tensor& code, int64_t blocksize, int64_t numel,
                               at::ScalarType dtype, at::Tensor& out) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous(), "data must be contiguous uint8");
  TORCH_CHECK(data.numel() == (numel + 1) / 2, "data holds ", data.numel(), " bytes, ", numel,
              " elements need ", (numel + 1) / 2);
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize must be even, got ", blocksize);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_contiguous(),
              "code must be a contiguous float32 codebook of 16 entries");
  TORCH_CHECK(out.scalar_type() == dtype && out.numel() == numel && out.is_contiguous(),
              "out must be a contiguous ", dtype, " tensor of ", numel, " elements");
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == n_blocks && absmax.is_contiguous(), "absmax must hold one value per block (",
              n_blocks, "), got ", absmax.numel());
  Scales scales;
  if (nested_absmax.has_value()) {
    TORCH_CHECK(nested_code.has_value(), "double quantization needs nested_code with nested_absmax");
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quantized absmax must be uint8 codes");
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->is_contiguous() &&
                    nested_absmax->numel() == (n_blocks + kNestedBlocksize - 1) / kNestedBlocksize,
                "nested_absmax must be contiguous float32, one value per 256 blocks");
    TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256 &&
                    nested_code->is_contiguous(),
                "nested_code must be a contiguous float32 map of 256 entries");
    scales.absmax_code = absmax.data_ptr<uint8_t>();
    scales.nested_absmax = nested_absmax->data_ptr<float>();
    scales.nested_code = nested_code->data_ptr<float>();
    scales.offset = static_cast<float>(offset);
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32 without double quantization");
    scales.absmax = absmax.data_ptr<float>();
  }
  const uint8_t* bytes = data.data_ptr<uint8_t>();
  const float* codebook = code.data_ptr<float>();
  switch (dtype) {
    case at::kFloat:
      dequantize_into(bytes, scales, codebook, blocksize, numel, out.data_ptr<float>());
      break;
    case at::kBFloat16:
      dequantize_into(bytes, scales, codebook, blocksize, numel, out.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      dequantize_into(bytes, scales, codebook, blocksize, numel, out.data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, "nf4_dequantize writes float32, bfloat16 or float16, not ", dtype);
  }
  return out;
}

at::Tensor nf4_dequantize(const at::Tensor& data, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, double offset,
                          const at::Tensor& code, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "nf4_dequantize writes float32, bfloat16 or float16, not ", dtype);
  at::Tensor out = at::empty({numel}, data.options().dtype(dtype));
  return nf4_dequantize_out(data, absmax, nested_absmax, nested_code, offset, code, blocksize, numel,
                            dtype, out);
}

}  // namespace

TORCH_LIBRARY(loralite, m) {
  m.def(
      "nf4_dequantize(Tensor data, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, Tensor code, int blocksize, int numel, ScalarType dtype) -> Tensor");
  // The same into a preallocated buffer: no allocation, no first-touch page faults.
  m.def(
      "nf4_dequantize.out(Tensor data, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, Tensor code, int blocksize, int numel, ScalarType dtype, *, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(loralite, CPU, m) {
  m.impl("nf4_dequantize", &nf4_dequantize);
  m.impl("nf4_dequantize.out", &nf4_dequantize_out);
}

}  // namespace loralite
