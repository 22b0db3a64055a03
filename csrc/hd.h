// DCIGN_HD marks functions that nvcc compiles for host and device and g++ compiles for the CPU tests; and the
// one integer intrinsic that more than one of those headers needs.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define DCIGN_HD __host__ __device__ __forceinline__
#else
#define DCIGN_HD inline
#endif

namespace dcign {

// The high 32 bits of a * b (Philox rounds, FastDivmod).
DCIGN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

}  // namespace dcign
