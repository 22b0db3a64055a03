// Shared pieces of the unpool-conv kernels (scale factor 2).
//
// Design: each kernel is an implicit GEMM with float32 accumulation. A block of 256 threads owns a
// BM x BN output tile; the reduction runs BK at a time through double-buffered shared-memory operand
// tiles (pipelined_k_loop: the next step's global loads overlap this step's multiplies), multiplied by the
// policy of tile_mma.cuh: tensor cores for bf16 / fp16 (mma.sync) and, under TF32, float32 (wmma); SIMT cores
// for exact float32. Operand tiles load in 16-byte vectors where the tensors allow (TileLoad).
//   forward      M = positions (n, i, j) of phase (0, 0), N = C_out, K = (union taps, C_in): one input tile
//                per union tap feeds every phase whose window holds the tap, so the four phases share
//                their input reads and are written interleaved (bias and ReLU in the epilogue).
//   grad input   M = input positions, N = C_in, K = (phases, taps of the phase, C_out).
//   grad weight  per (phase, tap): M = C_in, N = C_out, K = output positions of the phase, split into
//                chunks whose partial sums go to a float32 workspace; a finalize kernel sums splits and
//                phases in a fixed order (deterministic, no atomics) and un-collapses the taps. For at most 16
//                output channels, per phase: M = C_in, N = (union tap, C_out) pairs, K = input positions
//                (unpool_conv_grad_weight_few_outputs.cu).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "dtype.cuh"
#include "fast_divmod.h"
#include "phase_index.cuh"
#include "tile_mma.cuh"
#include "unpool_conv.h"

namespace dcign {

// OP: the packed weight's output channels (packed_channels(O), unpool_conv.h).
struct Geometry {
  int N, C, H, W, O, OP, HO, WO;
  AxisUnion rows, cols;
};

struct Strides {
  int64_t n, c, h, w;
};

inline Geometry make_geometry(int N, int C, int H, int W, int O, int KH, int KW, int PH, int PW) {
  return {N,
          C,
          H,
          W,
          O,
          packed_channels(O),
          output_size(H, KH, PH, 2),
          output_size(W, KW, PW, 2),
          axis_union(KH, PH),
          axis_union(KW, PW)};
}

inline Strides strides_of(const ActivationView& v) { return {v.sn, v.sc, v.sh, v.sw}; }

// The forward, grad-input and grad-weight kernels state __launch_bounds__(kTileThreads, 1): ptxas then gives
// each instantiation the registers it needs (up to about 160). Left to its own occupancy targets it squeezed
// some into 64-128 registers and spilled. The few-outputs grad-weight kernel states two blocks per SM, 128
// registers (tests/test_cuda_extension.py checks them all for spills).

// Row index of a position past the end of a kernel's range: every tap falls outside the image.
constexpr int kOutside = -(1 << 28);
// A channel index past every tensor's: what a run of a padding column or row reads is outside on every step.
constexpr int kPastChannels = 1 << 30;

// Phase p = 2 * row phase + column phase.
__device__ __forceinline__ bool phase_has_tap(const Geometry& g, int p, int ty, int tx) {
  return in_window(g.rows, p / 2, ty) && in_window(g.cols, p % 2, tx);
}

// Taps of phase p's window (its collapsed kernel's size).
__host__ __device__ __forceinline__ int phase_taps(const Geometry& g, int p) {
  return window_count(g.rows, p / 2) * window_count(g.cols, p % 2);
}

// Taps of all four phases' windows together.
__host__ __device__ __forceinline__ int all_phase_taps(const Geometry& g) {
  return phase_taps(g, 0) + phase_taps(g, 1) + phase_taps(g, 2) + phase_taps(g, 3);
}

// A divisor for FastDivmod from a count that may be 0 (a phase without rows or taps): nothing is divided by
// it then.
__device__ __forceinline__ int at_least_one(int count) { return count > 0 ? count : 1; }

// Tap t of the phases' windows, counted phase 0's first (row-major within a window): phase and union taps.
struct PhaseTap {
  int p, ty, tx;
};

// The taps of the phases' windows, prepared once per block for the loops that walk them: tap(t) finds the
// phase by comparisons and divides by its window's width with a FastDivmod. (Selects, not arrays indexed at
// run time, which would put them in local memory.)
struct PhaseTaps {
  int end0, end1, end2;  // taps of phases 0, 0..1, 0..2
  int row0, row1, col0, col1;
  FastDivmod width0, width1;

  __device__ __forceinline__ explicit PhaseTaps(const Geometry& g)
      : end0(phase_taps(g, 0)),
        end1(end0 + phase_taps(g, 1)),
        end2(end1 + phase_taps(g, 2)),
        row0(window_first(g.rows, 0)),
        row1(window_first(g.rows, 1)),
        col0(window_first(g.cols, 0)),
        col1(window_first(g.cols, 1)),
        width0(at_least_one(window_count(g.cols, 0))),
        width1(at_least_one(window_count(g.cols, 1))) {}

  __device__ __forceinline__ PhaseTap tap(int t) const {
    const int p = (t >= end0) + (t >= end1) + (t >= end2);
    t -= t >= end2 ? end2 : t >= end1 ? end1 : t >= end0 ? end0 : 0;  // (selects on the comparisons: no branch)
    int row, col;
    (p % 2 == 0 ? width0 : width1).divmod(t, row, col);
    return {p, (p / 2 == 0 ? row0 : row1) + row, (p % 2 == 0 ? col0 : col1) + col};
  }
};

// The positions (n, row, col) of an N x rows x cols grid from `first` on, for the reductions over positions
// (grad weight): `first` is split into its coordinates once, in 64 bits; a position r after it comes from
// two FastDivmods of 32-bit sums (r < kMaxChunk: the split's length, checked by the launchers).
struct GridPositions {
  int n0, row0, col0;
  FastDivmod by_rows, by_cols;

  __device__ __forceinline__ GridPositions(int64_t first, int rows, int cols)
      : n0(static_cast<int>(first / at_least_one(cols) / at_least_one(rows))),
        row0(static_cast<int>(first / at_least_one(cols) % at_least_one(rows))),
        col0(static_cast<int>(first % at_least_one(cols))),
        by_rows(at_least_one(rows)),
        by_cols(at_least_one(cols)) {}

  __device__ __forceinline__ void at(int r, int& n, int& row, int& col) const {
    int carry_rows, carry_n;
    by_cols.divmod(col0 + r, carry_rows, col);
    by_rows.divmod(row0 + carry_rows, carry_n, row);
    n = n0 + carry_n;
  }
};

// Elements of the packed weight (or its gradient's partial sums) per phase: [TR, TC, C, OP].
__host__ __device__ __forceinline__ int64_t packed_phase_size(const Geometry& g) {
  return static_cast<int64_t>(g.rows.taps) * g.cols.taps * g.C * g.OP;
}

// Offset of union tap (ty, tx), input channel c, output channel o within one phase of the packed weight.
__host__ __device__ __forceinline__ int64_t packed_offset(const Geometry& g, int ty, int tx, int c, int o) {
  return (static_cast<int64_t>(ty * g.cols.taps + tx) * g.C + c) * g.OP + o;
}

// The K loop of an implicit GEMM, software-pipelined over two shared-memory buffers: the global loads of
// step s + 1 are in flight, in registers, while step s multiplies, and one barrier per step suffices (a
// buffer is refilled only after the barrier that ends the multiplies reading it). Block-uniform.
//   fetch(s, staged)       global memory -> this thread's registers, for step s
//   stash(s, staged, buf)  registers -> shared buffer buf
//   multiply(s, buf)       the multiplies of step s, from buffer buf
// kTwoPerTrip runs two steps per trip, one from each buffer, so that every shared-memory address in the loop is a
// per-thread constant plus an immediate (with a run-time buffer index, each trip recomputes the addresses of every
// ldmatrix and store). The grad kernels ask for it where their loads hold their runs' records (TileLoad::kHeld):
// with 8 to 32 runs per thread the second step's registers spilled. The forward does not: ptxas recomputed the
// addresses in its per-phase product branches all the same, and its loop read longer.
template <typename Staged, bool kTwoPerTrip, typename Fetch, typename Stash, typename Multiply>
__device__ __forceinline__ void pipelined_k_loop(int steps, Fetch&& fetch, Stash&& stash, Multiply&& multiply) {
  if (steps <= 0) return;
  Staged staged;
  fetch(0, staged);
  stash(0, staged, 0);
  __syncthreads();
  auto step = [&](int s, int buf) {
    const bool more = s + 1 < steps;
    if (more) fetch(s + 1, staged);
    multiply(s, buf);
    if (more) stash(s + 1, staged, buf ^ 1);
    __syncthreads();
  };
  if constexpr (kTwoPerTrip) {
    for (int s = 0; s < steps; s += 2) {
      step(s, 0);
      if (s + 1 < steps) step(s + 1, 1);
    }
  } else {
    for (int s = 0; s < steps; ++s) step(s, s & 1);
  }
}

// index * stride for an index that is >= 0 wherever the offset is read (a run outside may compute garbage): the
// multiply as unsigned skips the index's sign extension, two instructions of the four.
__device__ __forceinline__ int64_t times(int index, int64_t stride) {
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<unsigned>(index)) * static_cast<uint64_t>(stride));
}

// What a run outside the tensors reads: zeros (+0.0 in every storage type).
template <typename Run>
__device__ const Run kZeroRun{};

// Whether 0 <= v < n (n >= 0), in one unsigned comparison.
__device__ __forceinline__ bool in_range(int v, int n) { return static_cast<unsigned>(v) < static_cast<unsigned>(n); }

// Where a run reads on one K step: its first element, unless it lies outside the tensor (the tile gets zeros
// there, and `at` is not read).
template <typename T>
struct RunAt {
  const T* at;
  bool inside;
};

// One thread's share of an operand tile [OUTER][INNER] whose INNER index runs along contiguous memory,
// loaded kVec elements at a time: 16-byte vectors where the tensor allows (contiguous, aligned channels),
// else single elements (kVec 1). Run q = tid + j * kTileThreads covers (outer, inner0 .. inner0 + kVec).
// A run's coordinates stay the same on every K step, so what depends on them alone (its position's 64-bit
// offset, its rows and columns for the bounds checks) is prepared once, before the loop, into a kernel's
// own record per run; a step then only shifts it:
//   prepare(where, f)        where[j] = f(outer, inner0) for each of this thread's runs
//   fetch(where, f, step)    global -> registers: step(record) is the run's RunAt on this step
//   stash(put)               registers -> the shared tile: put(outer, inner0, run) for every run
// Records are held only for a few runs per thread (kHeld); element-by-element loads have 8 to 32, whose records
// would spill, and fetch prepares each again from f.
template <typename T, int OUTER, int INNER, int kVec>
struct TileLoad {
  static_assert(INNER % kVec == 0, "runs do not straddle rows");
  static constexpr int kRow = INNER / kVec, kRuns = OUTER * kRow;
  static constexpr int kPerThread = (kRuns + kTileThreads - 1) / kTileThreads;
  using Run = Packed<T, kVec>;
  Run v[kPerThread];

  // Whether this thread has a run j (not where the tile has fewer runs than the threads cover), and its
  // coordinates (from unsigned arithmetic: divisions by powers of two become shifts).
  __device__ __forceinline__ static bool has_run(int j) { return kRuns % kTileThreads == 0 || run(j) < kRuns; }
  __device__ __forceinline__ static unsigned run(int j) { return threadIdx.x + j * kTileThreads; }
  __device__ __forceinline__ static int outer(int j) { return static_cast<int>(run(j) / kRow); }
  __device__ __forceinline__ static int inner(int j) { return static_cast<int>(run(j) % kRow * kVec); }

  static constexpr bool kHeld = kPerThread <= 4;

  template <typename Where, typename Prepare>
  __device__ __forceinline__ static void prepare(Where (&where)[kPerThread], Prepare&& f) {
    if constexpr (kHeld) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (has_run(j)) where[j] = f(outer(j), inner(j));
      }
    }
  }

  // A run outside reads kZeroRun: every run loads from a selected address, with no branch around the load and no
  // register moves of zeros.
  __device__ __forceinline__ static Run load(const RunAt<T>& run) {
    return *(run.inside && run_aligned<Run>(run.at) ? reinterpret_cast<const Run*>(run.at) : &kZeroRun<Run>);
  }

  template <typename Where, typename Prepare, typename Step>
  __device__ __forceinline__ void fetch(const Where (&where)[kPerThread], Prepare&& f, Step&& step) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (!has_run(j)) {
        v[j] = Run::zeros();
      } else if constexpr (kHeld) {
        v[j] = load(step(where[j]));
      } else {
        v[j] = load(step(f(outer(j), inner(j))));
      }
    }
  }

  template <typename Put>
  __device__ __forceinline__ void stash(Put&& put) const {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (!has_run(j)) break;
      put(outer(j), inner(j), v[j]);
    }
  }
};

// The record of a run whose offset a kernel computes whole on every step: its coordinates.
struct RunCoords {
  int outer, inner;
};
__device__ __forceinline__ RunCoords run_coords(int outer, int inner) { return {outer, inner}; }

// Whether an activation view can be read in 16-byte vectors along its channels: channels contiguous,
// every other stride, the channel count and the base a whole number of vectors.
template <typename T>
bool loads_vectors(const ActivationView& v, int channels) {
  constexpr int kVec = kVecOf<T>;
  return v.sc == 1 && v.sn % kVec == 0 && v.sh % kVec == 0 && v.sw % kVec == 0 && channels % kVec == 0 &&
         v.ptr % 16 == 0;
}

// Calls fn(std::integral_constant<int, kVec>{}) with the vector width that every view (and its channel count)
// allows: 16-byte vectors, else single elements.
template <typename T, typename Fn>
void dispatch_vector(std::initializer_list<std::pair<const ActivationView*, int>> views, Fn&& fn) {
  bool vectors = true;
  for (const auto& [view, channels] : views) vectors = vectors && loads_vectors<T>(*view, channels);
  if (vectors) {
    fn(std::integral_constant<int, kVecOf<T>>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// The double-buffered operand tiles of a kernel with one product per step (the grad kernels).
template <typename Mma>
struct PairTiles {
  typename Mma::ATile a[2];
  typename Mma::BTile b[2];
};

// A kernel's shared memory: the operand tiles of its K loop and, in the same bytes once the loop has ended
// (pipelined_k_loop ends on a barrier), the scratch its results are staged through. Sharing the bytes keeps
// the float32 tensor-core tiles under the 48 KiB of static shared memory.
template <typename Tiles, typename Mma>
union KLoopShared {
  Tiles tiles;
  typename Mma::Scratch scratch;
};

// The grad-weight launchers' split arguments: a clear error for values their kernels cannot take.
inline void check_splits(const char* launcher, int splits, int chunk) {
  if (splits < 1 || splits > 65535 || chunk < 1 || chunk > kMaxChunk) {
    throw std::invalid_argument(std::string(launcher) + ": splits must lie in [1, 65535] and chunk in [1, 2^30]");
  }
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

inline cudaStream_t to_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace dcign
