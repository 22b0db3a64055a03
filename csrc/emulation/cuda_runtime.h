// CPU emulation of the slice of the CUDA runtime and execution model that csrc/ uses, so that the real
// kernel sources run in CI without a GPU (dcign_fast/kernels/cuda_emulation.py builds them with g++).
//
// Each thread block runs as blockDim cooperative fibers (ucontext) on one OS thread. A fiber runs until
// it reaches __syncthreads(), a warp barrier (shuffles, __syncwarp) or its end; a barrier releases once
// every fiber of its block (warp) that has not exited has arrived, as on sm_70+. Consecutive barrier
// phases resume the fibers in alternating order (thread 0 first, then thread 255 first), so a missing
// barrier between a shared-memory write and another thread's read shows up as a wrong result. A barrier
// nobody can pass (divergent __syncthreads) is a launch failure, as is an invalid launch configuration.
// Shared memory is function-static: blocks run one after another, and one launch runs at a time. Unlike a
// GPU's, it starts zeroed and keeps the previous block's values: a read of shared memory the block never
// wrote shows up only where the stale value changes a result that the tests compare.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace dcign_emulation {

inline cudaError_t last_error = cudaSuccess;
inline std::string last_message;

constexpr size_t kStackBytes = 128 * 1024;

enum class Wait { kRunning, kBlock, kWarp, kDone };

// Words a lane publishes in one warp_exchange (ldmatrix: an address; mma: its A and B registers).
constexpr int kExchangeWords = 8;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  uint3 index;
  Wait wait = Wait::kRunning;
  uint64_t block_arrivals = 0, warp_arrivals = 0;
  uint64_t shuffle_slot = 0;
  // warp_exchange's two alternating buffers and the one this fiber's next exchange writes.
  uint32_t exchange[2][kExchangeWords] = {};
  int exchange_parity = 0;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
};

inline Block* block = nullptr;

inline size_t current_thread() { return static_cast<size_t>(block->current - block->fibers.data()); }

inline void fiber_entry() {
  (*block->body)();
  block->current->wait = Wait::kDone;  // returning switches to uc_link, the scheduler
}

inline void wait_at(Wait what) {
  Fiber* self = block->current;
  self->wait = what;
  ++(what == Wait::kBlock ? self->block_arrivals : self->warp_arrivals);
  swapcontext(&self->context, &block->scheduler);
}

// Whether fiber f may pass the barrier it waits at: every live fiber of its scope has arrived there.
inline bool released(const Fiber& f, size_t first, size_t last) {
  for (size_t i = first; i < last; ++i) {
    const Fiber& other = block->fibers[i];
    if (other.wait == Wait::kDone) continue;
    if (f.wait == Wait::kBlock ? other.block_arrivals < f.block_arrivals : other.warp_arrivals < f.warp_arrivals) {
      return false;
    }
  }
  return true;
}

inline bool runnable(size_t i) {
  const Fiber& f = block->fibers[i];
  if (f.wait == Wait::kRunning) return true;
  if (f.wait == Wait::kBlock) return released(f, 0, block->fibers.size());
  if (f.wait == Wait::kWarp) {
    const size_t first = i / 32 * 32, last = std::min(first + 32, block->fibers.size());
    return released(f, first, last);
  }
  return false;
}

// Runs one block to completion; false when its fibers deadlock.
inline bool run_block(Block& b, uint3 block_index) {
  const size_t n = b.fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.index = {static_cast<unsigned>(i % blockDim.x), static_cast<unsigned>(i / blockDim.x % blockDim.y),
               static_cast<unsigned>(i / (blockDim.x * blockDim.y))};
    f.wait = Wait::kRunning;
    f.block_arrivals = f.warp_arrivals = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  blockIdx = block_index;
  for (bool forward = true;; forward = !forward) {
    bool progressed = false, finished = true;
    for (size_t k = 0; k < n; ++k) {
      const size_t i = forward ? k : n - 1 - k;
      if (b.fibers[i].wait == Wait::kDone) continue;
      finished = false;
      if (!runnable(i)) continue;
      b.current = &b.fibers[i];
      b.fibers[i].wait = Wait::kRunning;
      threadIdx = b.fibers[i].index;
      swapcontext(&b.scheduler, &b.fibers[i].context);
      progressed = true;
    }
    if (finished) return true;
    if (!progressed) return false;
  }
}

inline void fail(cudaError_t error, std::string message) {
  if (last_error == cudaSuccess) {
    last_error = error;
    last_message = std::move(message);
  }
}

// kernel<<<grid, threads>>>(...) with the arguments bound into `body`.
inline void launch(dim3 grid, dim3 threads, const std::function<void()>& body) {
  const uint64_t per_block = static_cast<uint64_t>(threads.x) * threads.y * threads.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || per_block == 0 ||
      per_block > 1024 || threads.z > 64) {
    fail(cudaErrorInvalidConfiguration, "invalid configuration argument");
    return;
  }
  gridDim = grid;
  blockDim = threads;
  Block b;
  b.body = &body;
  b.fibers.resize(per_block);
  for (Fiber& f : b.fibers) f.stack.resize(kStackBytes);
  block = &b;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        if (!run_block(b, {x, y, z})) {
          block = nullptr;
          fail(cudaErrorLaunchFailure,
               "unspecified launch failure (emulation: threads of a block deadlocked at "
               "a barrier)");
          return;
        }
      }
    }
  }
  block = nullptr;
}

}  // namespace dcign_emulation

inline void __syncthreads() { dcign_emulation::wait_at(dcign_emulation::Wait::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) { dcign_emulation::wait_at(dcign_emulation::Wait::kWarp); }

// Every live lane of the warp exchanges through its slot between two warp barriers.
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  using namespace dcign_emulation;
  const size_t self = current_thread();
  std::memcpy(&block->fibers[self].shuffle_slot, &value, sizeof(T));
  __syncwarp();
  const size_t source = (self & ~size_t{31}) | ((self & 31) ^ static_cast<size_t>(lane_mask));
  T result = value;
  if (source < block->fibers.size()) std::memcpy(&result, &block->fibers[source].shuffle_slot, sizeof(T));
  __syncwarp();
  return result;
}

namespace dcign_emulation {

// A warp-collective exchange for the emulated warp instructions (warp_mma.h): every live lane publishes N words
// and meets the others at one warp barrier; the returned view then reads any lane's words (zeros for an exited
// lane). Two alternating buffers make one barrier enough: a lane refills a buffer only after the next
// exchange's barrier, which every lane reaches after its reads of this one.
struct WarpWords {
  size_t first;
  int parity;
  uint32_t operator()(int lane, int word) const {
    const size_t f = first + static_cast<size_t>(lane);
    const bool live = f < block->fibers.size() && block->fibers[f].wait != Wait::kDone;
    return live ? block->fibers[f].exchange[parity][word] : 0u;
  }
};

template <int N>
WarpWords warp_exchange(const uint32_t (&words)[N]) {
  static_assert(N <= kExchangeWords, "a lane publishes at most kExchangeWords words");
  const size_t self = current_thread();
  Fiber& me = block->fibers[self];
  const int parity = me.exchange_parity;
  me.exchange_parity ^= 1;
  std::memcpy(me.exchange[parity], words, sizeof words);
  __syncwarp();
  return {self & ~size_t{31}, parity};
}

}  // namespace dcign_emulation

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = dcign_emulation::last_error;
  dcign_emulation::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : dcign_emulation::last_message.c_str();
}

// The emulation is one device; runtime version 0 marks it.
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}
