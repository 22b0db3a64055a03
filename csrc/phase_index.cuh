// Index arithmetic of the phase decomposition (dcign_fast/ops/phases.py; docs: shared notes
// phase-decomposition.md), host and device.
//
// Upsampling by `scale` then a K-tap convolution with padding p: output index phase + scale * i reads
// low-resolution indices i + floor((phase + u - p) / scale) for taps u < K. Taps that land on the same
// low-resolution offset are summed into one collapsed tap. Rows and columns are independent.
#pragma once

#include "hd.h"

namespace dcign {

DCIGN_HD int floor_div(int a, int b) {  // b > 0
  const int q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

DCIGN_HD int output_size(int in_size, int kernel, int padding, int scale) {
  return scale * in_size + 2 * padding - kernel + 1;
}

// Low-resolution offset that original tap u reads in this phase.
DCIGN_HD int tap_offset(int phase, int u, int padding, int scale) { return floor_div(phase + u - padding, scale); }

// Output indices of this phase: phase, phase + scale, ... below out_size.
DCIGN_HD int phase_count(int out_size, int phase, int scale) {
  return out_size > phase ? (out_size - phase + scale - 1) / scale : 0;
}

struct AxisPhase {
  int phase;
  int first_offset;  // low-resolution offset of collapsed tap 0
  int taps;          // collapsed taps
  int count;         // output indices of this phase
};

// Offsets grow with u, so the window runs from tap 0's offset to tap K-1's.
DCIGN_HD AxisPhase axis_phase(int in_size, int kernel, int padding, int scale, int phase) {
  const int first = tap_offset(phase, 0, padding, scale);
  const int last = tap_offset(phase, kernel - 1, padding, scale);
  return {phase, first, last - first + 1, phase_count(output_size(in_size, kernel, padding, scale), phase, scale)};
}

// Collapsed tap of this phase that original tap u adds into.
DCIGN_HD int collapsed_tap(const AxisPhase& ph, int u, int padding, int scale) {
  return tap_offset(ph.phase, u, padding, scale) - ph.first_offset;
}

// Both phases of one axis for scale 2 in "union tap" coordinates: union tap t is low-resolution offset
// start + t, and phase a's collapsed taps are union taps [window_start[a], window_start[a] + window_taps[a]).
// Kernels that serve both phases from one input tile loop over union taps.
struct AxisUnion {
  int start;
  int taps;
  int window_start[2];
  int window_taps[2];
};

DCIGN_HD AxisUnion axis_union(int kernel, int padding) {
  const int first0 = tap_offset(0, 0, padding, 2), last0 = tap_offset(0, kernel - 1, padding, 2);
  const int first1 = tap_offset(1, 0, padding, 2), last1 = tap_offset(1, kernel - 1, padding, 2);
  const int start = first0 < first1 ? first0 : first1;
  const int end = last0 > last1 ? last0 : last1;
  return {start, end - start + 1, {first0 - start, first1 - start}, {last0 - first0 + 1, last1 - first1 + 1}};
}

// Union tap that original tap u of phase `phase` adds into.
DCIGN_HD int union_tap(const AxisUnion& un, int phase, int u, int padding) {
  return tap_offset(phase, u, padding, 2) - un.start;
}

// First union tap and tap count of a phase's window. They select rather than index by the phase, so that a
// kernel parameter holding the struct is not copied to local memory for a run-time index.
DCIGN_HD int window_first(const AxisUnion& un, int phase) {
  return phase == 0 ? un.window_start[0] : un.window_start[1];
}

DCIGN_HD int window_count(const AxisUnion& un, int phase) { return phase == 0 ? un.window_taps[0] : un.window_taps[1]; }

DCIGN_HD bool in_window(const AxisUnion& un, int phase, int t) {
  return t >= window_first(un, phase) && t < window_first(un, phase) + window_count(un, phase);
}

}  // namespace dcign
