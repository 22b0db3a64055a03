// DCIGN_HD marks functions that nvcc compiles for host and device and g++ compiles for the CPU tests.
#pragma once

#ifdef __CUDACC__
#define DCIGN_HD __host__ __device__ __forceinline__
#else
#define DCIGN_HD inline
#endif
