// A smoke kernel that proves the extension builds, loads and launches on the caller's stream.
#include <cstdint>

#include "cuda_check.h"
#include "smoke.h"

namespace dcign {

__global__ void axpb_kernel(const float* x, float* y, int64_t n, float a, float b) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] = a * x[i] + b;
}

void axpb(uintptr_t x, uintptr_t y, int64_t n, float a, float b, uintptr_t stream) {
  if (n <= 0) return;
  constexpr int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  launch_kernel("axpb_kernel", static_cast<unsigned>(blocks), threads, reinterpret_cast<cudaStream_t>(stream),
                axpb_kernel, reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), n, a, b);
}

int device_count() {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

int runtime_version() {
  int version = 0;
  check_cuda(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

}  // namespace dcign
