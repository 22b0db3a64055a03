// Latent sampler kernels: float32 math on float32/bfloat16/float16 storage.
//
// forward    one warp per row (warps grid-stride over the rows): lanes stride over the columns, each
//            element draws its eps (philox_normal at index b * D + j), writes z and adds its KL term; the
//            warp's shuffle reduction gives kl[b] directly, so the result is deterministic and needs no
//            second pass.
// backward   elementwise, grid-stride; eps regenerated, never stored.
// column_means  batch means of mu and logvar per column (lanes = columns, blocks grid-stride over
//            32-column slabs, warps stride over rows, a fixed-order reduction in shared memory);
//            launched only when clamp="mean" has inactive columns (forward) or the invariance pull is on
//            (backward).
// Grids stop at kMaxBlocks and the kernels loop over the rest, so no batch or width is too large. The
// emulation build stops them at a few blocks, so that its tests run those loops.
#include <cstdint>

#include "cuda_check.h"
#include "dtype.cuh"
#include "latent_sampler.h"
#include "philox.cuh"
#include "sampler_math.cuh"

namespace dcign {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
#ifdef DCIGN_CPU_EMULATION
constexpr int kMaxBlocks = 3;
#else
constexpr int kMaxBlocks = 65535;
#endif

enum Clamp : int { kNoClamp = 0, kClampMean = 1, kClampFirst = 2 };

template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_means_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, int64_t B, int64_t D, int64_t mu_sb,
                        int64_t mu_sd, int64_t lv_sb, int64_t lv_sd, float* __restrict__ means) {
  __shared__ float partial[2][kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Every thread runs every slab's iteration (j >= D only skips the loads), so the barriers stay uniform.
  for (int64_t slab = blockIdx.x; slab * 32 < D; slab += gridDim.x) {
    const int64_t j = slab * 32 + lane;
    float sum_mu = 0.0f, sum_lv = 0.0f;
    if (j < D) {
      for (int64_t b = warp; b < B; b += kWarps) {
        sum_mu += to_float(mu[b * mu_sb + j * mu_sd]);
        sum_lv += to_float(logvar[b * lv_sb + j * lv_sd]);
      }
    }
    partial[0][warp][lane] = sum_mu;
    partial[1][warp][lane] = sum_lv;
    __syncthreads();
    if (warp < 2 && j < D) {  // warp 0 finishes mu, warp 1 logvar
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += partial[warp][w][lane];
      means[warp * D + j] = total / static_cast<float>(B);
    }
    __syncthreads();  // the next slab overwrites partial
  }
}

template <typename T>
__device__ __forceinline__ float clamped(const T* p, int64_t b, int64_t j, int64_t sb, int64_t sd, bool inactive,
                                         int clamp, const float* means_row, int64_t jm) {
  if (inactive) return clamp == kClampMean ? means_row[jm] : to_float(p[j * sd]);  // mean, or row 0
  return to_float(p[b * sb + j * sd]);
}

template <typename T, int CLAMP>
__global__ void __launch_bounds__(kThreads)
    sampler_forward_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, const uint8_t* __restrict__ active,
                           const float* __restrict__ means, T* __restrict__ z, T* __restrict__ kl, int64_t B, int64_t D,
                           int64_t mu_sb, int64_t mu_sd, int64_t lv_sb, int64_t lv_sd, PhiloxStart start) {
  const PhiloxStart rng = start.resolved();
  const int lane = threadIdx.x % 32;
  // A whole warp takes each row (b is uniform across its lanes), so the shuffles below see every lane.
  for (int64_t b = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32; b < B;
       b += static_cast<int64_t>(gridDim.x) * kWarps) {
    float terms = 0.0f;
    for (int64_t j = lane; j < D; j += 32) {
      const bool inactive = CLAMP != kNoClamp && active[j] == 0;
      const float m = clamped(mu, b, j, mu_sb, mu_sd, inactive, CLAMP, means, j);
      const float lv = clamped(logvar, b, j, lv_sb, lv_sd, inactive, CLAMP, means + D, j);
      const SampleForward f =
          sample_forward(m, lv, philox_normal(rng.seed, rng.offset, static_cast<uint64_t>(b * D + j)));
      z[b * D + j] = from_float<T>(f.z);
      terms += f.kl_term;
    }
    for (int delta = 16; delta > 0; delta /= 2) terms += __shfl_xor_sync(0xffffffffu, terms, delta);
    if (lane == 0) kl[b] = from_float<T>(-0.5f * terms);
  }
}

// MASK: inactive columns get the pull (means given) or zero.
template <typename T, bool MASK>
__global__ void __launch_bounds__(kThreads)
    sampler_backward_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, const uint8_t* __restrict__ active,
                            const float* __restrict__ means, const T* __restrict__ grad_z,
                            const T* __restrict__ grad_kl, T* __restrict__ grad_mu, T* __restrict__ grad_logvar,
                            int64_t B, int64_t D, int64_t mu_sb, int64_t mu_sd, int64_t lv_sb, int64_t lv_sd,
                            int64_t gz_sb, int64_t gz_sd, int64_t gkl_s, float invariance, PhiloxStart start) {
  const PhiloxStart rng = start.resolved();
  const int64_t total = B * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = i / D, j = i - b * D;
    const float m = to_float(mu[b * mu_sb + j * mu_sd]);
    const float lv = to_float(logvar[b * lv_sb + j * lv_sd]);
    if (MASK && active[j] == 0) {
      const bool pull = means != nullptr;
      grad_mu[i] = from_float<T>(pull ? invariance_pull(invariance, m, means[j]) : 0.0f);
      grad_logvar[i] = from_float<T>(pull ? invariance_pull(invariance, lv, means[D + j]) : 0.0f);
      continue;
    }
    const float gz = to_float(grad_z[b * gz_sb + j * gz_sd]);
    const float gkl = to_float(grad_kl[b * gkl_s]);
    const SampleBackward g =
        sample_backward(m, lv, philox_normal(rng.seed, rng.offset, static_cast<uint64_t>(i)), gz, gkl);
    grad_mu[i] = from_float<T>(g.grad_mu);
    grad_logvar[i] = from_float<T>(g.grad_logvar);
  }
}

unsigned blocks_for(int64_t work_items, int64_t per_block) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

PhiloxStart philox_start(uint64_t seed, uint64_t offset, uintptr_t seed_ptr, uintptr_t offset_ptr) {
  return {seed, offset, reinterpret_cast<const int64_t*>(seed_ptr), reinterpret_cast<const int64_t*>(offset_ptr)};
}

}  // namespace

void sampler_column_means(uintptr_t mu, uintptr_t logvar, int64_t B, int64_t D, int64_t mu_sb, int64_t mu_sd,
                          int64_t lv_sb, int64_t lv_sd, uintptr_t means, int dtype, uintptr_t stream) {
  dispatch_dtype(dtype, "sampler_column_means", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_kernel("column_means_kernel", blocks_for(D, 32), kThreads, as_stream(stream), column_means_kernel<T>,
                  reinterpret_cast<const T*>(mu), reinterpret_cast<const T*>(logvar), B, D, mu_sb, mu_sd, lv_sb, lv_sd,
                  reinterpret_cast<float*>(means));
  });
}

void sampler_forward(uintptr_t mu, uintptr_t logvar, uintptr_t active, uintptr_t means, uintptr_t z, uintptr_t kl,
                     int64_t B, int64_t D, int64_t mu_sb, int64_t mu_sd, int64_t lv_sb, int64_t lv_sd, int clamp,
                     uint64_t seed, uint64_t offset, uintptr_t seed_ptr, uintptr_t offset_ptr, int dtype,
                     uintptr_t stream) {
  if (clamp < kNoClamp || clamp > kClampFirst) throw std::invalid_argument("sampler_forward: clamp must be 0, 1 or 2");
  dispatch_dtype(dtype, "sampler_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = clamp == kClampMean    ? sampler_forward_kernel<T, kClampMean>
                  : clamp == kClampFirst ? sampler_forward_kernel<T, kClampFirst>
                                         : sampler_forward_kernel<T, kNoClamp>;
    launch_kernel("sampler_forward_kernel", blocks_for(B, kWarps), kThreads, as_stream(stream), kernel,
                  reinterpret_cast<const T*>(mu), reinterpret_cast<const T*>(logvar),
                  reinterpret_cast<const uint8_t*>(active), reinterpret_cast<const float*>(means),
                  reinterpret_cast<T*>(z), reinterpret_cast<T*>(kl), B, D, mu_sb, mu_sd, lv_sb, lv_sd,
                  philox_start(seed, offset, seed_ptr, offset_ptr));
  });
}

void sampler_backward(uintptr_t mu, uintptr_t logvar, uintptr_t active, uintptr_t means, uintptr_t grad_z,
                      uintptr_t grad_kl, uintptr_t grad_mu, uintptr_t grad_logvar, int64_t B, int64_t D, int64_t mu_sb,
                      int64_t mu_sd, int64_t lv_sb, int64_t lv_sd, int64_t gz_sb, int64_t gz_sd, int64_t gkl_s,
                      float invariance, uint64_t seed, uint64_t offset, uintptr_t seed_ptr, uintptr_t offset_ptr,
                      int dtype, uintptr_t stream) {
  dispatch_dtype(dtype, "sampler_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = active != 0 ? sampler_backward_kernel<T, true> : sampler_backward_kernel<T, false>;
    launch_kernel("sampler_backward_kernel", blocks_for(B * D, kThreads), kThreads, as_stream(stream), kernel,
                  reinterpret_cast<const T*>(mu), reinterpret_cast<const T*>(logvar),
                  reinterpret_cast<const uint8_t*>(active), reinterpret_cast<const float*>(means),
                  reinterpret_cast<const T*>(grad_z), reinterpret_cast<const T*>(grad_kl),
                  reinterpret_cast<T*>(grad_mu), reinterpret_cast<T*>(grad_logvar), B, D, mu_sb, mu_sd, lv_sb, lv_sd,
                  gz_sb, gz_sd, gkl_s, invariance, philox_start(seed, offset, seed_ptr, offset_ptr));
  });
}

}  // namespace dcign
