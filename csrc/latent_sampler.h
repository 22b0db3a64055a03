// Launchers of the latent sampler kernels (see latent_sampler.cu). Pointers and the stream are integers;
// tensors are [B, D] with element strides (s_b, s_d); active is uint8 [D] or 0 (all active);
// means is float32 [2, D] (batch means of mu, logvar) from sampler_column_means, or 0 when not needed.
// seed_ptr, offset_ptr: 0, or device int64 values that replace seed and offset (read by the kernels).
#pragma once
#include <cstdint>

namespace dcign {

void sampler_column_means(uintptr_t mu, uintptr_t logvar, int64_t B, int64_t D, int64_t mu_sb, int64_t mu_sd,
                          int64_t lv_sb, int64_t lv_sd, uintptr_t means, int dtype, uintptr_t stream);

// clamp: 0 none, 1 inactive columns take `means`, 2 they take row 0. z [B, D] and kl [B] contiguous.
void sampler_forward(uintptr_t mu, uintptr_t logvar, uintptr_t active, uintptr_t means, uintptr_t z, uintptr_t kl,
                     int64_t B, int64_t D, int64_t mu_sb, int64_t mu_sd, int64_t lv_sb, int64_t lv_sd, int clamp,
                     uint64_t seed, uint64_t offset, uintptr_t seed_ptr, uintptr_t offset_ptr, int dtype,
                     uintptr_t stream);

// Inactive columns get invariance * (value - mean) when means is given, else zero.
// grad_mu and grad_logvar [B, D] contiguous.
void sampler_backward(uintptr_t mu, uintptr_t logvar, uintptr_t active, uintptr_t means, uintptr_t grad_z,
                      uintptr_t grad_kl, uintptr_t grad_mu, uintptr_t grad_logvar, int64_t B, int64_t D, int64_t mu_sb,
                      int64_t mu_sd, int64_t lv_sb, int64_t lv_sd, int64_t gz_sb, int64_t gz_sd, int64_t gkl_s,
                      float invariance, uint64_t seed, uint64_t offset, uintptr_t seed_ptr, uintptr_t offset_ptr,
                      int dtype, uintptr_t stream);

}  // namespace dcign
