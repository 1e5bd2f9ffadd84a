// The CUDA NF4 GEMV for batch-1 decode: y (M, N) = x (M, K) @ W.T for M <= 8 rows and an NF4
// weight W (N, K). Plain CUDA, no torch: nf4_gemv.cu compiles with nvcc alone, and
// nf4_gemv_binding.cpp wraps it as the torch operator loralite::nf4_gemv.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace loralite {

// Largest number of rows of x one launch takes.
constexpr int kGemvMaxRows = 8;
// Elements one thread decodes per step: 16 packed bytes.
constexpr int kGemvChunk = 32;

enum class GemvDtype { kFloat32, kFloat16, kBFloat16 };

struct Nf4GemvArgs {
  const void* x;                 // (m, k) row-major, dtype as given, 16-byte aligned
  void* y;                       // (m, n) row-major, same dtype
  const uint8_t* data;           // (n * k / 2) packed codes, first element in the high nibble
  const float* absmax;           // plain: one float32 per block, else nullptr
  const uint8_t* absmax_code;    // double quant: one uint8 code per block, else nullptr
  const float* nested_absmax;    // double quant: one float32 per 256 blocks
  const float* nested_code;      // double quant: 256-entry map
  float offset;                  // double quant: mean of the absmaxes
  const float* code;             // 16-entry NF4 codebook
  int64_t m, n, k, blocksize;    // k and blocksize multiples of kGemvChunk, m <= kGemvMaxRows
};

// Launches on `stream`; returns the launch error (cudaErrorInvalidValue for unsupported shapes).
cudaError_t launch_nf4_gemv(const Nf4GemvArgs& args, GemvDtype dtype, cudaStream_t stream);

}  // namespace loralite
