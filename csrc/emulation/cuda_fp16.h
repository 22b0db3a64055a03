// CPU emulation (see cuda_runtime.h): IEEE half precision through the compiler's _Float16.
#pragma once

struct __half {
  _Float16 value;
};

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }
