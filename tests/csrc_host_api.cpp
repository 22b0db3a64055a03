// A CPU build of csrc/'s host+device headers with a C interface, compiled by test_csrc_host.py with the host
// C++ compiler and loaded through ctypes; never part of the extension.
#include <cstdint>

#include "fast_divmod.h"
#include "phase_index.cuh"
#include "philox.cuh"
#include "sampler_math.cuh"

extern "C" {

// Elements 0..count-1 of the stream (seed, offset): Philox words x0, x1 and the normal.
void dcign_philox(uint64_t seed, uint64_t offset, int64_t count, uint32_t* x0, uint32_t* x1, float* eps) {
  for (int64_t i = 0; i < count; ++i) {
    const dcign::PhiloxPair w = dcign::philox_pair(seed, offset + static_cast<uint64_t>(i));
    x0[i] = w.x0;
    x1[i] = w.x1;
    eps[i] = dcign::philox_normal(seed, offset, static_cast<uint64_t>(i));
  }
}

// The Box-Muller transform of n word pairs (the words at the ends of the range are the interesting ones).
void dcign_box_muller(int64_t n, const uint32_t* x0, const uint32_t* x1, float* eps) {
  for (int64_t i = 0; i < n; ++i) eps[i] = dcign::box_muller(x0[i], x1[i]);
}

// out = (first_offset, taps, count, collapsed tap of u for u < kernel).
void dcign_axis_phase(int in_size, int kernel, int padding, int scale, int phase, int* out) {
  const dcign::AxisPhase ph = dcign::axis_phase(in_size, kernel, padding, scale, phase);
  out[0] = ph.first_offset;
  out[1] = ph.taps;
  out[2] = ph.count;
  for (int u = 0; u < kernel; ++u) out[3 + u] = dcign::collapsed_tap(ph, u, padding, scale);
}

// out = (start, taps, window_start[0..1], window_taps[0..1], union tap of (phase a, tap u) for a < 2, u < kernel).
void dcign_axis_union(int kernel, int padding, int* out) {
  const dcign::AxisUnion un = dcign::axis_union(kernel, padding);
  int* o = out;
  *o++ = un.start;
  *o++ = un.taps;
  for (int a = 0; a < 2; ++a) *o++ = un.window_start[a];
  for (int a = 0; a < 2; ++a) *o++ = un.window_taps[a];
  for (int a = 0; a < 2; ++a) {
    for (int u = 0; u < kernel; ++u) *o++ = dcign::union_tap(un, a, u, padding);
  }
}

// Per-element sampler math over n elements.
void dcign_sampler_elements(int64_t n, const float* mu, const float* logvar, const float* eps, const float* grad_z,
                            const float* grad_kl, float* z, float* kl_term, float* grad_mu, float* grad_logvar) {
  for (int64_t i = 0; i < n; ++i) {
    const dcign::SampleForward f = dcign::sample_forward(mu[i], logvar[i], eps[i]);
    const dcign::SampleBackward b = dcign::sample_backward(mu[i], logvar[i], eps[i], grad_z[i], grad_kl[i]);
    z[i] = f.z;
    kl_term[i] = f.kl_term;
    grad_mu[i] = b.grad_mu;
    grad_logvar[i] = b.grad_logvar;
  }
}

// q[i], r[i] = n[i] / d[i], n[i] % d[i] through FastDivmod.
void dcign_fast_divmod(int64_t count, const int* d, const int* n, int* q, int* r) {
  for (int64_t i = 0; i < count; ++i) dcign::FastDivmod(d[i]).divmod(n[i], q[i], r[i]);
}

}  // extern "C"
