// Shared by every kernel file: error checks, NVTX ranges, small math helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <stdexcept>
#include <string>

namespace lckv::cuda {

// Throws with the call site; the backend turns it into a typed error.
inline void check(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed at " + file + ":" + std::to_string(line) + ": " +
                             cudaGetErrorString(e));
  }
}
#define LCKV_CUDA_CHECK(x) ::lckv::cuda::check((x), #x, __FILE__, __LINE__)
// After every launch: catches bad configurations at once instead of at the next sync.
#define LCKV_LAUNCH_CHECK(name) ::lckv::cuda::check(cudaGetLastError(), name, __FILE__, __LINE__)

// An NVTX range for the lifetime of the object (shows in `nsys profile -t cuda,nvtx`).
struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

// Weight element types the kernels read. Activations and the KV cache are f32 (see backend).
enum class WeightType { F32 = 0, BF16 = 1, F16 = 2 };

__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }

// K (v = 0) or V (v = 1) row of position `pos` in the paged cache, for a sequence's page table.
__device__ __forceinline__ int64_t pagedOffset(const int32_t* table, int pos, int pageShift, int64_t pageFloats, int slot,
                                               int v, int kvDim) {
  const int pageTokens = 1 << pageShift;
  return (int64_t)table[pos >> pageShift] * pageFloats + ((int64_t)(slot * 2 + v) * pageTokens + (pos & (pageTokens - 1))) * kvDim;
}

__device__ __forceinline__ float warpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace lckv::cuda
