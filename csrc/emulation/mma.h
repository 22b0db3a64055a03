// CPU emulation (see cuda_runtime.h) of the nvcuda::wmma calls of csrc/tile_mma.cuh, which multiplies float32
// storage in TF32 with them: 16 x 16 x 8 tiles of TF32 operands, float32 accumulators (16-bit operands go
// through mma.sync, emulated in warp_mma.h). On a GPU a fragment is
// spread over the 32 lanes of a warp; here every lane holds the whole tile and makes each warp-collective
// call itself, with identical results (a multiply of the same inputs as the previous call reuses its product).
// What stays faithful: each call is warp-collective (the lanes meet at a warp barrier, so a call from
// divergent code deadlocks the launch); store_matrix_sync writes only the calling lane's elements (the
// mma.m16n8k16 accumulator layout), so reading other lanes' results without a __syncwarp() reads stale
// memory; TF32 operands lose the low 13 mantissa bits in the multiply, so values not rounded by
// __float_to_tf32 are truncated, as by the hardware; misaligned fragment pointers and leading dimensions
// fail the launch.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda_runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// Rows and columns of a fragment's tile: A is M x K, B is K x N, the accumulator M x N.
template <typename Use, int M, int N, int K>
struct tile_shape {
  static constexpr int rows = M, cols = N;
};
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 8, "the emulation has TF32's 16x16x8 shape");
  static_assert(std::is_same_v<T, std::conditional_t<std::is_same_v<Use, accumulator>, float, precision::tf32>>,
                "TF32 operands, float32 accumulators");
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;  // every lane holds the whole tile
  float x[num_elements];                            // row-major
  float& at(int r, int c) { return x[r * cols + c]; }
  float at(int r, int c) const { return x[r * cols + c]; }
};

// cvt.rna.tf32.f32: round to the nearest TF32 value (10 mantissa bits), ties away from zero.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, sizeof bits);
  return v;
}

namespace detail {

// The multiply's view of an operand: TF32 keeps the top 19 bits of a float32 (sign, exponent, 10 mantissa
// bits).
inline float tf32_operand(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, sizeof bits);
  return v;
}

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

// Layout: element (r, c) of the tile lies at p[r * ldm + c] (row_major) or p[c * ldm + r] (col_major).
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  __syncwarp();
  if (!detail::check(p, ldm, "load_matrix_sync")) return;
  constexpr bool kColumns = std::is_same_v<Layout, col_major>;
  for (int r = 0; r < f.rows; ++r) {
    for (int c = 0; c < f.cols; ++c) f.at(r, c) = p[kColumns ? c * ldm + r : r * ldm + c];
  }
}

// Every lane of a warp holds the whole tile, so a correct kernel makes 32 identical calls in a row (the lanes
// of a warp resume one after another from the barrier). The last call's product is reused when all three
// inputs are bitwise the same: the same result for a fraction of the work (the multiply is a pure function of
// the inputs, and the emulation runs on one OS thread).
template <int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, K, T, LayoutB>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  __syncwarp();
  static struct {
    bool valid = false;
    fragment<matrix_a, 16, 16, K, T, LayoutA> a;
    fragment<matrix_b, 16, 16, K, T, LayoutB> b;
    fragment<accumulator, 16, 16, K, float> c, d;
  } last;
  const auto same = [](const auto& x, const auto& y) { return std::memcmp(x.x, y.x, sizeof x.x) == 0; };
  if (last.valid && same(last.a, a) && same(last.b, b) && same(last.c, c)) {
    d = last.d;
    return;
  }
  last.a = a, last.b = b, last.c = c;
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float sum = c.at(r, n);
      for (int k = 0; k < K; ++k) sum = fmaf(detail::tf32_operand(a.at(r, k)), detail::tf32_operand(b.at(k, n)), sum);
      last.d.at(r, n) = sum;
    }
  }
  last.valid = true;
  d = last.d;
}

template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t layout) {
  __syncwarp();
  if (!detail::check(p, ldm, "store_matrix_sync")) return;
  const int lane = detail::lane();
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      if (detail::holds(lane, r, c)) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.at(r, c);
    }
  }
}

template <int K>
void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float value) {
  for (float& v : f.x) v = value;
}

}  // namespace nvcuda::wmma
