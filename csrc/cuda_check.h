// Turns a CUDA error into a C++ exception (pybind11 raises it as RuntimeError) that names the call.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace dcign {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

// After a launch: both the launch error and an asynchronous error already pending.
inline void check_launch(const char* kernel_name) { check_cuda(cudaGetLastError(), kernel_name); }

}  // namespace dcign
