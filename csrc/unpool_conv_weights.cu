// Weight transforms of unpool-conv: collapse the K x K kernel into the four packed phase kernels
// (forward), and the transpose of that collapse applied to the grad-weight partial sums (backward).
#include "cuda_check.h"
#include "unpool_conv_common.cuh"

namespace dcign {
namespace {

constexpr int kThreads = 256;

// wp[p, ty, tx, c, o] = sum of weight[o, c, u, v] over the taps u (v) that phase p's row (column) maps to
// union tap ty (tx), summed in float32 and stored in the weight's dtype (what the multiply reads: tensor
// cores take 16-bit operands); zero outside the phase's window and for the padding channels o >= O.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pack_weight_kernel(const T* __restrict__ weight, T* __restrict__ wp, Geometry g, int KH, int KW, int PH, int PW) {
  const int64_t total = 4 * packed_phase_size(g);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int o = static_cast<int>(idx % g.OP);
    const int c = static_cast<int>(idx / g.OP % g.C);
    const int64_t rest = idx / (static_cast<int64_t>(g.OP) * g.C);
    const int tx = static_cast<int>(rest % g.cols.taps), ty = static_cast<int>(rest / g.cols.taps % g.rows.taps);
    const int p = static_cast<int>(rest / (g.cols.taps * g.rows.taps));
    const T* w = weight + (static_cast<int64_t>(o) * g.C + c) * KH * KW;
    float sum = 0.0f;
    for (int u = 0; u < KH && o < g.O; ++u) {  // padding channels o >= O stay zero
      if (union_tap(g.rows, p / 2, u, PH) != ty) continue;
      for (int v = 0; v < KW; ++v) {
        if (union_tap(g.cols, p % 2, v, PW) == tx) sum += to_float(w[u * KW + v]);
      }
    }
    wp[idx] = from_float<T>(sum);
  }
}

// dw[o, c, u, v] = sum over splits s and phases (A, B) of ws[s, A, B, tap of u, tap of v, c, o]. Fixed order:
// deterministic.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_grad_weight_kernel(const float* __restrict__ ws, T* __restrict__ dw, Geometry g, int KH, int KW, int PH,
                                int PW, int splits) {
  const int64_t total = static_cast<int64_t>(g.O) * g.C * KH * KW;
  const int64_t phase_size = packed_phase_size(g);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int v = static_cast<int>(idx % KW), u = static_cast<int>(idx / KW % KH);
    const int c = static_cast<int>(idx / (KW * KH) % g.C),
              o = static_cast<int>(idx / (static_cast<int64_t>(KW) * KH * g.C));
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) {
      for (int p = 0; p < 4; ++p) {
        const int ty = union_tap(g.rows, p / 2, u, PH), tx = union_tap(g.cols, p % 2, v, PW);
        sum += ws[(static_cast<int64_t>(s) * 4 + p) * phase_size + packed_offset(g, ty, tx, c, o)];
      }
    }
    dw[idx] = from_float<T>(sum);
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

}  // namespace

void unpool_conv_pack_weight(uintptr_t weight, uintptr_t wp, int O, int C, int KH, int KW, int PH, int PW, int dtype,
                             uintptr_t stream) {
  // Only the channel counts and the taps matter here; the spatial sizes are placeholders.
  const Geometry g = make_geometry(1, C, 1, 1, O, KH, KW, PH, PW);
  dispatch_dtype(dtype, "unpool_conv_pack_weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_kernel("pack_weight_kernel", grid_for(4 * packed_phase_size(g)), kThreads, to_stream(stream),
                  pack_weight_kernel<T>, reinterpret_cast<const T*>(weight), reinterpret_cast<T*>(wp), g, KH, KW, PH,
                  PW);
  });
}

void unpool_conv_finalize_grad_weight(uintptr_t ws, uintptr_t dw, int O, int C, int KH, int KW, int PH, int PW,
                                      int splits, int dtype, uintptr_t stream) {
  const Geometry g = make_geometry(1, C, 1, 1, O, KH, KW, PH, PW);
  const int64_t total = static_cast<int64_t>(O) * C * KH * KW;
  dispatch_dtype(dtype, "unpool_conv_finalize_grad_weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_kernel("finalize_grad_weight_kernel", grid_for(total), kThreads, to_stream(stream),
                  finalize_grad_weight_kernel<T>, reinterpret_cast<const float*>(ws), reinterpret_cast<T*>(dw), g, KH,
                  KW, PH, PW, splits);
  });
}

}  // namespace dcign
