#pragma once
#include <cstdint>

namespace dcign {
// y[i] = a * x[i] + b for float32 device pointers, on the given stream.
void axpb(uintptr_t x, uintptr_t y, int64_t n, float a, float b, uintptr_t stream);
int device_count();
int runtime_version();
}  // namespace dcign
