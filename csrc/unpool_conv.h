// Launchers of the unpool-conv kernels (scale factor 2; see unpool_conv_common.cuh for the design).
// Pointers and the stream are integers. Activations are [N, C, H, W] addressed through element strides
// (n, c, h, w) (channels_last keeps the channel reduction contiguous); weight [O, C, KH, KW] contiguous;
// the packed weight wp [2, 2, TR, TC, C, OP] has the activations' dtype (TR, TC: union taps, see phase_index.cuh;
// OP = packed_channels(O)).
#pragma once
#include <cstdint>

namespace dcign {

// The packed weight's output channels: O rounded up to a multiple of 8 (zeros past O), so that its rows load
// as whole 16-byte vectors whatever O is.
constexpr int kPackedChannels = 8;

inline int packed_channels(int O) { return (O + kPackedChannels - 1) / kPackedChannels * kPackedChannels; }

// The most positions one split of a grad-weight reduction may cover: the kernels walk a split's positions with
// 32-bit arithmetic (GridPositions).
constexpr int kMaxChunk = 1 << 30;

struct ActivationView {
  uintptr_t ptr;
  int64_t sn, sc, sh, sw;
};

// wp <- the four phase kernels of weight, summed in float32, stored in its dtype.
void unpool_conv_pack_weight(uintptr_t weight, uintptr_t wp, int O, int C, int KH, int KW, int PH, int PW, int dtype,
                             uintptr_t stream);

// y = unpool_conv(x) + bias (bias 0: none), ReLU when relu != 0. With tf32 != 0, float32 storage multiplies in
// TF32 on tensor cores (ignored for 16-bit storage, which always does).
void unpool_conv_forward(ActivationView x, uintptr_t wp, uintptr_t bias, ActivationView y, int N, int C, int H, int W,
                         int O, int KH, int KW, int PH, int PW, int relu, int dtype, int tf32, uintptr_t stream);

// The backward kernels read grad_out g with the fused ReLU's mask already applied (the caller's one pass).

// dx = the transposed phase convolutions of grad_out g.
void unpool_conv_grad_input(ActivationView g, uintptr_t wp, ActivationView dx, int N, int C, int H, int W, int O,
                            int KH, int KW, int PH, int PW, int dtype, int tf32, uintptr_t stream);

// Split partial sums of grad weight: ws float32 [splits, 2, 2, TR, TC, C, OP]. Each split covers `chunk` output
// positions of every phase.
void unpool_conv_grad_weight(ActivationView x, ActivationView g, uintptr_t ws, int N, int C, int H, int W, int O,
                             int KH, int KW, int PH, int PW, int splits, int chunk, int dtype, int tf32,
                             uintptr_t stream);

// The same partial sums for few output channels (an image layer), laid out alike, each split covering `chunk`
// *input* positions. Faster than the per-tap kernel while the (union tap, O) pairs fill few tiles
// (csrc/unpool_conv_grad_weight_few_outputs.cu).
void unpool_conv_grad_weight_few_outputs(ActivationView x, ActivationView g, uintptr_t ws, int N, int C, int H, int W,
                                         int O, int KH, int KW, int PH, int PW, int splits, int chunk, int dtype,
                                         int tf32, uintptr_t stream);

// Blocks per split of each grad-weight launch for this shape (its grid's x * y): the caller sizes its splits by it.
int unpool_conv_grad_weight_blocks(int N, int C, int H, int W, int O, int KH, int KW, int PH, int PW);
int unpool_conv_grad_weight_few_outputs_blocks(int N, int C, int H, int W, int O, int KH, int KW, int PH, int PW);

// dw [O, C, KH, KW] in the storage dtype from the split partial sums, in a fixed order.
void unpool_conv_finalize_grad_weight(uintptr_t ws, uintptr_t dw, int O, int C, int KH, int KW, int PH, int PW,
                                      int splits, int dtype, uintptr_t stream);

}  // namespace dcign
