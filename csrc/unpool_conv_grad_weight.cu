// Unpool-conv grad weight, split partial sums: for each phase (A, B), tap (ty, tx) of its window and
// split s of its output positions, ws[s, A, B, ty, tx, c, o] = sum over positions (n, io, jo) in the split
// of x[n, io + row start + ty, jo + col start + tx, c] * g[n, 2 io + A, 2 jo + B, o] (design:
// unpool_conv_common.cuh).
#include "cuda_check.h"
#include "unpool_conv_common.cuh"

namespace dcign {
namespace {

template <typename T, bool kTf32, int BM, int BN, int BK, int kVec>
__global__ void __launch_bounds__(kTileThreads, 1)
    unpool_conv_grad_weight_kernel(const T* __restrict__ x, const T* __restrict__ gout, float* __restrict__ ws,
                                   Geometry g, Strides xs, Strides gs, int chunk) {
  using Mma = typename MmaFor<T, kTf32, BM, BN, BK, Runs::kAcross, Runs::kAcross>::type;
  using InputLoad = TileLoad<T, BK, BM, kVec>;  // input [k][c]: c runs along its channels
  using GradLoad = TileLoad<T, BK, BN, kVec>;   // grad_out [k][o]: o runs along its channels
  struct Staged {
    InputLoad a;
    GradLoad b;
  };
  __shared__ KLoopShared<PairTiles<Mma>, Mma> smem;
  const int o_tiles = (g.O + BN - 1) / BN;
  const int c0 = (blockIdx.x / o_tiles) * BM, o0 = (blockIdx.x % o_tiles) * BN;
  const int split = blockIdx.z;
  // blockIdx.y enumerates the taps of phase 0's window, then phase 1's, ...
  const auto [p, ty, tx] = PhaseTaps(g).tap(blockIdx.y);
  const int A = p / 2, B = p % 2;
  const int dr = g.rows.start + ty, dc = g.cols.start + tx;
  const int rows = phase_count(g.HO, A, 2), cols = phase_count(g.WO, B, 2);
  const int64_t positions = static_cast<int64_t>(g.N) * rows * cols;
  const int64_t begin = static_cast<int64_t>(split) * chunk;
  const int count = static_cast<int>(begin + chunk < positions ? chunk : positions - begin);  // this split's
  const GridPositions walk(begin, rows, cols);

  typename Mma::Acc acc;
  Mma::zero(acc);
  // Step s reduces over the phase's output positions begin + s * BK + k, k < BK.
  struct Position {
    int n, io, jo;
    bool inside;
  };
  auto position = [&](int s, int k) {
    Position at;
    at.inside = s * BK + k < count;
    walk.at(s * BK + k, at.n, at.io, at.jo);
    return at;
  };
  // This thread's runs (TileLoad::prepare): the position k of a step and the run's first channel, whose
  // offset a step adds to its position's.
  struct ChannelRun {
    const T* at;
    int k;
    bool inside;  // the channel is
  };
  ChannelRun a_runs[InputLoad::kPerThread], b_runs[GradLoad::kPerThread];
  auto a_run = [&](int k, int c) {
    const int ch = c0 + c;
    return ChannelRun{x + (ch < g.C ? ch * xs.c : 0), k, ch < g.C};
  };
  InputLoad::prepare(a_runs, a_run);
  auto b_run = [&](int k, int o) {
    const int oc = o0 + o;
    return ChannelRun{gout + (oc < g.O ? oc * gs.c : 0), k, oc < g.O};
  };
  GradLoad::prepare(b_runs, b_run);
  auto fetch = [&](int s, Staged& staged) {
    // A[k][c] = x[n, io + dr, jo + dc, c0 + c].
    staged.a.fetch(a_runs, a_run, [&](const ChannelRun& r) {
      const Position at = position(s, r.k);
      const int row = at.io + dr, col = at.jo + dc;
      const bool inside = r.inside && at.inside && in_range(row, g.H) && in_range(col, g.W);
      return RunAt<T>{r.at + times(at.n, xs.n) + times(row, xs.h) + times(col, xs.w), inside};
    });
    // B[k][o] = g[n, 2 io + A, 2 jo + B, o0 + o].
    staged.b.fetch(b_runs, b_run, [&](const ChannelRun& r) {
      const Position at = position(s, r.k);
      const int64_t offset = times(at.n, gs.n) + times(2 * at.io + A, gs.h) + times(2 * at.jo + B, gs.w);
      return RunAt<T>{r.at + offset, r.inside && at.inside};
    });
  };
  auto stash = [&](int, const Staged& staged, int buf) {
    staged.a.stash([&](int k, int c, const auto& run) { put_run<false>(smem.tiles.a[buf], k, c, run); });
    staged.b.stash([&](int k, int o, const auto& run) { put_run<false>(smem.tiles.b[buf], k, o, run); });
  };
  auto multiply = [&](int, int buf) { Mma::multiply(acc, smem.tiles.a[buf], smem.tiles.b[buf]); };
  pipelined_k_loop<Staged, InputLoad::kHeld && GradLoad::kHeld>((count + BK - 1) / BK, fetch, stash, multiply);

  float* out = ws + (static_cast<int64_t>(split) * 4 + p) * packed_phase_size(g) + packed_offset(g, ty, tx, 0, 0);
  Mma::for_each(acc, smem.scratch, [&](int m, int n, float value) {
    const int ch = c0 + m, o = o0 + n;
    if (ch < g.C && o < g.O) out[static_cast<int64_t>(ch) * g.OP + o] = value;
  });
}

template <int BM, int BN>
dim3 grad_weight_grid(const Geometry& g, int splits) {
  return dim3(ceil_div(g.C, BM) * ceil_div(g.O, BN), all_phase_taps(g), splits);
}

template <typename T, bool kTf32, int BM, int BN, int BK>
void launch_grad_weight(const ActivationView& x, const ActivationView& gout, uintptr_t ws, const Geometry& g,
                        int splits, int chunk, cudaStream_t stream) {
  const dim3 grid = grad_weight_grid<BM, BN>(g, splits);
  dispatch_vector<T>({{&x, g.C}, {&gout, g.O}}, [&](auto vec) {
    launch_kernel("unpool_conv_grad_weight_kernel", grid, kTileThreads, stream,
                  unpool_conv_grad_weight_kernel<T, kTf32, BM, BN, BK, decltype(vec)::value>,
                  reinterpret_cast<const T*>(x.ptr), reinterpret_cast<const T*>(gout.ptr), reinterpret_cast<float*>(ws),
                  g, strides_of(x), strides_of(gout), chunk);
  });
}

// Calls f(BM, BN) with the kernel's (C_in, C_out) tile for C input and O output channels, as integral constants.
// M = C_in: 128-row tiles share each B block among more multiplies, but would be mostly padding for up to 64 input
// channels (a decoder's first layers).
template <typename F>
auto with_tile(int C, int O, F&& f) {
  if (O <= 16) return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 16>{});
  if (C <= 64) return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
  return f(std::integral_constant<int, 128>{}, std::integral_constant<int, 64>{});
}

}  // namespace

int unpool_conv_grad_weight_blocks(int N, int C, int H, int W, int O, int KH, int KW, int PH, int PW) {
  const Geometry geo = make_geometry(N, C, H, W, O, KH, KW, PH, PW);
  return with_tile(C, O, [&](auto bm, auto bn) {
    const dim3 grid = grad_weight_grid<decltype(bm)::value, decltype(bn)::value>(geo, 1);
    return static_cast<int>(grid.x * grid.y);
  });
}

void unpool_conv_grad_weight(ActivationView x, ActivationView g, uintptr_t ws, int N, int C, int H, int W, int O,
                             int KH, int KW, int PH, int PW, int splits, int chunk, int dtype, int tf32,
                             uintptr_t stream) {
  check_splits("unpool_conv_grad_weight", splits, chunk);
  const Geometry geo = make_geometry(N, C, H, W, O, KH, KW, PH, PW);
  with_tile(C, O, [&](auto bm, auto bn) {
    dispatch_multiply(dtype, tf32, "unpool_conv_grad_weight", [&](auto tag, auto use_tf32) {
      using T = typename decltype(tag)::type;
      launch_grad_weight<T, decltype(use_tf32)::value, decltype(bm)::value, decltype(bn)::value, kWideStepK<T>>(
          x, g, ws, geo, splits, chunk, to_stream(stream));
    });
  });
}

}  // namespace dcign
