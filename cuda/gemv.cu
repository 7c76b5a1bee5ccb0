// Matrix-vector products for small batches (decode): out[n, O] = x[n, I] @ W[O, I]^T + bias.
// Memory-bound on W: the warps of one output feature (1 to 8, more for longer rows) stream its
// row of W once with 16-byte loads and apply it to all n (<= kMaxRows) input rows, so W is read
// once per step whatever n is.
// One launch can cover several matrices applied to the same input (Q, K and V), and the gate
// and up projections of a SwiGLU MLP with the activation applied as they are written: at batch
// 1 a layer's small matrices cost more in launches and ramp-up than in bytes.
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kMaxRows = 16;  // the CUDA backend sends up to 16 rows (kGemvMaxRows): W is read once
constexpr int kWarps = 8;
constexpr int kLoadsInFlight = 4;  // 16-byte weight loads each lane issues before using them (8 measured no faster)

// Eight consecutive weights as floats from one 16-byte load (bf16/f16) or two (f32).
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* w) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float* w) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float* w) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p + 4));
  w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}

// The matrices of one launch: output feature j of the launch is feature j - first[s] of matrix
// s. With swiglu, the launch has two matrices of equal height (gate, up) and warp j computes
// feature j of both, writing silu(gate) * up to out[0].
template <typename W>
struct Targets {
  const W* w[kGemvMaxTargets];
  const W* bias[kGemvMaxTargets];
  float* out[kGemvMaxTargets];
  int first[kGemvMaxTargets + 1];  // unused matrices are empty ranges at the end
};

// acc[r] += W[j, lanes' part] . x[r, lanes' part] for one warp of the `lanes` (32 per warp) that
// share row j, lane index `gl` among them, then summed over the warp. Each lane's sum, and the
// order in which the warps' sums are added (by the kernel), depend on I only, never on ROWS or
// n: results do not depend on the batch.
template <typename W, bool kVec, int ROWS>
__device__ __forceinline__ void dotRows(const float* __restrict__ x, int n, int I, const W* __restrict__ wj, int gl,
                                        int lanes, float* acc) {
  if (kVec) {
    const int span = lanes * 8;  // weights one load of every lane covers
    for (int k0 = gl * 8; k0 < I; k0 += span * kLoadsInFlight) {
      float w[kLoadsInFlight][8];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int k = k0 + u * span;
        if (k < I) load8(wj + k, w[u]);
      }
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int k = k0 + u * span;
        if (k >= I) break;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r < n) {
            const float4 a = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k);
            const float4 b = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k + 4);
            acc[r] += w[u][0] * a.x + w[u][1] * a.y + w[u][2] * a.z + w[u][3] * a.w + w[u][4] * b.x + w[u][5] * b.y +
                      w[u][6] * b.z + w[u][7] * b.w;
          }
        }
      }
    }
  } else {
    for (int k = gl; k < I; k += lanes) {
      const float w = toFloat(wj[k]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < n) acc[r] += w * x[(int64_t)r * I + k];
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
    if (r < n) acc[r] = warpSum(acc[r]);
}

// ROWS: the input rows this instance handles (a power of two >= n): batch 1 does not pay for
// the accumulators and predicates of 16 rows. warpsPerRow warps share each output feature (a
// block holds kWarps / warpsPerRow features): at batch 1 a matrix of 2048 rows gives one warp
// per row too few loads in flight to reach the copy rate, and splitting rows fixes that.
template <typename W, bool kVec, int ROWS, bool kSwiglu>
__global__ void __launch_bounds__(kWarps * 32)
    gemvKernel(const float* __restrict__ x, int n, int I, int warpsPerRow, Targets<W> t) {
  constexpr int kSums = kSwiglu ? 2 : 1;
  __shared__ float warpSums[kWarps][kSums][ROWS];
  waitForPrecedingKernels();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int part = warp % warpsPerRow;
  const int j = blockIdx.x * (kWarps / warpsPerRow) + warp / warpsPerRow;
  const bool active = j < t.first[3];
  const int s = (j >= t.first[1]) + (j >= t.first[2]);
  const int first = s == 0 ? 0 : s == 1 ? t.first[1] : t.first[2];
  const int f = j - first, O = (s == 0 ? t.first[1] : s == 1 ? t.first[2] : t.first[3]) - first;
  // Constant indices only: a dynamic index into the parameters would copy them to local memory.
  static_assert(kGemvMaxTargets == 3, "the selection below spells out three targets");
  const W* w = s == 0 ? t.w[0] : s == 1 ? t.w[1] : t.w[2];
  const W* bias = s == 0 ? t.bias[0] : s == 1 ? t.bias[1] : t.bias[2];
  float* out = s == 0 ? t.out[0] : s == 1 ? t.out[1] : t.out[2];
  if (active) {
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    dotRows<W, kVec, ROWS>(x, n, I, w + (int64_t)f * I, part * 32 + lane, warpsPerRow * 32, acc);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) warpSums[warp][0][r] = acc[r];
    }
    if constexpr (kSwiglu) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
      dotRows<W, kVec, ROWS>(x, n, I, t.w[1] + (int64_t)f * I, part * 32 + lane, warpsPerRow * 32, acc);
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) warpSums[warp][kSums - 1][r] = acc[r];
      }
    }
  }
  __syncthreads();
  // The feature's first warp adds its warps' sums in order, lane r for input row r.
  if (!active || part != 0 || lane >= n || lane >= ROWS) return;
  const int r = lane;
  float g = bias ? toFloat(bias[f]) : 0.0f;
  for (int p = 0; p < warpsPerRow; ++p) g += warpSums[warp + p][0][r];
  if constexpr (!kSwiglu) {
    out[(int64_t)r * O + f] = g;
  } else {
    float u = t.bias[1] ? toFloat(t.bias[1][f]) : 0.0f;
    for (int p = 0; p < warpsPerRow; ++p) u += warpSums[warp + p][kSums - 1][r];
    out[(int64_t)r * O + f] = (g / (1.0f + expf(-g))) * u;  // the same expression as the swiglu kernel and the CPU reference
  }
}

// Warps per output feature for rows of I weights: at most 2048 weights per warp. Measured at
// batch 1 on an H100 (ncu, isolated launches): the 5632-wide down projection of TinyLlama took
// 18.2 us with one warp per row and 15.8 us with four; 2048-wide rows were slower split in two.
int warpsPerRow(int I) {
  int warps = 1;
  while (warps < kWarps && I / warps > 2048) warps *= 2;
  return warps;
}

template <typename W, bool kSwiglu>
void launchTyped(const float* x, int n, int I, const GemvTarget* targets, int count, cudaStream_t stream) {
  bool vec = I % 8 == 0 && (reinterpret_cast<uintptr_t>(x) % 16) == 0;
  Targets<W> t{};
  const int spanned = kSwiglu ? 1 : count;  // swiglu: warps cover the gate's features; each also does up's
  t.first[0] = 0;
  for (int s = 0; s < count; ++s) {
    t.w[s] = (const W*)targets[s].weight;
    t.bias[s] = (const W*)targets[s].bias;
    t.out[s] = targets[s].out;
    if (s < spanned) t.first[s + 1] = t.first[s] + targets[s].features;
    vec = vec && (reinterpret_cast<uintptr_t>(targets[s].weight) % 16) == 0;
  }
  for (int s = spanned; s < kGemvMaxTargets; ++s) t.first[s + 1] = t.first[s];
  const int split = warpsPerRow(I), perBlock = kWarps / split;
  const dim3 grid((t.first[kGemvMaxTargets] + perBlock - 1) / perBlock);
  for (int r0 = 0; r0 < n; r0 += kMaxRows) {
    const int rows = std::min(kMaxRows, n - r0);
    const float* xr = x + (int64_t)r0 * I;
    Targets<W> tr = t;
    for (int s = 0; s < count; ++s) tr.out[s] = t.out[s] + (int64_t)r0 * targets[s].features;
#define LCKV_GEMV(R)                                                                              \
  (vec ? launchKernel(gemvKernel<W, true, R, kSwiglu>, grid, kWarps * 32, 0, stream, xr, rows, I, split, tr) \
       : launchKernel(gemvKernel<W, false, R, kSwiglu>, grid, kWarps * 32, 0, stream, xr, rows, I, split, tr))
    if (rows == 1) LCKV_GEMV(1);
    else if (rows <= 2) LCKV_GEMV(2);
    else if (rows <= 4) LCKV_GEMV(4);
    else if (rows <= 8) LCKV_GEMV(8);
    else LCKV_GEMV(16);
#undef LCKV_GEMV
  }
}

template <bool kSwiglu>
void launchAny(const float* x, int n, int I, const GemvTarget* targets, int count, int wtype, cudaStream_t stream) {
  switch ((WeightType)wtype) {
    case WeightType::F32: launchTyped<float, kSwiglu>(x, n, I, targets, count, stream); break;
    case WeightType::BF16: launchTyped<__nv_bfloat16, kSwiglu>(x, n, I, targets, count, stream); break;
    case WeightType::F16: launchTyped<__half, kSwiglu>(x, n, I, targets, count, stream); break;
  }
}

void checkTargets(int n, int I, const GemvTarget* targets, int count, const char* op) {
  if (n <= 0 || I <= 0 || count <= 0 || count > kGemvMaxTargets) throw std::invalid_argument(std::string(op) + ": empty shape");
  for (int s = 0; s < count; ++s)
    if (targets[s].features <= 0 || !targets[s].weight || !targets[s].out)
      throw std::invalid_argument(std::string(op) + ": empty target");
}

}  // namespace

void launchGemv(const float* x, int n, int I, const GemvTarget* targets, int count, int wtype, cudaStream_t stream) {
  NvtxRange r("gemv");
  checkTargets(n, I, targets, count, "gemv");
  launchAny<false>(x, n, I, targets, count, wtype, stream);
  LCKV_LAUNCH_CHECK("gemv");
}

void launchGemvSwiglu(const float* x, int n, int I, const GemvTarget& gate, const GemvTarget& up, int wtype,
                      cudaStream_t stream) {
  NvtxRange r("gemv_swiglu");
  const GemvTarget targets[2] = {gate, {up.weight, up.bias, up.features, gate.out}};
  checkTargets(n, I, targets, 2, "gemv_swiglu");
  if (gate.features != up.features) throw std::invalid_argument("gemv_swiglu: gate and up differ in size");
  launchAny<true>(x, n, I, targets, 2, wtype, stream);
  LCKV_LAUNCH_CHECK("gemv_swiglu");
}

}  // namespace lckv::cuda
