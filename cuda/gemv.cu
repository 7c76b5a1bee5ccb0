// Matrix-vector products for small batches (decode): out[n, O] = x[n, I] @ W[O, I]^T + bias.
// Memory-bound on W: one warp per output feature streams its row of W once with 16-byte loads
// and applies it to all n (<= kMaxRows) input rows, so W is read once per step whatever n is.
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kMaxRows = 16;  // the CUDA backend sends up to 16 rows (kGemvMaxRows): W is read once
constexpr int kWarps = 8;

// Eight consecutive weights as floats from one 16-byte load (bf16/f16) or two (f32).
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* w) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float* w) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float* w) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}

// Up to three products that share their input x (q, k and v; gate and up), run as one grid:
// output feature j of the group belongs to matrix m with start[m] <= j < start[m + 1].
template <typename W>
struct GemvGroup {
  const W* w[kMaxGroup];
  const W* bias[kMaxGroup];
  float* out[kMaxGroup];
  int start[kMaxGroup + 1];
  int count;
};

// ROWS: the input rows this instance handles (a power of two >= n): batch 1 does not pay for
// the accumulators and predicates of 16 rows. Each row's sum is formed the same way whatever
// ROWS is (and whatever else is in the group), so results do not depend on the batch.
template <typename W, bool kVec, int ROWS>
__global__ void gemvKernel(const float* __restrict__ x, int n, int I, GemvGroup<W> g) {
  const int lane = threadIdx.x & 31;
  const int jg = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (jg >= g.start[g.count]) return;
  int m = 0;
  while (m + 1 < g.count && jg >= g.start[m + 1]) ++m;
  const int j = jg - g.start[m], O = g.start[m + 1] - g.start[m];
  const W* __restrict__ wj = g.w[m] + (int64_t)j * I;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
  if (kVec) {
#pragma unroll 4
    for (int k = lane * 8; k < I; k += 32 * 8) {
      float w[8];
      load8(wj + k, w);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < n) {
          const float4 a = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k);
          const float4 b = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k + 4);
          acc[r] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
        }
      }
    }
  } else {
    for (int k = lane; k < I; k += 32) {
      const float w = toFloat(wj[k]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < n) acc[r] += w * x[(int64_t)r * I + k];
    }
  }
  const float b = g.bias[m] ? toFloat(g.bias[m][j]) : 0.0f;
  float* out = g.out[m];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r < n) {
      const float s = warpSum(acc[r]);
      if (lane == 0) out[(int64_t)r * O + j] = s + b;
    }
  }
}

template <typename W>
void launchTyped(const float* x, int n, int I, const GemvSpec* specs, int count, cudaStream_t stream) {
  bool vec = I % 8 == 0 && (reinterpret_cast<uintptr_t>(x) % 16) == 0;
  GemvGroup<W> g{};
  g.count = count;
  g.start[0] = 0;
  for (int m = 0; m < count; ++m) {
    vec = vec && (reinterpret_cast<uintptr_t>(specs[m].W) % 16) == 0;
    g.start[m + 1] = g.start[m] + specs[m].O;
  }
  const dim3 grid((g.start[count] + kWarps - 1) / kWarps);
  for (int r0 = 0; r0 < n; r0 += kMaxRows) {
    const int rows = std::min(kMaxRows, n - r0);
    const float* xr = x + (int64_t)r0 * I;
    for (int m = 0; m < count; ++m) {
      g.w[m] = (const W*)specs[m].W;
      g.bias[m] = (const W*)specs[m].bias;
      g.out[m] = specs[m].out + (int64_t)r0 * specs[m].O;
    }
#define LCKV_GEMV(R)                                                                 \
  (vec ? gemvKernel<W, true, R><<<grid, kWarps * 32, 0, stream>>>(xr, rows, I, g) \
       : gemvKernel<W, false, R><<<grid, kWarps * 32, 0, stream>>>(xr, rows, I, g))
    if (rows == 1) LCKV_GEMV(1);
    else if (rows <= 2) LCKV_GEMV(2);
    else if (rows <= 4) LCKV_GEMV(4);
    else if (rows <= 8) LCKV_GEMV(8);
    else LCKV_GEMV(16);
#undef LCKV_GEMV
  }
}

}  // namespace

void launchGemvGroup(const float* x, int n, int I, const GemvSpec* specs, int count, int wtype, cudaStream_t stream) {
  NvtxRange r("gemv");
  if (n <= 0 || I <= 0 || count <= 0 || count > kMaxGroup) throw std::invalid_argument("gemv: bad shape or group size");
  for (int m = 0; m < count; ++m)
    if (specs[m].O <= 0) throw std::invalid_argument("gemv: empty output");
  switch ((WeightType)wtype) {
    case WeightType::F32: launchTyped<float>(x, n, I, specs, count, stream); break;
    case WeightType::BF16: launchTyped<__nv_bfloat16>(x, n, I, specs, count, stream); break;
    case WeightType::F16: launchTyped<__half>(x, n, I, specs, count, stream); break;
  }
  LCKV_LAUNCH_CHECK("gemv");
}

void launchGemv(const float* x, int n, int I, const void* W, const void* bias, int wtype, int O, float* out,
                cudaStream_t stream) {
  const GemvSpec spec{W, bias, O, out};
  launchGemvGroup(x, n, I, &spec, 1, wtype, stream);
}

}  // namespace lckv::cuda
