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
// element is a table lookup. Blocks are split over threads with at::parallel_for (OpenMP in
// the standard torch build).
//
// On x86-64 CPUs with AVX2 (checked at run time; the build itself targets the baseline) the
// lookups are vector shuffles, 16 or 32 elements per instruction sequence:
//   * 16-bit outputs (bf16, fp16): the table's low bytes and high bytes are two 16-byte
//     registers, and `pshufb` looks up 16 nibbles at once in each (bytes of the result), which
//     are then interleaved into 16-bit values;
//   * float32: the table is two 8-float registers, and `vpermps` picks from both by the low
//     3 bits of each nibble, a blend by its high bit.
// The table itself is built with vector multiplies (never fused into an FMA: the vector code may
// use FMA instructions, and -ffp-contract=off keeps the compiler from forming them) and the
// same round-to-nearest-even as c10's BFloat16 and Half; blocks with a non-finite scale take the scalar path, so even NaN
// encodings match the reference.
//
// The schema lives here; csrc/nf4_gemv_binding.cpp adds the CUDA GEMV when it is built.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "cpu_features.h"
#include "dispatch.h"

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

#ifdef LORALITE_HAVE_AVX2_PATH
// code[i] * scale for i = 0..15 as two 8-float registers: exactly the scalar float32 products.
struct FloatTable {
  __m256 low, high;  // entries 0..7 and 8..15
};

LORALITE_AVX2 inline FloatTable float_table(const float* code, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  return {_mm256_mul_ps(_mm256_loadu_ps(code), s), _mm256_mul_ps(_mm256_loadu_ps(code + 8), s)};
}

// 8 float32 -> 8 bfloat16 (as 16-bit integers in 32-bit lanes), rounding to nearest even like
// c10::BFloat16 for every finite input.
LORALITE_AVX2 inline __m256i round_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
}

// The 16 table entries as 16-bit values, split into a register of their low bytes and one of
// their high bytes: the two lookup tables for pshufb.
struct ByteTables {
  __m128i low, high;
};

template <typename T>
LORALITE_AVX2 inline ByteTables byte_tables(const FloatTable& t) {
  __m128i first, second;  // entries 0..7 and 8..15, 16 bits each
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i packed = _mm256_packus_epi32(round_to_bf16(t.low), round_to_bf16(t.high));  // lane-interleaved
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0xD8);
    first = _mm256_castsi256_si128(ordered);
    second = _mm256_extracti128_si256(ordered, 1);
  } else {
    first = _mm256_cvtps_ph(t.low, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    second = _mm256_cvtps_ph(t.high, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // Gather even bytes (low halves) into bytes 0..7 and odd bytes (high halves) into 8..15.
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i a = _mm_shuffle_epi8(first, split), b = _mm_shuffle_epi8(second, split);
  return {_mm_unpacklo_epi64(a, b), _mm_unpackhi_epi64(a, b)};
}

// 16 packed bytes -> their 32 nibbles in element order (high nibble first), as two registers.
LORALITE_AVX2 inline void nibbles(const uint8_t* bytes, __m128i& first, __m128i& second) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
  const __m128i low = _mm_and_si128(packed, mask);
  first = _mm_unpacklo_epi8(high, low);   // elements 0..15
  second = _mm_unpackhi_epi8(high, low);  // elements 16..31
}

// Stores of the decoded values: plain, or non-temporal (straight to memory, without first reading
// the destination's cache lines) for outputs too large to stay in cache anyway.
template <bool Stream>
LORALITE_AVX2 inline void store(float* p, __m256 v) {
  if constexpr (Stream) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
}

template <bool Stream>
LORALITE_AVX2 inline void store(__m128i* p, __m128i v) {
  if constexpr (Stream) _mm_stream_si128(p, v); else _mm_storeu_si128(p, v);
}

// One full block (n_bytes a multiple of 16) through the vector path. Streaming needs `out`
// aligned to 32 bytes.
template <typename T, bool Stream>
LORALITE_AVX2 void decode_block_avx2(const uint8_t* data, int64_t n_bytes, const float* code, float scale,
                                     T* out) {
  const FloatTable table = float_table(code, scale);
  if constexpr (std::is_same_v<T, float>) {
    const __m256i seven = _mm256_set1_epi32(7);
    for (int64_t p = 0; p < n_bytes; p += 16, out += 32) {
      __m128i idx[2];
      nibbles(data + p, idx[0], idx[1]);
      for (int half = 0; half < 2; ++half) {
        for (int quarter = 0; quarter < 2; ++quarter) {
          const __m256i i = _mm256_cvtepu8_epi32(quarter == 0 ? idx[half] : _mm_srli_si128(idx[half], 8));
          const __m256 from_low = _mm256_permutevar8x32_ps(table.low, i);
          const __m256 from_high = _mm256_permutevar8x32_ps(table.high, i);
          const __m256 pick_high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, seven));
          store<Stream>(out + 16 * half + 8 * quarter, _mm256_blendv_ps(from_low, from_high, pick_high));
        }
      }
    }
  } else {
    const ByteTables bytes = byte_tables<T>(table);
    __m128i* dst = reinterpret_cast<__m128i*>(out);
    for (int64_t p = 0; p < n_bytes; p += 16, dst += 4) {
      __m128i idx[2];
      nibbles(data + p, idx[0], idx[1]);
      for (int half = 0; half < 2; ++half) {
        const __m128i low = _mm_shuffle_epi8(bytes.low, idx[half]);
        const __m128i high = _mm_shuffle_epi8(bytes.high, idx[half]);
        store<Stream>(dst + 2 * half, _mm_unpacklo_epi8(low, high));
        store<Stream>(dst + 2 * half + 1, _mm_unpackhi_epi8(low, high));
      }
    }
  }
}
#endif  // LORALITE_HAVE_AVX2_PATH

// Outputs above this size bypass the cache (non-temporal stores): they do not fit it, and
// skipping the read of each destination line saves a third of the memory traffic. Smaller
// ones stay in cache for the matmul that reads them next.
constexpr int64_t kStreamingBytes = int64_t{8} << 20;

template <typename T>
void dequantize_into(const uint8_t* data, const Scales& scales, const float* code, int64_t blocksize,
                     int64_t numel, T* out) {
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const int64_t bytes_per_block = blocksize / 2;
  const int64_t n_bytes = (numel + 1) / 2;
#ifdef LORALITE_HAVE_AVX2_PATH
  const bool vector = cpu_has_avx2() && bytes_per_block % 16 == 0;
  const bool stream = numel * static_cast<int64_t>(sizeof(T)) >= kStreamingBytes &&
                      reinterpret_cast<uintptr_t>(out) % 32 == 0;
#else
  const bool vector = false;
#endif
  // Enough blocks per task to amortise the scheduling: ~64k elements.
  const int64_t grain = std::max<int64_t>(1, 65536 / blocksize);
  at::parallel_for(0, n_blocks, grain, [&](int64_t first, int64_t last) {
    T table[16];
    for (int64_t b = first; b < last; ++b) {
      const float scale = scales(b);
      const int64_t begin = b * bytes_per_block;
      const int64_t end = std::min(begin + bytes_per_block, n_bytes);
#ifdef LORALITE_HAVE_AVX2_PATH
      // Full blocks with a finite scale; the last, partial block and NaN/inf take the scalar path.
      if (vector && 2 * (begin + bytes_per_block) <= numel && std::isfinite(scale)) {
        if (stream) {
          decode_block_avx2<T, true>(data + begin, bytes_per_block, code, scale, out + 2 * begin);
        } else {
          decode_block_avx2<T, false>(data + begin, bytes_per_block, code, scale, out + 2 * begin);
        }
        continue;
      }
#endif
      for (int i = 0; i < 16; ++i) table[i] = static_cast<T>(code[i] * scale);
      decode_block(data, begin, end, numel, table, out);
    }
#ifdef LORALITE_HAVE_AVX2_PATH
    if (stream) _mm_sfence();  // make the non-temporal stores visible before the task ends
#endif
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
  dispatch_float(dtype, "nf4_dequantize", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_into(bytes, scales, codebook, blocksize, numel, out.data_ptr<T>());
  });
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
