// Unpool-conv grad weight for few output channels (a decoder's image layer: 1 to 3), split partial sums in
// the layout of unpool_conv_grad_weight.cu. Per phase (A, B): M = C_in, N = (union tap, o) pairs flattened,
// K = the *input* positions (n, r, c) of split s:
//   ws[s, A, B, ty, tx, c, o] = sum over (n, r, c) in the split of
//       x[n, r, c, ch] * g[n, 2 (r - rows.start - ty) + A, 2 (c - cols.start - tx) + B, o]
// (zero where that output position is outside the phase's grid): the same sums as the per-tap kernel, but x
// is read once per phase instead of once per tap, and the multiplies do not pad 1-3 channels to a tile.
#include "cuda_check.h"
#include "unpool_conv_common.cuh"

namespace dcign {
namespace {

// (union tap, O) pairs: the GEMM's N.
DCIGN_HD int tap_output_pairs(const Geometry& g) { return g.rows.taps * g.cols.taps * g.O; }

template <typename T, bool kTf32, int BM, int BN, int BK, int kVec>
__global__ void __launch_bounds__(kTileThreads, 2)
    unpool_conv_grad_weight_few_outputs_kernel(const T* __restrict__ x, const T* __restrict__ gout,
                                               float* __restrict__ ws, Geometry g, Strides xs, Strides gs, int chunk) {
  using Mma = typename MmaFor<T, kTf32, BM, BN, BK, Runs::kAcross, Runs::kAcross>::type;
  using InputLoad = TileLoad<T, BK, BM, kVec>;  // input [k][c]: c runs along its channels
  using GradLoad = TileLoad<T, BK, BN, 1>;      // grad_out [k][(tap, o)]: a gather, element by element
  struct Staged {
    InputLoad a;
    GradLoad b;
  };
  __shared__ KLoopShared<PairTiles<Mma>, Mma> smem;
  const int pairs = tap_output_pairs(g);
  const int pair_tiles = (pairs + BN - 1) / BN;
  const int c0 = (blockIdx.x / pair_tiles) * BM, n0 = (blockIdx.x % pair_tiles) * BN;
  const int p = blockIdx.y, A = p / 2, B = p % 2, split = blockIdx.z;
  const int rows = phase_count(g.HO, A, 2), cols = phase_count(g.WO, B, 2);
  const int64_t positions = static_cast<int64_t>(g.N) * g.H * g.W;
  const int64_t begin = static_cast<int64_t>(split) * chunk;
  const int count = static_cast<int>(begin + chunk < positions ? chunk : positions - begin);  // this split's
  const GridPositions walk(begin, g.H, g.W);
  const FastDivmod by_outputs(g.O), by_col_taps(g.cols.taps);

  typename Mma::Acc acc;
  Mma::zero(acc);
  // Pair j of the tile: union tap (ty, tx) and output channel o; valid inside this phase's window.
  struct Pair {
    int ty, tx, o;
    bool valid;
  };
  auto pair = [&](int j) {
    int tap, o, ty, tx;
    by_outputs.divmod(n0 + j, tap, o);
    by_col_taps.divmod(tap, ty, tx);
    return Pair{ty, tx, o, n0 + j < pairs && in_window(g.rows, A, ty) && in_window(g.cols, B, tx)};
  };
  // Step s reduces over the input positions begin + s * BK + k, k < BK.
  struct Position {
    int n, r, c;
    bool inside;
  };
  auto position = [&](int s, int k) {
    Position at;
    at.inside = s * BK + k < count;
    walk.at(s * BK + k, at.n, at.r, at.c);
    return at;
  };
  // Every run's position changes with the step, and its pair's tap with the run: offsets are computed whole on
  // each step, from the run's coordinates.
  RunCoords a_runs[InputLoad::kPerThread], b_runs[GradLoad::kPerThread];
  InputLoad::prepare(a_runs, run_coords);
  GradLoad::prepare(b_runs, run_coords);
  auto fetch = [&](int s, Staged& staged) {
    // A[k][c] = x[n, r, c_, c0 + c].
    staged.a.fetch(a_runs, run_coords, [&](const RunCoords& run) {
      const Position at = position(s, run.outer);
      const int ch = c0 + run.inner;
      const bool inside = at.inside && ch < g.C;
      return RunAt<T>{x + (inside ? at.n * xs.n + at.r * xs.h + at.c * xs.w + ch * xs.c : 0), inside};
    });
    // B[k][j] = g[n, 2 io + A, 2 jo + B, o] with io = r - rows.start - ty, jo = c - cols.start - tx.
    staged.b.fetch(b_runs, run_coords, [&](const RunCoords& run) {
      const Position at = position(s, run.outer);
      const Pair pr = pair(run.inner);
      const int io = at.r - g.rows.start - pr.ty, jo = at.c - g.cols.start - pr.tx;
      const bool inside = at.inside && pr.valid && in_range(io, rows) && in_range(jo, cols);
      const int64_t offset = at.n * gs.n + (2 * io + A) * gs.h + (2 * jo + B) * gs.w + pr.o * gs.c;
      return RunAt<T>{gout + (inside ? offset : 0), inside};
    });
  };
  auto stash = [&](int, const Staged& staged, int buf) {
    staged.a.stash([&](int k, int c, const auto& run) { put_run<false>(smem.tiles.a[buf], k, c, run); });
    staged.b.stash([&](int k, int j, const auto& run) { put_run<false>(smem.tiles.b[buf], k, j, run); });
  };
  auto multiply = [&](int, int buf) { Mma::multiply(acc, smem.tiles.a[buf], smem.tiles.b[buf]); };
  pipelined_k_loop<Staged, InputLoad::kHeld && GradLoad::kHeld>((count + BK - 1) / BK, fetch, stash, multiply);

  float* out = ws + (static_cast<int64_t>(split) * 4 + p) * packed_phase_size(g);
  Mma::for_each(acc, smem.scratch, [&](int m, int n, float value) {
    const int ch = c0 + m;
    const Pair pr = pair(n);
    if (ch < g.C && pr.valid) out[packed_offset(g, pr.ty, pr.tx, ch, pr.o)] = value;
  });
}

// Calls f(BM, BN) with the kernel's (C_in, pair) tile for `pairs` (union tap, O) pairs, as integral constants.
template <typename F>
auto with_tile(int pairs, F&& f) {
  if (pairs <= 16) return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
}

template <int BM, int BN>
dim3 few_outputs_grid(const Geometry& g, int splits) {
  return dim3(ceil_div(g.C, BM) * ceil_div(tap_output_pairs(g), BN), 4, splits);
}

template <typename T, bool kTf32, int BM, int BN, int BK>
void launch(const ActivationView& x, const ActivationView& gout, uintptr_t ws, const Geometry& g, int splits, int chunk,
            cudaStream_t stream) {
  const dim3 grid = few_outputs_grid<BM, BN>(g, splits);
  dispatch_vector<T>({{&x, g.C}}, [&](auto vec) {
    launch_kernel("unpool_conv_grad_weight_few_outputs_kernel", grid, kTileThreads, stream,
                  unpool_conv_grad_weight_few_outputs_kernel<T, kTf32, BM, BN, BK, decltype(vec)::value>,
                  reinterpret_cast<const T*>(x.ptr), reinterpret_cast<const T*>(gout.ptr), reinterpret_cast<float*>(ws),
                  g, strides_of(x), strides_of(gout), chunk);
  });
}

}  // namespace

int unpool_conv_grad_weight_few_outputs_blocks(int N, int C, int H, int W, int O, int KH, int KW, int PH, int PW) {
  const Geometry geo = make_geometry(N, C, H, W, O, KH, KW, PH, PW);
  return with_tile(tap_output_pairs(geo), [&](auto bm, auto bn) {
    const dim3 grid = few_outputs_grid<decltype(bm)::value, decltype(bn)::value>(geo, 1);
    return static_cast<int>(grid.x * grid.y);
  });
}

void unpool_conv_grad_weight_few_outputs(ActivationView x, ActivationView g, uintptr_t ws, int N, int C, int H, int W,
                                         int O, int KH, int KW, int PH, int PW, int splits, int chunk, int dtype,
                                         int tf32, uintptr_t stream) {
  check_splits("unpool_conv_grad_weight_few_outputs", splits, chunk);
  const Geometry geo = make_geometry(N, C, H, W, O, KH, KW, PH, PW);
  with_tile(tap_output_pairs(geo), [&](auto bm, auto bn) {
    dispatch_multiply(dtype, tf32, "unpool_conv_grad_weight_few_outputs", [&](auto tag, auto use_tf32) {
      using T = typename decltype(tag)::type;
      launch<T, decltype(use_tf32)::value, decltype(bm)::value, decltype(bn)::value, kWideStepK<T>>(
          x, g, ws, geo, splits, chunk, to_stream(stream));
    });
  });
}

}  // namespace dcign
