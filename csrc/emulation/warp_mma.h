// CPU emulation (see cuda_runtime.h) of the warp instructions of csrc/warp_mma.cuh: ldmatrix.x4 (optionally
// transposed) and mma.sync m16n8k16 with 16-bit operands and float32 accumulators. Unlike the wmma emulation
// (mma.h), every lane holds only its own registers, in the layouts the PTX ISA documents, and gets them from
// the other lanes' through one warp exchange: a kernel that read a register of the wrong lane, or a fragment
// laid out differently, gets wrong numbers here as on a GPU. What else stays faithful: both are
// warp-collective (the lanes meet at a warp barrier); ldmatrix's row addresses must be 16-byte aligned.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace dcign {

namespace warp_mma_detail {

inline int lane() { return static_cast<int>(dcign_emulation::current_thread() % 32); }

inline uint16_t bits_at(const void* row, int element) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * element, 2);
  return v;
}

template <typename T>
float widen(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

// Element `half` (0: low 16 bits, 1: high) of a 32-bit register.
inline uint16_t half_of(uint32_t word, int half) { return static_cast<uint16_t>(word >> (16 * half)); }

}  // namespace warp_mma_detail

// Four 8 x 8 matrices of 16-bit elements: lane l gives the address of row l % 8 of matrix l / 8, and receives
// in r[i] the elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i (low half first), or with
// kTrans those of its transpose.
template <bool kTrans>
void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  using namespace warp_mma_detail;
  const uint64_t address = reinterpret_cast<uintptr_t>(row);
  if (address % 16 != 0) {
    dcign_emulation::fail(cudaErrorMisalignedAddress, "misaligned address (emulation: ldmatrix needs 16-byte rows)");
  }
  const uint32_t mine[2] = {static_cast<uint32_t>(address), static_cast<uint32_t>(address >> 32)};
  const dcign_emulation::WarpWords lanes = dcign_emulation::warp_exchange(mine);
  auto row_of = [&](int lane_index) {
    return reinterpret_cast<const void*>(static_cast<uintptr_t>(lanes(lane_index, 0)) |
                                         static_cast<uintptr_t>(lanes(lane_index, 1)) << 32);
  };
  const int l = lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    uint32_t word = 0;
    for (int half = 0; half < 2; ++half) {
      // Element (g, 2t + half) of matrix i, or of its transpose: element (2t + half, g).
      const uint16_t v = kTrans ? bits_at(row_of(8 * i + 2 * t + half), g) : bits_at(row_of(8 * i + g), 2 * t + half);
      word |= static_cast<uint32_t>(v) << (16 * half);
    }
    r[i] = word;
  }
}

// d += A B for a warp's 16 x 16 A (row-major fragment a), 16 x 8 B (column-major fragment b) and 16 x 8 d, in
// the PTX layouts: lane l = 4 g + t holds a = {A(g, 2t..), A(g + 8, 2t..), A(g, 2t + 8..), A(g + 8, 2t + 8..)},
// b = {B(2t.., g), B(2t + 8.., g)} and d = {D(g, 2t), D(g, 2t + 1), D(g + 8, 2t), D(g + 8, 2t + 1)}.
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace warp_mma_detail;
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const dcign_emulation::WarpWords lanes = dcign_emulation::warp_exchange(mine);
  auto A = [&](int row, int k) {  // held by lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
    return widen<T>(half_of(lanes(4 * (row % 8) + (k % 8) / 2, (row >= 8) + 2 * (k >= 8)), k % 2));
  };
  auto B = [&](int k, int n) {  // held by lane 4 n + (k % 8) / 2, register k >= 8
    return widen<T>(half_of(lanes(4 * n + (k % 8) / 2, 4 + (k >= 8)), k % 2));
  };
  const int l = lane(), g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = d[e];
    for (int k = 0; k < 16; ++k) sum = fmaf(A(row, k), B(k, col), sum);
    d[e] = sum;
  }
}

}  // namespace dcign
