// Shared helpers for unimm's CUDA kernels: dtype codes, error checks, device guard.
//
// Binding convention (docs/ARCHITECTURE.md): kernels take raw device pointers, sizes, strides, a dtype code
// and the CUDA stream as integers. Shapes and dtypes are checked once, in Python; the checks here
// only guard what would otherwise corrupt memory or crash the context.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace unimm {

// Must match unimm/_ext.py: DTYPE_CODES.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("unimm._C ") + what + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
}

// Call right after every kernel launch.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument("unimm._C: " + message);
}

// Makes `device` current for the lifetime of the guard (torch may hold tensors on any GPU).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace unimm
