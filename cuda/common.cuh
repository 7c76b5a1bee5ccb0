// Shared by every kernel file: error checks, NVTX ranges, small math helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "engine/kv_format.h"
#include "kernels.h"

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

// ---- programmatic dependent launch (sm_90 and later) ----------------------------------------
// A decode step is ~180 small kernels. Launched plainly, each pays its launch and its ramp-up
// after the previous one has drained. launchKernel lets a kernel start while the one before it
// in the stream finishes: everything after waitForPrecedingKernels() sees the preceding
// kernel's writes, as after a plain launch, and anything before it may only read memory that
// no kernel writes (weights). Every kernel in cuda/ calls it as its first statement, then lets
// the next kernel launch: one kernel of look-ahead, never more. (Loading a GEMV's first weights
// before the wait was tried on an H100: 3% faster at batch 1, but the registers that held them
// across the wait made the 16-row GEMV about 20% slower.)
__device__ __forceinline__ void waitForPrecedingKernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Set once by the CUDA backend: on for sm_90+ unless LCKV_PDL=0 (then launches are plain).
inline bool& programmaticLaunchEnabled() {
  static bool enabled = false;
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch when it
// is enabled. The caller checks the launch (LCKV_LAUNCH_CHECK) as after <<<>>>.
template <typename... Params, typename... Args>
void launchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute overlap;
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = programmaticLaunchEnabled() ? 1 : 0;
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);  // reported by LCKV_LAUNCH_CHECK
}

// Weight element types the kernels read. Activations are f32; the K/V cache has its own types (kv_format.h).
enum class WeightType { F32 = 0, BF16 = 1, F16 = 2 };

__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }
// Two 16-bit weights as one 32-bit word (Pair<W>::type), and their conversion to floats: lets
// one vector loader serve bf16 and f16.
template <typename W>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};
template <>
struct Pair<__half> {
  using type = __half2;
};
__device__ __forceinline__ float2 toFloat2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ __forceinline__ float2 toFloat2(__half2 x) { return __half22float2(x); }

// Byte offset in the pool of the K (v = 0) or V (v = 1) codes of position `pos`, for a
// sequence's page table (the layout in kernels.h's PagedKv).
__device__ __forceinline__ int64_t kvCodeOffset(const PagedKv& kv, const int32_t* table, int pos, int v) {
  const int pageTokens = 1 << kv.pageShift;
  return (int64_t)table[pos >> kv.pageShift] * kv.pageBytes + kv.slotOffset +
         (int64_t)(v * pageTokens + (pos & (pageTokens - 1))) * kv.rowBytes;
}
// Byte offset of the (K, V) scale word of K/V head `kvh` at `pos`.
__device__ __forceinline__ int64_t kvScaleOffset(const PagedKv& kv, const int32_t* table, int pos, int kvh) {
  const int pageTokens = 1 << kv.pageShift;
  return (int64_t)table[pos >> kv.pageShift] * kv.pageBytes + kv.slotOffset + (int64_t)2 * pageTokens * kv.rowBytes +
         ((int64_t)(pos & (pageTokens - 1)) * kv.kvHeads + kvh) * 4;
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
