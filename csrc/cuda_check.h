// Kernel launches that turn a CUDA error into a C++ exception naming the kernel (pybind11 raises it as
// RuntimeError). With DCIGN_CPU_EMULATION the same launch runs the kernel in the CPU emulation
// (emulation/cuda_runtime.h).
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

// kernel<<<grid, threads, 0, stream>>>(args...), then both the launch error and an asynchronous error
// already pending, reported under `name`.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, dim3 grid, dim3 threads, cudaStream_t stream, void (*kernel)(Params...),
                   Args... args) {
#ifdef DCIGN_CPU_EMULATION
  (void)stream;
  dcign_emulation::launch(grid, threads, [&] { kernel(args...); });
#else
  // clang-format off
  kernel<<<grid, threads, 0, stream>>>(args...);
  // clang-format on
#endif
  check_cuda(cudaGetLastError(), name);
}

}  // namespace dcign
