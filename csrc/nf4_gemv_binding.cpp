// The torch operator loralite::nf4_gemv around the CUDA GEMV in nf4_gemv.cu. Built only
// when torch has CUDA and nvcc is present; ops.py checks for the operator before using it.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "nf4_gemv.h"

namespace loralite {
namespace {

GemvDtype gemv_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return GemvDtype::kFloat32;
    case at::kHalf: return GemvDtype::kFloat16;
    case at::kBFloat16: return GemvDtype::kBFloat16;
    default: TORCH_CHECK(false, "nf4_gemv takes float32, float16 or bfloat16 inputs, not ", dtype);
  }
}

// y (M, N) = x (M, K) @ W.T for the NF4 weight W of shape (n, k).
at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& data, const at::Tensor& absmax,
                    const std::optional<at::Tensor>& nested_absmax,
                    const std::optional<at::Tensor>& nested_code, double offset, const at::Tensor& code,
                    int64_t n, int64_t k, int64_t blocksize) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.is_contiguous(), "x must be contiguous (M, ", k, ")");
  TORCH_CHECK(data.scalar_type() == at::kByte && data.numel() * 2 == n * k, "data must hold n * k / 2 bytes");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  Nf4GemvArgs args{};
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.data = data.data_ptr<uint8_t>();
  if (nested_absmax.has_value()) {
    TORCH_CHECK(nested_code.has_value(), "double quantization needs nested_code with nested_absmax");
    args.absmax_code = absmax.data_ptr<uint8_t>();
    args.nested_absmax = nested_absmax->data_ptr<float>();
    args.nested_code = nested_code->data_ptr<float>();
    args.offset = static_cast<float>(offset);
  } else {
    args.absmax = absmax.data_ptr<float>();
  }
  args.code = code.data_ptr<float>();
  args.m = x.size(0);
  args.n = n;
  args.k = k;
  args.blocksize = blocksize;
  const cudaError_t status = launch_nf4_gemv(args, gemv_dtype(x.scalar_type()),
                                             c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "nf4_gemv launch failed (M <= 8, K and blocksize multiples of 32): ",
              cudaGetErrorString(status));
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loralite, m) {
  m.def(
      "nf4_gemv(Tensor x, Tensor data, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, Tensor code, int n, int k, int blocksize) -> Tensor");
}

TORCH_LIBRARY_IMPL(loralite, CUDA, m) { m.impl("nf4_gemv", &nf4_gemv); }

}  // namespace loralite
