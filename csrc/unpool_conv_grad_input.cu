// Unpool-conv grad input: dx[n, i, j, c] = sum over phases (A, B), their taps (ty, tx) and C_out of
// g[n, 2 io + A, 2 jo + B, o] * wp[A, B, ty, tx, c, o], with io = i - (row start + ty), jo likewise
// (design: unpool_conv_common.cuh). With kTapsInK (at most kPairsInKChannels output channels, an image layer)
// the reduction runs over (phase tap, o) pairs flattened, BK of them per step, instead of over taps and then
// channel chunks of BK that 1 to 3 channels would mostly pad: both operands are then gathered element by
// element.
#include "cuda_check.h"
#include "unpool_conv_common.cuh"

namespace dcign {
namespace {

// Output channels up to which the reduction runs over (tap, channel) pairs (an image layer's 1 to 3 would
// mostly pad a channel chunk); more channels keep the chunks and their 16-byte loads.
constexpr int kPairsInKChannels = 8;

template <typename T, bool kTf32, int BM, int BN, int BK, int kVec, bool kTapsInK>
__global__ void __launch_bounds__(kTileThreads, 1)
    unpool_conv_grad_input_kernel(const T* __restrict__ gout, const T* __restrict__ wp, T* __restrict__ dx, Geometry g,
                                  Strides gs, Strides xs) {
  using Mma = typename MmaFor<T, kTf32, BM, BN, BK, Runs::kAlongK, Runs::kAlongK>::type;
  using GradLoad = TileLoad<T, BM, BK, kVec>;                      // grad_out [m][k]: k runs along its channels
  using WeightLoad = TileLoad<T, BN, BK, kTapsInK ? 1 : kVecOf<T>>;  // packed weight [n][k]: along the padded channels
  struct Staged {
    GradLoad a;
    WeightLoad b;
  };
  __shared__ KLoopShared<PairTiles<Mma>, Mma> smem;
  __shared__ int pos_n[BM], pos_i[BM], pos_j[BM];
  const int tid = threadIdx.x;
  const int64_t positions = static_cast<int64_t>(g.N) * g.H * g.W;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int c0 = blockIdx.y * BN;
  for (int m = tid; m < BM; m += kTileThreads) {
    const int64_t pos = m0 + m;
    const int64_t ni = pos / g.W;
    pos_n[m] = static_cast<int>(ni / g.H);
    pos_i[m] = pos < positions ? static_cast<int>(ni % g.H) : kOutside;
    pos_j[m] = static_cast<int>(pos % g.W);
  }
  typename Mma::Acc acc;
  Mma::zero(acc);
  __syncthreads();

  // Step s: tap s / chunks of the phases' windows (phase 0's taps first, row-major), output channels from
  // (s % chunks) * BK; with kTapsInK, the (tap, o) pairs s * BK + k.
  const int64_t phase_size = packed_phase_size(g);
  const int chunks = (g.O + BK - 1) / BK;
  const int pairs = all_phase_taps(g) * g.O;
  const PhaseTaps taps(g);
  const FastDivmod by_chunks(chunks), by_outputs(g.O);
  // This thread's runs (TileLoad::prepare), which a step shifts by its tap and channels: grad_out at output
  // pixel (2 i, 2 j), the input position's own (its rows and columns kept for the bounds checks), and the weight
  // of the run's input channel at phase 0, tap (0, 0). With kTapsInK, k is a (tap, o) pair, not a channel: the
  // runs start at channel 0 and each step finds its pairs' channels.
  struct GradRun {
    const T* at;
    int i, j, k;
  };
  struct WeightRun {
    const T* at;
    int k;
    bool inside;  // the input channel is
  };
  GradRun a_runs[GradLoad::kPerThread];
  auto a_run = [&](int m, int k) {
    const bool valid = pos_i[m] != kOutside;  // (past the last position, n would point past the tensor)
    const int64_t pixel = pos_n[m] * gs.n + 2 * pos_i[m] * gs.h + 2 * pos_j[m] * gs.w;
    return GradRun{gout + (valid ? pixel + (kTapsInK ? 0 : k) * gs.c : 0), pos_i[m], pos_j[m], k};
  };
  GradLoad::prepare(a_runs, a_run);
  WeightRun b_runs[WeightLoad::kPerThread];
  auto b_run = [&](int n, int k) {
    const int ch = c0 + n;
    return WeightRun{wp + (ch < g.C ? static_cast<int64_t>(ch) * g.OP + (kTapsInK ? 0 : k) : 0), k, ch < g.C};
  };
  WeightLoad::prepare(b_runs, b_run);
  // A[m][k] = g[n, 2 io + A, 2 jo + B, o] and B[k][n] = wp[p, ty, tx, c0 + n, o] for tap (p, ty, tx), with
  // io = i - (row start + ty), jo likewise; o_at: o's offset from the run's own channel.
  const int rows0 = phase_count(g.HO, 0, 2), rows1 = phase_count(g.HO, 1, 2);  // of each phase's output grid
  const int cols0 = phase_count(g.WO, 0, 2), cols1 = phase_count(g.WO, 1, 2);
  auto grad_at = [&](const GradRun& r, const PhaseTap& tap, int o, int64_t o_at) {
    const int A = tap.p / 2, B = tap.p % 2, dr = g.rows.start + tap.ty, dc = g.cols.start + tap.tx;
    const bool inside = in_range(r.i - dr, A == 0 ? rows0 : rows1) && in_range(r.j - dc, B == 0 ? cols0 : cols1);
    return RunAt<T>{r.at + (A - 2 * dr) * gs.h + (B - 2 * dc) * gs.w + o_at * gs.c, inside && o < g.O};
  };
  auto weight_at = [&](const WeightRun& r, const PhaseTap& tap, int o, int64_t o_at) {
    return RunAt<T>{r.at + tap.p * phase_size + packed_offset(g, tap.ty, tap.tx, 0, 0) + o_at, r.inside && o < g.OP};
  };
  auto fetch = [&](int s, Staged& staged) {
    if constexpr (kTapsInK) {
      auto pair = [&](int k, int& t, int& o) {
        by_outputs.divmod(s * BK + k, t, o);
        return s * BK + k < pairs;
      };
      staged.a.fetch(a_runs, a_run, [&](const GradRun& r) {
        int t, o;
        return pair(r.k, t, o) ? grad_at(r, taps.tap(t), o, o) : RunAt<T>{gout, false};
      });
      staged.b.fetch(b_runs, b_run, [&](const WeightRun& r) {
        int t, o;
        return pair(r.k, t, o) ? weight_at(r, taps.tap(t), o, o) : RunAt<T>{wp, false};
      });
    } else {
      int t, chunk;
      by_chunks.divmod(s, t, chunk);
      const PhaseTap tap = taps.tap(t);
      const int o0 = chunk * BK;
      staged.a.fetch(a_runs, a_run, [&](const GradRun& r) { return grad_at(r, tap, o0 + r.k, o0); });
      staged.b.fetch(b_runs, b_run, [&](const WeightRun& r) { return weight_at(r, tap, o0 + r.k, o0); });
    }
  };
  auto stash = [&](int, const Staged& staged, int buf) {
    staged.a.stash([&](int m, int k, const auto& run) { put_run<true>(smem.tiles.a[buf], k, m, run); });
    staged.b.stash([&](int n, int k, const auto& run) { put_run<true>(smem.tiles.b[buf], k, n, run); });
  };
  auto multiply = [&](int, int buf) { Mma::multiply(acc, smem.tiles.a[buf], smem.tiles.b[buf]); };
  const int steps = kTapsInK ? (pairs + BK - 1) / BK : all_phase_taps(g) * chunks;
  pipelined_k_loop<Staged, GradLoad::kHeld && WeightLoad::kHeld>(steps, fetch, stash, multiply);

  Mma::for_each(acc, smem.scratch, [&](int m, int n, float value) {
    const int ch = c0 + n;
    if (pos_i[m] == kOutside || ch >= g.C) return;
    dx[pos_n[m] * xs.n + pos_i[m] * xs.h + pos_j[m] * xs.w + ch * xs.c] = from_float<T>(value);
  });
}

template <typename T, bool kTf32, int BM, int BN, int BK>
void launch_grad_input(const ActivationView& gout, uintptr_t wp, const ActivationView& dx, const Geometry& g,
                       cudaStream_t stream) {
  const dim3 grid(ceil_div(static_cast<int64_t>(g.N) * g.H * g.W, BM), ceil_div(g.C, BN));
  auto launch = [&](auto kernel) {
    launch_kernel("unpool_conv_grad_input_kernel", grid, kTileThreads, stream, kernel,
                  reinterpret_cast<const T*>(gout.ptr), reinterpret_cast<const T*>(wp), reinterpret_cast<T*>(dx.ptr), g,
                  strides_of(gout), strides_of(dx));
  };
  // Flattened (tap, o) pairs pay with element-by-element gathers: worth it where channel chunks would be
  // mostly padding.
  if (g.O <= kPairsInKChannels) {
    launch(unpool_conv_grad_input_kernel<T, kTf32, BM, BN, BK, 1, true>);
    return;
  }
  dispatch_vector<T>({{&gout, g.O}}, [&](auto vec) {
    launch(unpool_conv_grad_input_kernel<T, kTf32, BM, BN, BK, decltype(vec)::value, false>);
  });
}

}  // namespace

void unpool_conv_grad_input(ActivationView g, uintptr_t wp, ActivationView dx, int N, int C, int H, int W, int O,
                            int KH, int KW, int PH, int PW, int dtype, int tf32, uintptr_t stream) {
  const Geometry geo = make_geometry(N, C, H, W, O, KH, KW, PH, PW);
  dispatch_multiply(dtype, tf32, "unpool_conv_grad_input", [&](auto tag, auto use_tf32) {
    using T = typename decltype(tag)::type;
    constexpr bool kTf32 = decltype(use_tf32)::value;
    if (C <= 16) {
      launch_grad_input<T, kTf32, 256, 16, kWideStepK<T>>(g, wp, dx, geo, to_stream(stream));
    } else {
      launch_grad_input<T, kTf32, 128, 64, kWideStepK<T>>(g, wp, dx, geo, to_stream(stream));
    }
  });
}

}  // namespace dcign
