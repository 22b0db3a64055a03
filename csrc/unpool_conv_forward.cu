// Unpool-conv forward: the four phases of one block of low-resolution positions from shared input tiles
// (design: unpool_conv_common.cuh). With kPhasesInN (at most 4 output channels and a window every phase
// reads whole, as K=5 same and K=7 valid have) the four phases sit side by side in one product's columns,
// n = phase * O + o, instead of four products whose 16 columns 1 to 3 channels would mostly pad.
#include "cuda_check.h"
#include "unpool_conv_common.cuh"

namespace dcign {
namespace {

template <typename T, bool kTf32, int BM, int BN, int BK, int kVec, bool kPhasesInN>
__global__ void __launch_bounds__(kTileThreads, 1)
    unpool_conv_forward_kernel(const T* __restrict__ x, const T* __restrict__ wp, const T* __restrict__ bias,
                               T* __restrict__ y, Geometry g, Strides xs, Strides ys, int relu) {
  using Mma = typename MmaFor<T, kTf32, BM, BN, BK, Runs::kAlongK, Runs::kAcross>::type;
  constexpr int kProducts = kPhasesInN ? 1 : 4;  // one product per phase, or one for all four
  using InputLoad = TileLoad<T, BM, BK, kVec>;  // input [m][k]: k runs along the channels
  // packed weight [k][n]: n runs along the padded channels (gathered across phases with kPhasesInN)
  using WeightLoad = TileLoad<T, BK, BN, kPhasesInN ? 1 : kVecOf<T>>;
  struct Staged {
    InputLoad a;
    WeightLoad w[kProducts];
    unsigned products;  // bit q: product q's phase has the step's tap
  };
  struct Tiles {
    typename Mma::ATile a[2];
    typename Mma::BTile w[2][kProducts];
  };
  __shared__ KLoopShared<Tiles, Mma> smem;
  __shared__ int pos_n[BM], pos_i[BM], pos_j[BM];
  const int tid = threadIdx.x;
  const int rows0 = (g.HO + 1) / 2, cols0 = (g.WO + 1) / 2;  // phase (0, 0) has the most rows and columns
  const int64_t positions = static_cast<int64_t>(g.N) * rows0 * cols0;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int o0 = blockIdx.y * BN;
  for (int m = tid; m < BM; m += kTileThreads) {
    const int64_t pos = m0 + m;
    const int64_t ni = pos / cols0;
    pos_n[m] = static_cast<int>(ni / rows0);
    pos_i[m] = pos < positions ? static_cast<int>(ni % rows0) : kOutside;
    pos_j[m] = static_cast<int>(pos % cols0);
  }
  typename Mma::Acc acc[kProducts];
#pragma unroll
  for (int p = 0; p < kProducts; ++p) Mma::zero(acc[p]);
  // Column n of product q: phase and output channel.
  const FastDivmod by_outputs(g.O);
  auto column = [&](int q, int n, int& p, int& o) {
    if constexpr (kPhasesInN) {
      by_outputs.divmod(o0 + n, p, o);
    } else {
      p = q, o = o0 + n;
    }
  };
  __syncthreads();

  // Step s: union tap s / chunks in row-major (ty, tx) order, input channels from (s % chunks) * BK.
  const int64_t phase_size = packed_phase_size(g);
  const int chunks = (g.C + BK - 1) / BK;
  const FastDivmod by_chunks(chunks), by_col_taps(g.cols.taps);
  auto tap_of = [&](int s, int& ty, int& tx, int& chunk) {
    int tap;
    by_chunks.divmod(s, tap, chunk);
    by_col_taps.divmod(tap, ty, tx);
  };
  // This thread's runs (TileLoad::prepare): the input at the position's own pixel and the run's first channel,
  // which a step shifts by its tap and chunk (rows and columns kept for the bounds checks); the weight of the
  // run's column at tap (0, 0), channel k, which a step shifts likewise.
  struct InputRun {
    const T* at;
    int i, j, k;
  };
  struct WeightRun {
    const T* at;
    int k;  // kPastChannels for a padding column
  };
  InputRun a_runs[InputLoad::kPerThread];
  auto a_run = [&](int m, int k) {
    const bool valid = pos_i[m] != kOutside;  // (past the last position, n would point past the tensor)
    return InputRun{x + (valid ? pos_n[m] * xs.n + pos_i[m] * xs.h + pos_j[m] * xs.w + k * xs.c : 0), pos_i[m],
                    pos_j[m], k};
  };
  InputLoad::prepare(a_runs, a_run);
  auto w_run = [&](int q) {
    return [&, q](int k, int n) {
      int p, o;
      column(q, n, p, o);
      const bool valid = o < g.OP && p < 4;
      return WeightRun{wp + (valid ? p * phase_size + static_cast<int64_t>(k) * g.OP + o : 0),
                       valid ? k : kPastChannels};
    };
  };
  WeightRun w_runs[kProducts][WeightLoad::kPerThread];
#pragma unroll
  for (int q = 0; q < kProducts; ++q) WeightLoad::prepare(w_runs[q], w_run(q));
  auto fetch = [&](int s, Staged& staged) {
    int ty, tx, chunk;
    tap_of(s, ty, tx, chunk);
    const int c0 = chunk * BK, dr = g.rows.start + ty, dc = g.cols.start + tx;
    // A[m][k] = x[n, i + dr, j + dc, c0 + k].
    const int64_t a_shift = dr * xs.h + dc * xs.w + c0 * xs.c;
    staged.a.fetch(a_runs, a_run, [&](const InputRun& r) {
      return RunAt<T>{r.at + a_shift, in_range(r.i + dr, g.H) && in_range(r.j + dc, g.W) && r.k + c0 < g.C};
    });
    // B[k][n] = wp[p, ty, tx, c0 + k, o] for the phases whose window holds the tap (every phase's, with
    // kPhasesInN: the host launches it only for windows shared whole).
    const int64_t w_shift = packed_offset(g, ty, tx, c0, 0);
    staged.products = 0;
#pragma unroll
    for (int q = 0; q < kProducts; ++q) {
      if (!kPhasesInN && !phase_has_tap(g, q, ty, tx)) continue;
      staged.products |= 1u << q;
      staged.w[q].fetch(w_runs[q], w_run(q),
                        [&](const WeightRun& r) { return RunAt<T>{r.at + w_shift, r.k + c0 < g.C}; });
    }
  };
  // The products of the step whose tiles the last stash filled: multiply(s) runs after stash(s) and before
  // stash(s + 1), so the step's tap need not be found again.
  unsigned stashed_products = 0;
  auto stash = [&](int, const Staged& staged, int buf) {
    staged.a.stash([&](int m, int k, const auto& run) { put_run<true>(smem.tiles.a[buf], k, m, run); });
#pragma unroll
    for (int q = 0; q < kProducts; ++q) {
      if (!((staged.products >> q) & 1u)) continue;
      staged.w[q].stash([&](int k, int n, const auto& run) { put_run<false>(smem.tiles.w[buf][q], k, n, run); });
    }
    stashed_products = staged.products;
  };
  auto multiply = [&](int, int buf) {
#pragma unroll
    for (int q = 0; q < kProducts; ++q) {
      if ((stashed_products >> q) & 1u) Mma::multiply(acc[q], smem.tiles.a[buf], smem.tiles.w[buf][q]);
    }
  };
  pipelined_k_loop<Staged, false>(g.rows.taps * g.cols.taps * chunks, fetch, stash, multiply);

#pragma unroll
  for (int q = 0; q < kProducts; ++q) {
    Mma::for_each(acc[q], smem.scratch, [&](int m, int n, float value) {
      int p, o;
      column(q, n, p, o);
      const int row = 2 * pos_i[m] + p / 2, col = 2 * pos_j[m] + p % 2;
      if (pos_i[m] == kOutside || p >= 4 || row >= g.HO || col >= g.WO || o >= g.O) return;
      float v = value + (bias != nullptr ? to_float(bias[o]) : 0.0f);
      if (relu && v < 0.0f) v = 0.0f;  // not fmaxf, which turns NaN into 0: torch.relu keeps it
      y[pos_n[m] * ys.n + row * ys.h + col * ys.w + o * ys.c] = from_float<T>(v);
    });
  }
}

template <typename T, bool kTf32, int BM, int BN, int BK, bool kPhasesInN>
void launch_forward(const ActivationView& x, uintptr_t wp, uintptr_t bias, const ActivationView& y, const Geometry& g,
                    int relu, cudaStream_t stream) {
  const int64_t positions = static_cast<int64_t>(g.N) * ((g.HO + 1) / 2) * ((g.WO + 1) / 2);
  const dim3 grid(ceil_div(positions, BM), ceil_div(kPhasesInN ? 4 * g.O : g.O, BN));
  dispatch_vector<T>({{&x, g.C}}, [&](auto vec) {
    launch_kernel("unpool_conv_forward_kernel", grid, kTileThreads, stream,
                  unpool_conv_forward_kernel<T, kTf32, BM, BN, BK, decltype(vec)::value, kPhasesInN>,
                  reinterpret_cast<const T*>(x.ptr), reinterpret_cast<const T*>(wp), reinterpret_cast<const T*>(bias),
                  reinterpret_cast<T*>(y.ptr), g, strides_of(x), strides_of(y), relu);
  });
}

// Whether every phase reads the whole union window on both axes (no tap is some phase's alone).
bool shares_window(const Geometry& g) {
  for (const AxisUnion& axis : {g.rows, g.cols}) {
    for (int phase = 0; phase < 2; ++phase) {
      if (window_first(axis, phase) != 0 || window_count(axis, phase) != axis.taps) return false;
    }
  }
  return true;
}

}  // namespace

void unpool_conv_forward(ActivationView x, uintptr_t wp, uintptr_t bias, ActivationView y, int N, int C, int H, int W,
                         int O, int KH, int KW, int PH, int PW, int relu, int dtype, int tf32, uintptr_t stream) {
  const Geometry g = make_geometry(N, C, H, W, O, KH, KW, PH, PW);
  dispatch_multiply(dtype, tf32, "unpool_conv_forward", [&](auto tag, auto use_tf32) {
    using T = typename decltype(tag)::type;
    constexpr bool kTf32 = decltype(use_tf32)::value;
    // Few output channels (e.g. the last decoder layer): a narrow, tall tile wastes no columns. TF32 tiles
    // hold 4-byte operands in a tensor-core layout: half as tall, to fit in static shared memory.
    constexpr int kTall = kTf32 ? 128 : 256;
    if (4 * O <= 16 && shares_window(g)) {  // the four phases fit one product's 16 columns
      launch_forward<T, kTf32, kTall, 16, 16, true>(x, wp, bias, y, g, relu, to_stream(stream));
    } else if (O <= 16) {
      launch_forward<T, kTf32, kTall, 16, 16, false>(x, wp, bias, y, g, relu, to_stream(stream));
    } else {
      launch_forward<T, kTf32, 64, 64, kWideStepK<T>, false>(x, wp, bias, y, g, relu, to_stream(stream));
    }
  });
}

}  // namespace dcign
