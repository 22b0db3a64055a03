// Philox4x32-10 and the Box-Muller normal of the latent sampler: the mapping defined in
// dcign_fast/ops/philox.py (element i of the stream (seed, offset) uses counter offset + i).
// Host and device: the CPU build is checked bit for bit against the torch definition.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace dcign {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies word 0 (result feeds words 2, 3)
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies word 2 (result feeds words 0, 1)
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bumps
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;  // largest float s with (2^31 - 1) * s < 1
constexpr float kMinUniform = 1.0e-7f;              // keeps logf finite
constexpr float kTwoPi = 6.283185307179586f;

// The first two output words of Philox4x32-10 for counter (lo(n), hi(n), 0, 0) and key (lo(seed), hi(seed)).
struct PhiloxPair {
  uint32_t x0, x1;
};

DCIGN_HD PhiloxPair philox_pair(uint64_t seed, uint64_t n) {
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1};
}

// A word -> a uniform in [0, 1): fold to [0, 2^31) (x or its complement), round to float, scale.
DCIGN_HD float word_uniform(uint32_t x) {
  const uint32_t folded = x < ~x ? x : ~x;
  return static_cast<float>(static_cast<int32_t>(folded)) * kUniformScale;
}

// Box-Muller, first output, in float32. Plain logf/sqrtf/cosf: never build with fast math.
DCIGN_HD float box_muller(uint32_t x0, uint32_t x1) {
  const float u0 = fmaxf(word_uniform(x0), kMinUniform);
  const float theta = kTwoPi * word_uniform(x1);
  return sqrtf(-2.0f * logf(u0)) * cosf(theta);
}

// Where a draw starts in the stream: (seed, offset) given by value, or read from device memory (int64 values,
// the seed's uint64 bits) when the pointers are set: a CUDA graph captured with seed=None draws them on the
// device at every replay, so its kernels must read them there, not take the values they were captured with.
struct PhiloxStart {
  uint64_t seed, offset;
  const int64_t* seed_in_memory;
  const int64_t* offset_in_memory;

  DCIGN_HD PhiloxStart resolved() const {
    if (seed_in_memory == nullptr) return *this;
    return {static_cast<uint64_t>(*seed_in_memory), static_cast<uint64_t>(*offset_in_memory), nullptr, nullptr};
  }
};

// eps of element `index` of the stream (seed, offset).
DCIGN_HD float philox_normal(uint64_t seed, uint64_t offset, uint64_t index) {
  const PhiloxPair w = philox_pair(seed, offset + index);
  return box_muller(w.x0, w.x1);
}

}  // namespace dcign
