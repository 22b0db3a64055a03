// Per-element math of sample_latents (dcign_fast/ops/latent_sampler.py), float32, host and device.
// mu and logvar here are already clamped (an inactive column carries its batch statistic).
#pragma once
#include <cmath>

#include "hd.h"

namespace dcign {

struct SampleForward {
  float z;        // mu + exp(logvar / 2) * eps
  float kl_term;  // 1 + logvar - mu^2 - exp(logvar); kl[b] = -0.5 * the row's sum
};

DCIGN_HD SampleForward sample_forward(float mu, float logvar, float eps) {
  const float sd = expf(0.5f * logvar);
  return {mu + sd * eps, 1.0f + logvar - mu * mu - sd * sd};
}

struct SampleBackward {
  float grad_mu, grad_logvar;
};

// The true gradient of (z, kl) for an active column:
// dz/dmu = 1, dkl/dmu = mu; dz/dlogvar = exp(logvar / 2) * eps / 2, dkl/dlogvar = (exp(logvar) - 1) / 2.
DCIGN_HD SampleBackward sample_backward(float mu, float logvar, float eps, float grad_z, float grad_kl) {
  const float sd = expf(0.5f * logvar);
  return {grad_z + grad_kl * mu, 0.5f * (grad_z * sd * eps + grad_kl * (sd * sd - 1.0f))};
}

// DC-IGN's invariance pull of an inactive column toward its batch mean (not the forward's gradient).
DCIGN_HD float invariance_pull(float invariance, float value, float batch_mean) {
  return invariance * (value - batch_mean);
}

}  // namespace dcign
