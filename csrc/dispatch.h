// The one dispatch of the CPU operators over the float dtypes they take.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace loralite {

// Calls fn with a null pointer of the C++ type of a float32, bfloat16 or float16 tensor
// (fn recovers the type as std::remove_pointer_t<decltype(tag)>); other dtypes are an error naming op.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: fn(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, op, ": tensors must be float32, bfloat16 or float16, not ", dtype);
  }
}

}  // namespace loralite
