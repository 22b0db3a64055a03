// The multiply of the unpool-conv kernels' implicit GEMMs, behind one interface so that every kernel
// keeps a single body (index arithmetic, tap loops, barriers) for every storage type:
//
//   __shared__ typename Mma::ATile a;    a.put(k, m, v): operand A[m][k] of the current K step
//   __shared__ typename Mma::BTile b;    b.put(k, n, v): operand B[k][n]
//   put_run<along_k>(tile, k, i, run)    a run of elements along k or along m (n) at once (see there); the
//                                        kernel picks how tensor-core tiles store A and B (Runs) to match
//   __shared__ typename Mma::Scratch s;  staging of results (tensor cores only)
//   typename Mma::Acc acc; Mma::zero(acc)  this thread's (or warp's) share of the BM x BN float32 result
//   Mma::multiply(acc, a, b)             acc += A B over one K step of Mma::kK (after a barrier)
//   Mma::for_each(acc, s, f)             f(m, n, value) once for every element of the result (block-uniform)
//
// SimtMma: exact float32 on SIMT cores; every thread owns rows tm + 16 i and columns tn + 16 j of the result.
// MmaSyncMma: bf16 / fp16 as stored on tensor cores (mma.sync m16n8k16 from ldmatrix, float32 accumulation);
// WmmaMma: float32 rounded to TF32 on tensor cores (nvcuda::wmma 16x16x8). In both, warp w owns the 16 x 16
// fragments w, w + 8, ... of the result (sm_80+).
#pragma once
#include <mma.h>

#include <type_traits>

#include "dtype.cuh"
#include "warp_mma.cuh"

namespace dcign {

constexpr int kTileThreads = 256;
constexpr int kWarps = kTileThreads / 32;

// The K step of the kernels' wide tiles (64 x 64, and the grad kernels' 128 x 64) for storage T: 32 for
// 16-bit operands, whose tiles then still fit the forward's four products in 48 KiB of static shared memory;
// 16 for float32's 4-byte ones. A longer step spends the loop's fixed work (barrier, tap and chunk arithmetic)
// on twice the multiplies.
template <typename T>
constexpr int kWideStepK = sizeof(T) == 2 ? 32 : 16;

template <int BM, int BN, int BK>
struct SimtMma {
  static constexpr int kK = BK;
  // Rows padded by one word against bank conflicts: no run of elements is 16-byte aligned.
  struct ATile {
    static constexpr bool kRunsAlongK = false, kRunsAcross = false;
    float v[BK][BM + 1];
    __device__ __forceinline__ void put(int k, int m, float x) { v[k][m] = x; }
  };
  struct BTile {
    static constexpr bool kRunsAlongK = false, kRunsAcross = false;
    float v[BK][BN + 1];
    __device__ __forceinline__ void put(int k, int n, float x) { v[k][n] = x; }
  };
  struct Scratch {};
  struct Acc {
    float v[BM / 16][BN / 16];
  };

  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) acc.v[i][j] = 0.0f;
    }
  }

  // acc[i][j] += sum_k a[k][tm + 16 i] * b[k][tn + 16 j]; strided ownership makes a warp's shared-memory
  // reads broadcasts or consecutive words.
  __device__ __forceinline__ static void multiply(Acc& acc, const ATile& a, const BTile& b) {
    const int tn = threadIdx.x % 16, tm = threadIdx.x / 16;
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float av[BM / 16], bv[BN / 16];
#pragma unroll
      for (int i = 0; i < BM / 16; ++i) av[i] = a.v[k][tm + 16 * i];
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) bv[j] = b.v[k][tn + 16 * j];
#pragma unroll
      for (int i = 0; i < BM / 16; ++i) {
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) acc.v[i][j] = fmaf(av[i], bv[j], acc.v[i][j]);
      }
    }
  }

  template <typename F>
  __device__ __forceinline__ static void for_each(const Acc& acc, Scratch&, F&& f) {
    const int tn = threadIdx.x % 16, tm = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) f(tm + 16 * i, tn + 16 * j, acc.v[i][j]);
    }
  }
};

// How an operand tile is stored, chosen by each kernel so that the runs its TileLoads fetch are contiguous
// in the tile (put_run then stores each as one 16-byte vector): kAlongK stores [m][k] (A) or [n][k] (B),
// runs along k; kAcross stores [k][m] or [k][n], runs along m or n.
enum class Runs { kAlongK, kAcross };

// One tensor-core operand tile: ROWS (M or N) x BK elements of T stored as Runs says, the inner index padded
// by 16 bytes: rows stay 16-byte aligned (ldmatrix's rows, wmma's leading dimension; wmma's fragments also
// start 32-byte aligned: 16-row and 8-row steps of 16 bytes plus a multiple of 32), and the 8 rows that one
// ldmatrix phase reads fall in distinct banks.
template <typename T, int ROWS, int BK, Runs kRuns>
struct alignas(32) OperandTile {
  static constexpr bool kRunsAlongK = kRuns == Runs::kAlongK, kRunsAcross = !kRunsAlongK;
  static constexpr int kLd = (kRunsAlongK ? BK : ROWS) + 16 / static_cast<int>(sizeof(T));
  T v[kRunsAlongK ? ROWS : BK][kLd];
  __device__ __forceinline__ T* address(int k, int i) { return kRunsAlongK ? &v[i][k] : &v[k][i]; }
  __device__ __forceinline__ const T* address(int k, int i) const { return kRunsAlongK ? &v[i][k] : &v[k][i]; }
  __device__ __forceinline__ void put(int k, int i, float x) { *address(k, i) = from_float<T>(x); }
};

// Which 16 x 16 fragments of a BM x BN result a warp owns in the tensor-core policies: w, w + kWarps, ...
// (row-major over the fragments). They lie in one column of fragments (the column count divides kWarps), so
// a warp loads B once per K step for all of them.
template <int BM, int BN>
struct WarpFragments {
  static constexpr int kFragments = (BM / 16) * (BN / 16);
  static constexpr int kPerWarp = (kFragments + kWarps - 1) / kWarps;
  static_assert(kWarps % (BN / 16) == 0, "a warp's fragments share their column");

  __device__ __forceinline__ static int fragment_of(int i) { return static_cast<int>(threadIdx.x / 32) + kWarps * i; }
  // Whether the warp's i-th fragment exists (every warp has kPerWarp but the last ones when they do not divide).
  __device__ __forceinline__ static bool owns(int i) { return kFragments % kWarps == 0 || fragment_of(i) < kFragments; }
  __device__ __forceinline__ static int row_of(int i) { return fragment_of(i) / (BN / 16); }
  __device__ __forceinline__ static int column() { return fragment_of(0) % (BN / 16); }
};

// 16-bit storage: mma.sync m16n8k16 fed by ldmatrix (warp_mma.cuh). A warp's 16 x 16 fragment is two
// m16n8 products; the accumulators stay in the mma layout, and for_each reads them from registers.
template <typename T, int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct MmaSyncMma : WarpFragments<BM, BN> {
  using Base = WarpFragments<BM, BN>;
  static constexpr int kK = BK;
  static_assert(BK % 16 == 0, "K steps of whole m16n8k16 products");
  using ATile = OperandTile<T, BM, BK, kRunsA>;
  using BTile = OperandTile<T, BN, BK, kRunsB>;
  struct Scratch {};
  struct Acc {
    float v[Base::kPerWarp][2][4];  // fragment i, its n8 half j: the m16n8 accumulator registers
  };

  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < Base::kPerWarp; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc.v[i][e / 4][e % 4] = 0.0f;
    }
  }

  // The 16 x 16 block of a tile at (k0, i0) as four 8 x 8 matrices in the order an operand's registers take
  // them: A's (i, k) halves (0, 0), (8, 0), (0, 8), (8, 8); B's (0, 0), (0, 8), (8, 0), (8, 8). A tile stored
  // [i][k] holds each matrix row by row (plain ldmatrix); one stored [k][i] holds it transposed.
  template <bool kIsA, typename Tile>
  __device__ __forceinline__ static void load_block(uint32_t (&r)[4], const Tile& tile, int k0, int i0) {
    const int lane = threadIdx.x % 32, matrix = lane / 8, row = lane % 8;
    const int i_half = 8 * (kIsA ? matrix % 2 : matrix / 2), k_half = 8 * (kIsA ? matrix / 2 : matrix % 2);
    if constexpr (Tile::kRunsAlongK) {
      ldmatrix_x4<false>(r, tile.address(k0 + k_half, i0 + i_half + row));
    } else {
      ldmatrix_x4<true>(r, tile.address(k0 + k_half + row, i0 + i_half));
    }
  }

  __device__ __forceinline__ static void multiply(Acc& acc, const ATile& a, const BTile& b) {
#pragma unroll
    for (int k = 0; k < BK; k += 16) {
      uint32_t fb[4];  // {b0, b1} of n columns 0-7, then of 8-15
      load_block<false>(fb, b, k, 16 * Base::column());
      const uint32_t b_lo[2] = {fb[0], fb[1]}, b_hi[2] = {fb[2], fb[3]};
#pragma unroll
      for (int i = 0; i < Base::kPerWarp; ++i) {
        if (!Base::owns(i)) break;
        uint32_t fa[4];
        load_block<true>(fa, a, k, 16 * Base::row_of(i));
        mma_m16n8k16<T>(acc.v[i][0], fa, b_lo);
        mma_m16n8k16<T>(acc.v[i][1], fa, b_hi);
      }
    }
  }

  // Lane 4 g + t holds, of each n8 half j, rows g and g + 8, columns 2 t and 2 t + 1.
  template <typename F>
  __device__ __forceinline__ static void for_each(const Acc& acc, Scratch&, F&& f) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < Base::kPerWarp; ++i) {
      if (!Base::owns(i)) break;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int j = e / 4, r = e % 4;
        f(16 * Base::row_of(i) + g + 8 * (r / 2), 16 * Base::column() + 8 * j + 2 * t + r % 2, acc.v[i][j][r]);
      }
    }
  }
};

// float32 storage multiplied in TF32 (16 x 16 x 8 wmma multiplies; operands rounded by __float_to_tf32 as
// each fragment loads, which the multiply would otherwise truncate). The results go through a scratch in
// shared memory, whose lanes hand them out with consecutive columns.
template <int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct WmmaMma : WarpFragments<BM, BN> {
  using Base = WarpFragments<BM, BN>;
  static constexpr int kK = BK, kFragK = 8, kLdScratch = 16 + 4;
  using Fragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kFragK, float>;
  using ATile = OperandTile<float, BM, BK, kRunsA>;
  using BTile = OperandTile<float, BN, BK, kRunsB>;
  // wmma's names for the storage orders: A is m x k and B is k x n, so a tile stored [i][k] is row-major as A
  // and column-major as B.
  using LayoutA = std::conditional_t<kRunsA == Runs::kAlongK, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using LayoutB = std::conditional_t<kRunsB == Runs::kAlongK, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  struct alignas(32) Scratch {
    float v[kWarps][16][kLdScratch];
  };
  struct Acc {
    Fragment v[Base::kPerWarp];
  };

  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < Base::kPerWarp; ++i) nvcuda::wmma::fill_fragment(acc.v[i], 0.0f);
  }

  template <typename F>
  __device__ __forceinline__ static void round_to_tf32(F& fragment) {
#pragma unroll
    for (int e = 0; e < fragment.num_elements; ++e) fragment.x[e] = nvcuda::wmma::__float_to_tf32(fragment.x[e]);
  }

  __device__ __forceinline__ static void multiply(Acc& acc, const ATile& a, const BTile& b) {
    using namespace nvcuda::wmma;
#pragma unroll
    for (int k = 0; k < BK; k += kFragK) {
      fragment<matrix_b, 16, 16, kFragK, precision::tf32, LayoutB> fb;
      load_matrix_sync(fb, b.address(k, 16 * Base::column()), BTile::kLd);
      round_to_tf32(fb);
#pragma unroll
      for (int i = 0; i < Base::kPerWarp; ++i) {
        if (!Base::owns(i)) break;
        fragment<matrix_a, 16, 16, kFragK, precision::tf32, LayoutA> fa;
        load_matrix_sync(fa, a.address(k, 16 * Base::row_of(i)), ATile::kLd);
        round_to_tf32(fa);
        mma_sync(acc.v[i], fa, fb, acc.v[i]);
      }
    }
  }

  // Each warp stages one fragment at a time in its slice of the scratch, then its lanes hand out the 256
  // values (lane-consecutive columns: coalesced stores where the caller's n is contiguous).
  template <typename F>
  __device__ __forceinline__ static void for_each(const Acc& acc, Scratch& scratch, F&& f) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < Base::kPerWarp; ++i) {
      if (!Base::owns(i)) break;
      nvcuda::wmma::store_matrix_sync(&scratch.v[warp][0][0], acc.v[i], kLdScratch, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        f(16 * Base::row_of(i) + e / 16, 16 * Base::column() + e % 16, scratch.v[warp][e / 16][e % 16]);
      }
      __syncwarp();
    }
  }
};

// Puts kVec elements of storage T into an operand tile at once: along k (k .. k + kVec - 1 at i) when
// kAlongK, else across (i .. i + kVec - 1 at k). One 16-byte store where the tile holds the run contiguously
// in T (i and k of a run's start are multiples of kVec), else element by element.
template <bool kAlongK, typename Tile, typename T, int kVec>
__device__ __forceinline__ void put_run(Tile& tile, int k, int i, const Packed<T, kVec>& run) {
  if constexpr (kVec > 1 && (kAlongK ? Tile::kRunsAlongK : Tile::kRunsAcross)) {  // tiles that hold runs hold T
    if (run_aligned<Packed<T, kVec>>(tile.address(k, i))) *reinterpret_cast<Packed<T, kVec>*>(tile.address(k, i)) = run;
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) tile.put(kAlongK ? k + e : k, kAlongK ? i : i + e, to_float(run.element(e)));
  }
}

// The multiply of storage T: 16-bit storage on tensor cores; float32 on SIMT cores (exact), or on tensor cores
// in TF32 when kTf32 (as cuDNN does when torch.backends.cudnn.allow_tf32 is set).
// kRunsA, kRunsB: how the tensor-core tiles store A and B (SIMT tiles store both one way, element by element).
template <typename T, bool kTf32, int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct MmaFor {
  using type = MmaSyncMma<T, BM, BN, BK, kRunsA, kRunsB>;
};
template <int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct MmaFor<float, true, BM, BN, BK, kRunsA, kRunsB> {
  using type = WmmaMma<BM, BN, BK, kRunsA, kRunsB>;
};
template <int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct MmaFor<float, false, BM, BN, BK, kRunsA, kRunsB> {
  using type = SimtMma<BM, BN, BK>;
};

}  // namespace dcign
