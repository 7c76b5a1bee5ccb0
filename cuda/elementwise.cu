// Embedding lookup, residual add, activations, dtype conversion and bias: one pass each over
// memory, grid-stride loops.
#include <type_traits>
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kThreads = 256;
int blocksFor(int64_t count) { return (int)std::min<int64_t>((count + kThreads - 1) / kThreads, 65535 * 8); }

template <typename W>
__global__ void embedKernel(const int32_t* tokens, const int32_t* positions, int n, const W* table, const W* posTable,
                            int E, float* out) {
  waitForPrecedingKernels();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)n * E; i += (int64_t)gridDim.x * blockDim.x) {
    const int r = (int)(i / E), j = (int)(i % E);
    float v = toFloat(table[(int64_t)tokens[r] * E + j]);
    if (posTable) v += toFloat(posTable[(int64_t)positions[r] * E + j]);
    out[i] = v;
  }
}

__global__ void addKernel(float* x, const float* y, int64_t count) {
  waitForPrecedingKernels();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) x[i] += y[i];
}

__global__ void swigluKernel(const float* gate, const float* up, int64_t count, float* out) {
  waitForPrecedingKernels();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = gate[i];
    out[i] = (g / (1.0f + expf(-g))) * up[i];
  }
}

// silu(g) * u exactly as swigluKernel computes it, so that the large-batch path's fused bias,
// activation and bf16 output change no f32 result. Rows are the grid's y (no division per
// element, which a flat index needs to find its row); kVec columns a thread step, as 16-byte
// loads where the launcher found the rows aligned for them.
template <typename W, typename O, int kVec>
__global__ void swigluRowsKernel(const float* gate, const float* up, int64_t stride, int n, int I, const W* gateBias,
                                 const W* upBias, O* out) {
  waitForPrecedingKernels();
  for (int r = blockIdx.y; r < n; r += gridDim.y) {
    const float* gr = gate + (int64_t)r * stride;
    const float* ur = up + (int64_t)r * stride;
    O* orow = out + (int64_t)r * I;
    for (int c = kVec * (blockIdx.x * blockDim.x + threadIdx.x); c < I; c += kVec * gridDim.x * blockDim.x) {
      float g[kVec], u[kVec], y[kVec];
      if constexpr (kVec == 4) {
        const float4 a = *reinterpret_cast<const float4*>(gr + c), b = *reinterpret_cast<const float4*>(ur + c);
        g[0] = a.x, g[1] = a.y, g[2] = a.z, g[3] = a.w;
        u[0] = b.x, u[1] = b.y, u[2] = b.z, u[3] = b.w;
      } else {
        g[0] = gr[c], u[0] = ur[c];
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (gateBias) g[k] += toFloat(gateBias[c + k]);
        if (upBias) u[k] += toFloat(upBias[c + k]);
        y[k] = (g[k] / (1.0f + expf(-g[k]))) * u[k];
      }
      if constexpr (kVec == 1) {
        if constexpr (std::is_same_v<O, float>) orow[c] = y[0];
        else orow[c] = __float2bfloat16(y[0]);
      } else if constexpr (std::is_same_v<O, float>) {
        *reinterpret_cast<float4*>(orow + c) = make_float4(y[0], y[1], y[2], y[3]);
      } else {
        // Two pairs rounded to nearest even, as __float2bfloat16 rounds each.
        const __nv_bfloat162 lo = __floats2bfloat162_rn(y[0], y[1]), hi = __floats2bfloat162_rn(y[2], y[3]);
        uint2 v;
        v.x = *reinterpret_cast<const uint32_t*>(&lo);
        v.y = *reinterpret_cast<const uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(orow + c) = v;
      }
    }
  }
}

template <typename W, typename O>
void launchSwigluRowsOut(const float* gate, const float* up, int64_t stride, int n, int I, const W* gateBias,
                         const W* upBias, O* out, cudaStream_t stream) {
  // 16-byte loads of gate and up, and 16- (f32) or 8-byte (bf16) stores, when every row starts aligned.
  const bool vec4 = I % 4 == 0 && stride % 4 == 0 && ((uintptr_t)gate | (uintptr_t)up) % 16 == 0 && (uintptr_t)out % (4 * sizeof(O)) == 0;
  const int kVec = vec4 ? 4 : 1;
  const dim3 grid((unsigned)std::min<int64_t>((I / kVec + kThreads - 1) / kThreads, 65535), (unsigned)std::min(n, 65535));
  if (vec4) launchKernel(swigluRowsKernel<W, O, 4>, grid, kThreads, 0, stream, gate, up, stride, n, I, gateBias, upBias, out);
  else launchKernel(swigluRowsKernel<W, O, 1>, grid, kThreads, 0, stream, gate, up, stride, n, I, gateBias, upBias, out);
}

template <typename W>
void launchSwigluRowsTyped(const float* gate, const float* up, int64_t stride, int n, int I, const W* gateBias,
                           const W* upBias, void* out, bool outBf16, cudaStream_t stream) {
  if (outBf16) launchSwigluRowsOut(gate, up, stride, n, I, gateBias, upBias, (__nv_bfloat16*)out, stream);
  else launchSwigluRowsOut(gate, up, stride, n, I, gateBias, upBias, (float*)out, stream);
}

__global__ void geluTanhKernel(float* x, int64_t count) {
  waitForPrecedingKernels();
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
  }
}

__global__ void toBf16Kernel(const float* x, int64_t count, __nv_bfloat16* y) {
  waitForPrecedingKernels();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}

template <typename W>
__global__ void addBiasKernel(float* out, int n, int O, const W* bias) {
  waitForPrecedingKernels();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)n * O; i += (int64_t)gridDim.x * blockDim.x)
    out[i] += toFloat(bias[i % O]);
}

// The targets of one split, by value (a kernel parameter).
struct SplitColumns {
  float* out[kGemvMaxTargets];
  int first[kGemvMaxTargets + 1];  // each target's first column, then the end
};
// Rows are the grid's y (no division per element to find its row); kVec columns a thread step,
// as 16-byte loads and stores where the launcher found every target's columns and rows aligned
// for them (so that kVec columns never straddle two targets).
template <int kVec>
__global__ void splitColumnsKernel(const float* __restrict__ src, int n, int cols, SplitColumns t, int count) {
  waitForPrecedingKernels();
  for (int r = blockIdx.y; r < n; r += gridDim.y) {
    for (int c = kVec * (blockIdx.x * blockDim.x + threadIdx.x); c < cols; c += kVec * gridDim.x * blockDim.x) {
      float v[kVec];
      if constexpr (kVec == 4) {
        const float4 a = *reinterpret_cast<const float4*>(src + (int64_t)r * cols + c);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      } else {
        v[0] = src[(int64_t)r * cols + c];
      }
      // The target of column c, found with constant indices only (a dynamic index into a kernel
      // parameter's array would copy it to local memory).
#pragma unroll
      for (int i = 0; i < kGemvMaxTargets; ++i)
        if (i < count && c >= t.first[i] && c < t.first[i + 1]) {
          const int w = t.first[i + 1] - t.first[i];
          float* o = t.out[i] + (int64_t)r * w + (c - t.first[i]);
          if constexpr (kVec == 4) *reinterpret_cast<float4*>(o) = make_float4(v[0], v[1], v[2], v[3]);
          else *o = v[0];
        }
    }
  }
}

}  // namespace

bool programmaticLaunchSupported() {
  // The code loaded for the current device must come from sm_90+ PTX: code JIT-compiled from
  // older PTX (a build for sm_80 only, say) has no griddepcontrol.wait in its kernels.
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, addKernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.ptxVersion >= 90 && a.binaryVersion >= 90;
}

void enableProgrammaticLaunch(bool enabled) {
  // One setting for the process: on only while every backend made so far can use it.
  static bool decided = false;
  programmaticLaunchEnabled() = decided ? programmaticLaunchEnabled() && enabled : enabled;
  decided = true;
}

void launchEmbed(const int32_t* tokens, const int32_t* positions, int n, const void* table, const void* posTable,
                 int wtype, int E, float* out, cudaStream_t stream) {
  NvtxRange r("embed");
  if (n <= 0 || E <= 0) throw std::invalid_argument("embed: empty shape");
  const int g = blocksFor((int64_t)n * E);
  switch ((WeightType)wtype) {
    case WeightType::F32: launchKernel(embedKernel<float>, g, kThreads, 0, stream, tokens, positions, n, (const float*)table, (const float*)posTable, E, out); break;
    case WeightType::BF16: launchKernel(embedKernel<__nv_bfloat16>, g, kThreads, 0, stream, tokens, positions, n, (const __nv_bfloat16*)table, (const __nv_bfloat16*)posTable, E, out); break;
    case WeightType::F16: launchKernel(embedKernel<__half>, g, kThreads, 0, stream, tokens, positions, n, (const __half*)table, (const __half*)posTable, E, out); break;
  }
  LCKV_LAUNCH_CHECK("embed");
}

namespace {

// Zeroes byte range b of runs[2b] (offset in `base`) and runs[2b + 1] (length): one block per
// range, 32-bit words where the range allows them.
__global__ void zeroRangesKernel(uint8_t* base, const int64_t* runs) {
  waitForPrecedingKernels();  // earlier kernels may read or write these bytes
  uint8_t* at = base + runs[2 * blockIdx.x];
  const int64_t bytes = runs[2 * blockIdx.x + 1];
  if ((((uintptr_t)at | (uintptr_t)bytes) & 3) == 0) {
    uint32_t* w = reinterpret_cast<uint32_t*>(at);
    for (int64_t i = threadIdx.x; i < bytes / 4; i += blockDim.x) w[i] = 0u;
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) at[i] = 0;
  }
}

}  // namespace

void launchZeroRanges(uint8_t* base, const int64_t* runs, int count, cudaStream_t stream) {
  NvtxRange r("zero_ranges");
  if (count <= 0) return;
  launchKernel(zeroRangesKernel, dim3(count), dim3(kThreads), 0, stream, base, runs);
  LCKV_LAUNCH_CHECK("zero_ranges");
}

void launchAdd(float* x, const float* y, int64_t count, cudaStream_t stream) {
  NvtxRange r("residual_add");
  if (count <= 0) return;
  launchKernel(addKernel, blocksFor(count), kThreads, 0, stream, x, y, count);
  LCKV_LAUNCH_CHECK("residual_add");
}

void launchSwiglu(const float* gate, const float* up, int64_t count, float* out, cudaStream_t stream) {
  NvtxRange r("swiglu");
  if (count <= 0) return;
  launchKernel(swigluKernel, blocksFor(count), kThreads, 0, stream, gate, up, count, out);
  LCKV_LAUNCH_CHECK("swiglu");
}

void launchSwigluRows(const float* gate, const float* up, int64_t stride, int n, int I, const void* gateBias,
                      const void* upBias, int wtype, void* out, bool outBf16, cudaStream_t stream) {
  NvtxRange r("swiglu_rows");
  if (I <= 0 || stride < I) throw std::invalid_argument("swiglu_rows: a row's stride is shorter than its columns");
  if (n <= 0) return;
  switch ((WeightType)wtype) {
    case WeightType::F32: launchSwigluRowsTyped(gate, up, stride, n, I, (const float*)gateBias, (const float*)upBias, out, outBf16, stream); break;
    case WeightType::BF16: launchSwigluRowsTyped(gate, up, stride, n, I, (const __nv_bfloat16*)gateBias, (const __nv_bfloat16*)upBias, out, outBf16, stream); break;
    case WeightType::F16: launchSwigluRowsTyped(gate, up, stride, n, I, (const __half*)gateBias, (const __half*)upBias, out, outBf16, stream); break;
    default: throw std::invalid_argument("swiglu_rows: unknown bias type");
  }
  LCKV_LAUNCH_CHECK("swiglu_rows");
}

void launchGeluTanh(float* x, int64_t count, cudaStream_t stream) {
  NvtxRange r("gelu_tanh");
  if (count <= 0) return;
  launchKernel(geluTanhKernel, blocksFor(count), kThreads, 0, stream, x, count);
  LCKV_LAUNCH_CHECK("gelu_tanh");
}

void launchToBf16(const float* x, int64_t count, void* y, cudaStream_t stream) {
  NvtxRange r("to_bf16");
  if (count <= 0) return;
  launchKernel(toBf16Kernel, blocksFor(count), kThreads, 0, stream, x, count, (__nv_bfloat16*)y);
  LCKV_LAUNCH_CHECK("to_bf16");
}

void launchAddBias(float* out, int n, int O, const void* bias, int wtype, cudaStream_t stream) {
  NvtxRange r("add_bias");
  const int g = blocksFor((int64_t)n * O);
  switch ((WeightType)wtype) {
    case WeightType::F32: launchKernel(addBiasKernel<float>, g, kThreads, 0, stream, out, n, O, (const float*)bias); break;
    case WeightType::BF16: launchKernel(addBiasKernel<__nv_bfloat16>, g, kThreads, 0, stream, out, n, O, (const __nv_bfloat16*)bias); break;
    case WeightType::F16: launchKernel(addBiasKernel<__half>, g, kThreads, 0, stream, out, n, O, (const __half*)bias); break;
  }
  LCKV_LAUNCH_CHECK("add_bias");
}

void launchSplitColumns(const float* src, int n, int cols, const SplitColumnsTarget* targets, int count,
                        cudaStream_t stream) {
  NvtxRange r("split_columns");
  if (count <= 0 || count > kGemvMaxTargets) throw std::invalid_argument("split_columns: 1 to kGemvMaxTargets targets");
  SplitColumns t{};
  int at = 0;
  for (int i = 0; i < count; ++i) {
    t.out[i] = targets[i].out;
    t.first[i] = at;
    at += targets[i].cols;
  }
  for (int i = count; i <= kGemvMaxTargets; ++i) t.first[i] = at;
  if (at != cols) throw std::invalid_argument("split_columns: the targets' columns do not add up to the source's");
  if (n <= 0) return;
  bool vec4 = (uintptr_t)src % 16 == 0 && cols % 4 == 0;
  for (int i = 0; i < count; ++i) vec4 = vec4 && (uintptr_t)targets[i].out % 16 == 0 && targets[i].cols % 4 == 0;
  const int kVec = vec4 ? 4 : 1;
  const dim3 grid((unsigned)std::min<int64_t>((cols / kVec + kThreads - 1) / kThreads, 65535), (unsigned)std::min(n, 65535));
  if (vec4) launchKernel(splitColumnsKernel<4>, grid, kThreads, 0, stream, src, n, cols, t, count);
  else launchKernel(splitColumnsKernel<1>, grid, kThreads, 0, stream, src, n, cols, t, count);
  LCKV_LAUNCH_CHECK("split_columns");
}

}  // namespace lckv::cuda
