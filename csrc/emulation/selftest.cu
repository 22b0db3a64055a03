// Kernels that prove the CPU emulation (csrc/emulation/cuda_runtime.h) catches what a GPU would get
// wrong: a missing barrier, a divergent barrier and a bad launch; tests/test_cuda_emulation.py runs them.
#include <cstdint>
#include <cstdio>
#include <stdexcept>

#include "cuda_check.h"

namespace {

constexpr int kThreads = 128;

// out[i] = in[kThreads - 1 - i] through shared memory, with or without the barrier in between.
template <bool SYNC>
__global__ void reverse_kernel(const float* in, float* out) {
  __shared__ float tile[kThreads];
  const int i = threadIdx.x;
  tile[i] = in[blockIdx.x * kThreads + i];
  if (SYNC) __syncthreads();
  out[blockIdx.x * kThreads + i] = tile[kThreads - 1 - i];
}

// Half of each warp waits at a warp barrier, the other half at the block barrier: neither can pass
// (a hang on a GPU).
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x % 32 < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Warp sum through shuffles: every lane gets the sum of its warp's values.
__global__ void warp_sum_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int delta = 16; delta > 0; delta /= 2) v += __shfl_xor_sync(0xffffffffu, v, delta);
  out[threadIdx.x] = v;
}

// 0 on success, 1 when the launch raised (its message copied into `error`).
template <typename Fn>
int report(Fn&& fn, char* error, int capacity) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, capacity, "%s", e.what());
    return 1;
  }
}

}  // namespace

extern "C" {

int reverse(const float* in, float* out, int blocks, int sync, char* error, int capacity) {
  return report(
      [&] {
        dcign::launch_kernel("reverse_kernel", blocks, kThreads, nullptr,
                             sync ? reverse_kernel<true> : reverse_kernel<false>, in, out);
      },
      error, capacity);
}

int divergent(float* out, char* error, int capacity) {
  return report([&] { dcign::launch_kernel("divergent_kernel", 1, 64, nullptr, divergent_kernel, out); }, error,
                capacity);
}

int warp_sum(const float* in, float* out, int threads, char* error, int capacity) {
  return report([&] { dcign::launch_kernel("warp_sum_kernel", 1, threads, nullptr, warp_sum_kernel, in, out); }, error,
                capacity);
}

}  // extern "C"
