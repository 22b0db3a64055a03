// Storage dtypes of the kernels (math is float32 whatever the storage) and the host-side dispatch
// from the integer code the Python wrappers pass.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace dcign {

// Codes shared with dcign_fast/kernels/cuda.py (DTYPE_CODES).
enum DTypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// kVec elements of T loaded or stored as one access (16 bytes for kVec = 16 / sizeof(T)). Held as 32-bit words
// where they fill whole words, so that copies are plain register moves: held as 16-bit elements, a run was
// moved half a register at a time, a byte permute each.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Packed {
  static constexpr bool kWords = sizeof(T) * kVec % 4 == 0;
  using Word = std::conditional_t<kWords, uint32_t, T>;
  Word w[kWords ? sizeof(T) * kVec / 4 : kVec];

  __device__ __forceinline__ T element(int e) const {
    T v;
    memcpy(&v, reinterpret_cast<const char*>(w) + e * sizeof(T), sizeof(T));
    return v;
  }

  __device__ __forceinline__ static Packed zeros() {
    Packed run;
    for (Word& word : run.w) {
      if constexpr (kWords) {
        word = 0u;  // all-zero bits: +0.0 in every storage type
      } else {
        word = from_float<T>(0.0f);
      }
    }
    return run;
  }
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));

// Whether p may be accessed as a Run. Always on a GPU, where a misaligned vector access faults; the CPU
// emulation checks, and fails the launch instead (the caller then skips the access).
template <typename Run>
__device__ __forceinline__ bool run_aligned(const void* p) {
#ifdef DCIGN_CPU_EMULATION
  if (reinterpret_cast<uintptr_t>(p) % alignof(Run) != 0) {
    dcign_emulation::fail(cudaErrorMisalignedAddress, "misaligned address (emulation: a vector access)");
    return false;
  }
#else
  (void)p;
#endif
  return true;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type named by `code`.
template <typename Fn>
void dispatch_dtype(int code, const char* what, Fn&& fn) {
  switch (code) {
    case kFloat32:
      return fn(TypeTag<float>{});
    case kBFloat16:
      return fn(TypeTag<__nv_bfloat16>{});
    case kFloat16:
      return fn(TypeTag<__half>{});
    default:
      throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(code));
  }
}

// Calls fn(TypeTag<T>{}, std::bool_constant<kTf32>{}) for the storage type named by `code`, kTf32 (float32
// multiplied in TF32 on tensor cores) only for float32 storage when `tf32` is set.
template <typename Fn>
void dispatch_multiply(int code, int tf32, const char* what, Fn&& fn) {
  dispatch_dtype(code, what, [&](auto tag) {
    if constexpr (std::is_same_v<typename decltype(tag)::type, float>) {
      if (tf32) return fn(tag, std::true_type{});
    }
    fn(tag, std::false_type{});
  });
}

}  // namespace dcign
