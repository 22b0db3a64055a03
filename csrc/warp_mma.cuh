// The warp-level tensor-core instructions of MmaSyncMma (tile_mma.cuh) for 16-bit operands, sm_80+:
//   ldmatrix_x4<kTrans>(r, row)   four 8 x 8 matrices of 16-bit elements from shared memory into a warp's
//                                 registers (transposed with kTrans); lane l gives the address of row l % 8
//                                 of matrix l / 8 (16-byte aligned) and receives row l / 4, columns
//                                 2 (l % 4) and 2 (l % 4) + 1 of each matrix in r[i]
//   mma_m16n8k16<T>(d, a, b)      d += A B: A 16 x 16 (row-major fragment), B 16 x 8 (column-major), float32 d
// One ldmatrix replaces the eight to sixteen generic loads, byte permutes and transposing moves that a wmma
// fragment load from shared memory compiles to. The CPU emulation has twins with the same per-lane registers
// (emulation/warp_mma.h).
#pragma once
#include <cstdint>
#include <type_traits>

#include "dtype.cuh"

#ifdef DCIGN_CPU_EMULATION
#include "emulation/warp_mma.h"
#else
namespace dcign {

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  // "memory": the compiler must not move the read across the stores that fill the tile.
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
  }
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit operands");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

}  // namespace dcign
#endif
