// Element conversions shared by the CUDA kernels (device code only: include from .cu files).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace unimm {

// One element of a kernel's storage dtype (fp32, fp16, bf16) as fp32, the dtype of all arithmetic.
template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half value) {
  return __half2float(value);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

}  // namespace unimm
