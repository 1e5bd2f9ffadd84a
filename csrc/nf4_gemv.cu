// CUDA NF4 GEMV for batch-1 decode: y (M, N) = x (M, K) @ W.T with M <= 8.
//
// At M = 1 a linear layer is a pure stream over its weight: every byte of W is read once and
// used for M multiply-adds, so the time is (N * K / 2 bytes) / bandwidth and the whole job is
// to keep the loads wide and in flight. Layout of the work:
//
//   one warp per output feature n (row of W);  each lane takes 16 packed bytes = 32 elements
//   per step, so a warp reads 512 contiguous bytes of the row per step (fully coalesced);
//   the 32 elements lie in one absmax block (blocksize % 32 == 0), decoded as
//       w_i = round_T(code[nibble_i] * scale)        (rounded to T as the reference does)
//   and multiplied with x[m, k0 .. k0 + 32) for each of the M rows (16-byte loads, L1-cached);
//   a warp shuffle reduction sums the 32 lanes' partial dot products.
//
// The codebook sits in shared memory; the block scale is decoded once per 32 elements,
// including the nested (double-quant) step nested_code[c] * nested_absmax[b / 256] + offset.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "nf4_gemv.h"

namespace loralite {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;      // 4 output features per thread block
constexpr int kNestedBlocksize = 256;  // absmaxes per nested absmax (bitsandbytes' fixed size)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// x[0 .. kGemvChunk) as float32, in 16-byte loads.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, float out[kGemvChunk]) {
  constexpr int kPerVector = 16 / sizeof(T);
  const uint4* vectors = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < kGemvChunk / kPerVector; ++i) {
    const uint4 raw = __ldg(vectors + i);
    const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < kPerVector; ++e) out[i * kPerVector + e] = to_float(elements[e]);
  }
}

// The float32 scale of absmax block b, computed as the reference does (no fused multiply-add).
__device__ __forceinline__ float block_scale(const Nf4GemvArgs& a, int64_t b) {
  if (a.absmax != nullptr) return __ldg(a.absmax + b);
  const float nested = __fmul_rn(__ldg(a.nested_code + a.absmax_code[b]),
                                 __ldg(a.nested_absmax + b / kNestedBlocksize));
  return __fadd_rn(nested, a.offset);
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize) nf4_gemv_kernel(Nf4GemvArgs a) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = a.code[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= a.n) return;
  const T* x = static_cast<const T*>(a.x);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;

  for (int64_t k0 = lane * kGemvChunk; k0 < a.k; k0 += kWarpSize * kGemvChunk) {
    const int64_t j = row * a.k + k0;  // flat index of the chunk's first element (even)
    const uint4 packed = __ldg(reinterpret_cast<const uint4*>(a.data + j / 2));
    const float scale = block_scale(a, j / a.blocksize);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
    float w[kGemvChunk];
#pragma unroll
    for (int i = 0; i < kGemvChunk / 2; ++i) {
      w[2 * i] = to_float(from_float<T>(__fmul_rn(code[bytes[i] >> 4], scale)));
      w[2 * i + 1] = to_float(from_float<T>(__fmul_rn(code[bytes[i] & 0xF], scale)));
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xs[kGemvChunk];
      load_chunk(x + m * a.k + k0, xs);
#pragma unroll
      for (int i = 0; i < kGemvChunk; ++i) acc[m] = fmaf(xs[i], w[i], acc[m]);
    }
  }

  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float sum = acc[m];
#pragma unroll
    for (int delta = kWarpSize / 2; delta > 0; delta /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, delta);
    if (lane == 0) y[m * a.n + row] = from_float<T>(sum);
  }
}

template <typename T>
cudaError_t launch_rows(const Nf4GemvArgs& a, cudaStream_t stream) {
  const dim3 block(kWarpsPerBlock * kWarpSize);
  const dim3 grid(static_cast<unsigned>((a.n + kWarpsPerBlock - 1) / kWarpsPerBlock));
  switch (a.m) {
    case 1: nf4_gemv_kernel<T, 1><<<grid, block, 0, stream>>>(a); break;
    case 2: nf4_gemv_kernel<T, 2><<<grid, block, 0, stream>>>(a); break;
    case 3: nf4_gemv_kernel<T, 3><<<grid, block, 0, stream>>>(a); break;
    case 4: nf4_gemv_kernel<T, 4><<<grid, block, 0, stream>>>(a); break;
    case 5: nf4_gemv_kernel<T, 5><<<grid, block, 0, stream>>>(a); break;
    case 6: nf4_gemv_kernel<T, 6><<<grid, block, 0, stream>>>(a); break;
    case 7: nf4_gemv_kernel<T, 7><<<grid, block, 0, stream>>>(a); break;
    case 8: nf4_gemv_kernel<T, 8><<<grid, block, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_nf4_gemv(const Nf4GemvArgs& args, GemvDtype dtype, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(args.x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(args.data) % 16 == 0;
  if (args.m < 1 || args.m > kGemvMaxRows || args.k % kGemvChunk != 0 ||
      args.blocksize % kGemvChunk != 0 || !aligned) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case GemvDtype::kFloat32: return launch_rows<float>(args, stream);
    case GemvDtype::kFloat16: return launch_rows<__half>(args, stream);
    case GemvDtype::kBFloat16: return launch_rows<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace loralite
