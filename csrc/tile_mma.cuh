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
// WmmaMma: tensor cores through nvcuda::wmma with float32 accumulation; warp w owns the 16 x 16 fragments
// w, w + 8, ... Operands are stored in T: bf16 / fp16 as stored (16x16x16 multiplies), or float32 rounded
// to TF32 as each fragment is loaded (16x16x8 multiplies, sm_80+).
#pragma once
#include <mma.h>

#include <type_traits>

#include "dtype.cuh"

namespace dcign {

constexpr int kTileThreads = 256;
constexpr int kWarps = kTileThreads / 32;

// The K step of a kernel's 64 x 64 tiles for storage T: 32 for 16-bit operands, whose tiles then still fit
// the forward's four products in 48 KiB of static shared memory; 16 for float32's 4-byte ones. A longer step
// spends the loop's fixed work (barrier, tap and chunk arithmetic) on twice the multiplies.
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

// The wmma operand type and K extent of one multiply for storage T: 16-bit operands as stored; float32 ones
// as TF32 (the fragments hold float32 values that __float_to_tf32 rounds).
template <typename T>
struct WmmaOperand {
  using type = T;
  static constexpr int kK = 16;
};
template <>
struct WmmaOperand<float> {
  using type = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

// How an operand tile is stored, chosen by each kernel so that the runs its TileLoads fetch are contiguous
// in the tile (put_run then stores each as one 16-byte vector): kAlongK stores [m][k] (A) or [n][k] (B),
// runs along k; kAcross stores [k][m] or [k][n], runs along m or n.
enum class Runs { kAlongK, kAcross };

// One tensor-core operand tile: ROWS (M or N) x BK elements of T stored as Runs says, the inner index padded
// by 16 bytes against bank conflicts (wmma wants the leading dimension a multiple of 16 bytes and every
// fragment start 32-byte aligned: 16-row and kFragK-row steps of 16 bytes plus a multiple of 32).
template <typename T, int ROWS, int BK, Runs kRuns>
struct alignas(32) WmmaTile {
  static constexpr bool kRunsAlongK = kRuns == Runs::kAlongK, kRunsAcross = !kRunsAlongK;
  static constexpr int kLd = (kRunsAlongK ? BK : ROWS) + 16 / static_cast<int>(sizeof(T));
  T v[kRunsAlongK ? ROWS : BK][kLd];
  __device__ __forceinline__ T* address(int k, int i) { return kRunsAlongK ? &v[i][k] : &v[k][i]; }
  __device__ __forceinline__ const T* address(int k, int i) const { return kRunsAlongK ? &v[i][k] : &v[k][i]; }
  __device__ __forceinline__ void put(int k, int i, float x) { *address(k, i) = from_float<T>(x); }
};

template <typename T, int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct WmmaMma {
  static constexpr int kK = BK;
  static constexpr int kFragments = (BM / 16) * (BN / 16);
  static constexpr int kPerWarp = (kFragments + kWarps - 1) / kWarps;
  static constexpr int kFragK = WmmaOperand<T>::kK;
  static constexpr int kLdScratch = 16 + 4;
  using Operand = typename WmmaOperand<T>::type;
  using Fragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kFragK, float>;
  using ATile = WmmaTile<T, BM, BK, kRunsA>;
  using BTile = WmmaTile<T, BN, BK, kRunsB>;
  // wmma's names for the storage orders: A is m x k and B is k x n, so a tile stored [i][k] is row-major as A
  // and column-major as B.
  using LayoutA = std::conditional_t<kRunsA == Runs::kAlongK, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using LayoutB = std::conditional_t<kRunsB == Runs::kAlongK, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  struct alignas(32) Scratch {
    float v[kWarps][16][kLdScratch];
  };
  struct Acc {
    Fragment v[kPerWarp];
  };

  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) nvcuda::wmma::fill_fragment(acc.v[i], 0.0f);
  }

  __device__ __forceinline__ static int fragment_of(int i) { return static_cast<int>(threadIdx.x / 32) + kWarps * i; }

  // float32 operands round to TF32 once loaded (the multiply would otherwise truncate them).
  template <typename F>
  __device__ __forceinline__ static void round_operand(F& fragment) {
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int e = 0; e < fragment.num_elements; ++e) fragment.x[e] = nvcuda::wmma::__float_to_tf32(fragment.x[e]);
    }
  }

  // Fragments w, w + kWarps, ... of warp w lie in one column of fragments (the column count divides kWarps):
  // the warp loads B's fragment once per K step for all of them.
  static_assert(kWarps % (BN / 16) == 0, "a warp's fragments share their column");

  __device__ __forceinline__ static void multiply(Acc& acc, const ATile& a, const BTile& b) {
    using namespace nvcuda::wmma;
    const int col = fragment_of(0) % (BN / 16);
#pragma unroll
    for (int k = 0; k < BK; k += kFragK) {
      fragment<matrix_b, 16, 16, kFragK, Operand, LayoutB> fb;
      load_matrix_sync(fb, b.address(k, 16 * col), BTile::kLd);
      round_operand(fb);
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) {
        const int f = fragment_of(i);
        if (kFragments % kWarps != 0 && f >= kFragments) break;
        fragment<matrix_a, 16, 16, kFragK, Operand, LayoutA> fa;
        load_matrix_sync(fa, a.address(k, 16 * (f / (BN / 16))), ATile::kLd);
        round_operand(fa);
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
    for (int i = 0; i < kPerWarp; ++i) {
      const int frag = fragment_of(i);
      if (kFragments % kWarps != 0 && frag >= kFragments) break;
      nvcuda::wmma::store_matrix_sync(&scratch.v[warp][0][0], acc.v[i], kLdScratch, nvcuda::wmma::mem_row_major);
      __syncwarp();
      const int row = frag / (BN / 16), col = frag % (BN / 16);
      for (int e = lane; e < 256; e += 32) f(16 * row + e / 16, 16 * col + e % 16, scratch.v[warp][e / 16][e % 16]);
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
    for (int e = 0; e < kVec; ++e) tile.put(kAlongK ? k + e : k, kAlongK ? i : i + e, to_float(run.x[e]));
  }
}

// The multiply of storage T: 16-bit storage on tensor cores; float32 on SIMT cores (exact), or on tensor cores
// in TF32 when kTf32 (as cuDNN does when torch.backends.cudnn.allow_tf32 is set).
// kRunsA, kRunsB: how the tensor-core tiles store A and B (SIMT tiles store both one way, element by element).
template <typename T, bool kTf32, int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct MmaFor {
  using type = WmmaMma<T, BM, BN, BK, kRunsA, kRunsB>;
};
template <int BM, int BN, int BK, Runs kRunsA, Runs kRunsB>
struct MmaFor<float, false, BM, BN, BK, kRunsA, kRunsB> {
  using type = SimtMma<BM, BN, BK>;
};

}  // namespace dcign
