// Unpool-conv grad input: dx[n, i, j, c] = sum over phases (A, B), their taps (ty, tx) and C_out of
// g[n, 2 io + A, 2 jo + B, o] * wp[A, B, ty, tx, c, o], with io = i - (row start + ty), jo likewise
// (design: unpool_conv_common.cuh).
#include "cuda_check.h"
#include "unpool_conv_common.cuh"

namespace dcign {
namespace {

template <typename T, bool kTf32, int BM, int BN, int kVec>
__global__ void __launch_bounds__(kTileThreads, 1)
    unpool_conv_grad_input_kernel(const T* __restrict__ gout, const T* __restrict__ yout, const T* __restrict__ wp,
                                  T* __restrict__ dx, Geometry g, Strides gs, Strides xs) {
  using Mma = typename MmaFor<T, kTf32, BM, BN>::type;
  struct Staged {
    GradTileLoad<T, BM, kTileK, kVec> a;   // grad_out [m][k]: k runs along its channels
    TileLoad<T, BN, kTileK, kVecOf<T>> b;  // packed weight [n][k]: k runs along the padded channels
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
  // (s % chunks) * kTileK.
  const int64_t phase_size = packed_phase_size(g);
  const int chunks = (g.O + kTileK - 1) / kTileK;
  auto fetch = [&](int s, Staged& staged) {
    const auto [p, ty, tx] = phase_tap(g, s / chunks);
    const int A = p / 2, B = p % 2, o0 = s % chunks * kTileK;
    const int rows = phase_count(g.HO, A, 2), cols = phase_count(g.WO, B, 2);
    const int dr = g.rows.start + ty, dc = g.cols.start + tx;
    // A[m][k] = g[n, 2 io + A, 2 jo + B, o0 + k].
    staged.a.fetch(gout, yout, [&](int m, int k) -> int64_t {
      const int io = pos_i[m] - dr, jo = pos_j[m] - dc, o = o0 + k;
      const bool inside = io >= 0 && io < rows && jo >= 0 && jo < cols && o < g.O;
      return inside ? pos_n[m] * gs.n + (2 * io + A) * gs.h + (2 * jo + B) * gs.w + o * gs.c : kNoRun;
    });
    // B[k][n] = wp[p, ty, tx, c0 + n, o0 + k].
    staged.b.fetch(wp, [&](int n, int k) -> int64_t {
      const int ch = c0 + n, o = o0 + k;
      return ch < g.C && o < g.OP ? p * phase_size + packed_offset(g, ty, tx, ch, o) : kNoRun;
    });
  };
  auto stash = [&](int, const Staged& staged, int buf) {
    staged.a.stash(yout != nullptr,
                   [&](int m, int k, const auto& run) { put_run<true>(smem.tiles.a[buf], k, m, run); });
    staged.b.stash([&](int n, int k, const auto& run) { put_run<true>(smem.tiles.b[buf], k, n, run); });
  };
  auto multiply = [&](int, int buf) { Mma::multiply(acc, smem.tiles.a[buf], smem.tiles.b[buf]); };
  pipelined_k_loop<Staged>(all_phase_taps(g) * chunks, fetch, stash, multiply);

  Mma::for_each(acc, smem.scratch, [&](int m, int n, float value) {
    const int ch = c0 + n;
    if (pos_i[m] == kOutside || ch >= g.C) return;
    dx[pos_n[m] * xs.n + pos_i[m] * xs.h + pos_j[m] * xs.w + ch * xs.c] = from_float<T>(value);
  });
}

template <typename T, bool kTf32, int BM, int BN>
void launch_grad_input(const ActivationView& gout, uintptr_t yout, uintptr_t wp, const ActivationView& dx,
                       const Geometry& g, cudaStream_t stream) {
  const dim3 grid(ceil_div(static_cast<int64_t>(g.N) * g.H * g.W, BM), ceil_div(g.C, BN));
  const ActivationView y = output_view(gout, yout);
  dispatch_vector<T>({{&gout, g.O}, {&y, g.O}}, [&](auto vec) {
    launch_kernel("unpool_conv_grad_input_kernel", grid, kTileThreads, stream,
                  unpool_conv_grad_input_kernel<T, kTf32, BM, BN, decltype(vec)::value>,
                  reinterpret_cast<const T*>(gout.ptr), reinterpret_cast<const T*>(yout),
                  reinterpret_cast<const T*>(wp), reinterpret_cast<T*>(dx.ptr), g, strides_of(gout), strides_of(dx));
  });
}

}  // namespace

void unpool_conv_grad_input(ActivationView g, uintptr_t y, uintptr_t wp, ActivationView dx, int N, int C, int H, int W,
                            int O, int KH, int KW, int PH, int PW, int dtype, int tf32, uintptr_t stream) {
  const Geometry geo = make_geometry(N, C, H, W, O, KH, KW, PH, PW);
  dispatch_multiply(dtype, tf32, "unpool_conv_grad_input", [&](auto tag, auto use_tf32) {
    using T = typename decltype(tag)::type;
    constexpr bool kTf32 = decltype(use_tf32)::value;
    if (C <= 16) {
      launch_grad_input<T, kTf32, 256, 16>(g, y, wp, dx, geo, to_stream(stream));
    } else {
      launch_grad_input<T, kTf32, 64, 64>(g, y, wp, dx, geo, to_stream(stream));
    }
  });
}

}  // namespace dcign
