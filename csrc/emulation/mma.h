// CPU emulation (see cuda_runtime.h) of the nvcuda::wmma calls of csrc/tile_mma.cuh: 16 x 16 x 16 tiles,
// 16-bit operands, float32 accumulators. On a GPU a fragment is spread over the 32 lanes of a warp; here
// every lane holds the whole tile and computes each warp-collective call itself, with identical results.
// What stays faithful: each call is warp-collective (the lanes meet at a warp barrier, so a call from
// divergent code deadlocks the launch); store_matrix_sync writes only the calling lane's elements (the
// mma.m16n8k16 accumulator layout), so reading other lanes' results without a __syncwarp() reads stale
// memory; misaligned fragment pointers and leading dimensions fail the launch.
#pragma once
#include <cstdint>
#include <string>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has the 16 x 16 x 16 shape only");
  float x[16][16];  // row-major tile; 16-bit operands convert to float exactly
};

namespace detail {

inline float widen(float v) { return v; }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float widen(__half v) { return __half2float(v); }

// The GPU's rules: fragment pointers 32-byte aligned; ldm a multiple of 16 bytes.
template <typename T>
bool check(const T* p, unsigned ldm, const char* call) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
    dcign_emulation::fail(cudaErrorMisalignedAddress, std::string("misaligned address (emulation: ") + call +
                                                          " needs a 32-byte aligned pointer and ldm of 16 bytes)");
    return false;
  }
  return true;
}

// The calling thread's lane (1-D thread index within its warp).
inline int lane() {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(linear % 32);
}

// Whether lane l holds accumulator element (r, c) on a GPU: rows l/4 and l/4 + 8, columns 2 (l%4) + {0, 1}
// of each 8-column half.
inline bool holds(int l, int r, int c) { return r % 8 == l / 4 && c % 8 / 2 == l % 4; }

}  // namespace detail

template <typename Use, typename T>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  __syncwarp();
  if (!detail::check(p, ldm, "load_matrix_sync")) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r][c] = detail::widen(p[r * ldm + c]);
  }
}

template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, row_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  __syncwarp();
  float out[16][16];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[r][n];
      for (int k = 0; k < 16; ++k) sum = fmaf(a.x[r][k], b.x[k][n], sum);
      out[r][n] = sum;
    }
  }
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) d.x[r][n] = out[r][n];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  __syncwarp();
  if (!detail::check(p, ldm, "store_matrix_sync")) return;
  const int lane = detail::lane();
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      if (detail::holds(lane, r, c)) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r][c];
    }
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (auto& row : f.x) {
    for (float& v : row) v = value;
  }
}

}  // namespace nvcuda::wmma
