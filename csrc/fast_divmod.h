// Division by a divisor that stays fixed while a kernel's loop runs (an image's width, the channel chunks of a
// tap): a multiply-high, an add and a shift, where an integer division by a run-time value costs some twenty
// instructions on a GPU (a float reciprocal and its corrections). Granlund and Montgomery, "Division by
// invariant integers using multiplication" (PLDI 1994), section 4: for 1 <= d < 2^31 and l = ceil(log2 d),
// m = floor(2^32 (2^l - d) / d) + 1 fits 32 bits, and floor(n / d) = (mulhi(m, n) + n) >> l for every
// 0 <= n < 2^31 (the sum then cannot overflow 32 bits). Host and device (tests/test_csrc_host.py checks it
// against / and % on the CPU).
#pragma once
#include <cstdint>

#include "hd.h"

namespace dcign {

// ceil(log2 d) for d >= 1.
DCIGN_HD uint32_t ceil_log2(uint32_t d) {
  if (d <= 1) return 0;
#ifdef __CUDA_ARCH__
  return 32 - __clz(static_cast<int>(d - 1));
#else
  return 32 - __builtin_clz(d - 1);
#endif
}

struct FastDivmod {
  int divisor;
  uint32_t multiplier, shift;

  FastDivmod() = default;
  // d: 1 <= d < 2^31.
  DCIGN_HD explicit FastDivmod(int d)
      : divisor(d),
        multiplier(static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << ceil_log2(d)) - d)) / d + 1)),
        shift(ceil_log2(d)) {}

  // floor(n / divisor) for 0 <= n < 2^31.
  DCIGN_HD int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    return static_cast<int>((mulhi32(multiplier, u) + u) >> shift);
  }

  // q = floor(n / divisor), r = n - q * divisor, for 0 <= n < 2^31.
  DCIGN_HD void divmod(int n, int& q, int& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

}  // namespace dcign
