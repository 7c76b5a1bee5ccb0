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
template <typename W>
__device__ __forceinline__ void load8(const W* p, float* w) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const typename Pair<W>::type* h = reinterpret_cast<const typename Pair<W>::type*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = toFloat2(h[i]);
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

// a[s] of a kernel parameter's array, reached by constant indices only: a dynamic index into
// the parameters would copy them to local memory.
template <typename T, int N>
__device__ __forceinline__ T pick(const T (&a)[N], int s) {
  T v = a[0];
#pragma unroll
  for (int i = 1; i < N; ++i)
    if (s == i) v = a[i];
  return v;
}
// The matrix that row j of a launch belongs to: the last s with first[s] <= j (first[] holds
// each matrix's first row, then the end; rows past the end fall to the last matrix, inactive).
template <int N>
__device__ __forceinline__ int matrixOf(const int (&first)[N], int j) {
  int s = 0;
#pragma unroll
  for (int i = 1; i < N - 1; ++i) s += j >= first[i];
  return s;
}

// acc[r] += W[j, lanes' part] . x[r, lanes' part] for one warp of the `lanes` (32 per warp) that
// share row j, lane index `gl` among them, then summed over the warp. Each lane's sum, and the
// order in which the warps' sums are added (by the kernel), depend on I only, never on ROWS or
// n: for f16 and f32 weights, results do not depend on the batch (bf16: see the tensor-core kernel).
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
// block holds kWarps / warpsPerRow features): one warp would stream a long row (the down
// projection's 5632 weights) in six dependent rounds of loads, several warps in fewer.
template <typename W, bool kVec, int ROWS, bool kSwiglu>
__global__ void __launch_bounds__(kWarps * 32)
    gemvKernel(const float* __restrict__ x, int n, int I, int warpsPerRow, Targets<W> t) {
  constexpr int kSums = kSwiglu ? 2 : 1;
  __shared__ float warpSums[kWarps][kSums][ROWS];
  waitForPrecedingKernels();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int part = warp % warpsPerRow;
  const int j = blockIdx.x * (kWarps / warpsPerRow) + warp / warpsPerRow;
  const bool active = j < t.first[kGemvMaxTargets];
  const int s = matrixOf(t.first, j);
  const int first = pick(t.first, s);
  const int f = j - first, O = pick(t.first, s + 1) - first;
  const W* w = pick(t.w, s);
  const W* bias = pick(t.bias, s);
  float* out = pick(t.out, s);
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

// ---- one input row, 16-bit weights -------------------------------------------------------------
// At batch 1 (every single-sequence decode step) the products cost nothing; only the rate at
// which W streams in counts. Here each warp owns one output feature and its lanes walk the row
// together, so every 16-byte load of the warp reads 512 contiguous bytes; the loads of a round
// stay raw in registers until all are issued, and the next round's are in flight while a round's
// products are taken. No shared memory, no block barrier: a warp
// writes its feature as soon as it is done. On an H100 (scripts/bench/gemv-rate.cu, launched
// back to back over 22 layers' weights) this streamed TinyLlama's matrices 9-21% faster than
// the kernels below, whose loads read 64 bytes of each of 16 rows.
constexpr int kOneRowWarps = 8;
constexpr int kOneRowInFlight = 4;  // 16-byte loads per lane per round and matrix

// The 8 weights of `u` dotted with x[k, k + 8).
template <typename W>
__device__ __forceinline__ float dot8(const uint4& u, const float* __restrict__ x) {
  const typename Pair<W>::type* h = reinterpret_cast<const typename Pair<W>::type*>(&u);
  const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
  const float2 w0 = toFloat2(h[0]), w1 = toFloat2(h[1]), w2 = toFloat2(h[2]), w3 = toFloat2(h[3]);
  return w0.x * a.x + w0.y * a.y + w1.x * a.z + w1.y * a.w + w2.x * b.x + w2.y * b.y + w3.x * b.z + w3.y * b.w;
}

// Row j of the launch (see Targets): one warp. With swiglu, rows j of gate and up together.
template <typename W, bool kSwiglu>
__global__ void __launch_bounds__(kOneRowWarps * 32) gemvOneRowKernel(const float* __restrict__ x, int I, Targets<W> t) {
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kOneRowWarps + (threadIdx.x >> 5);
  const bool active = j < t.first[kGemvMaxTargets];
  const int s = matrixOf(t.first, j);
  const int f = j - pick(t.first, s);
  const W* w = pick(t.w, s) + (int64_t)f * I;
  const W* up = kSwiglu ? t.w[1] + (int64_t)f * I : nullptr;
  // A round: kOneRowInFlight loads per matrix. The next round's loads are issued before this
  // one's products, and the first round's before the wait for the preceding kernel (no kernel
  // writes weights): under programmatic launch they stream while that kernel still runs.
  uint4 u[kOneRowInFlight], v[kSwiglu ? kOneRowInFlight : 1];
  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kOneRowInFlight; ++i) {
      const int k = k0 + i * 256;
      const bool in = active && k < I;
      u[i] = in ? __ldg(reinterpret_cast<const uint4*>(w + k)) : make_uint4(0, 0, 0, 0);
      if constexpr (kSwiglu) v[i] = in ? __ldg(reinterpret_cast<const uint4*>(up + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  load(lane * 8);
  waitForPrecedingKernels();
  if (!active) return;
  float acc = 0.0f, accUp = 0.0f;
  for (int k0 = lane * 8; k0 < I; k0 += 256 * kOneRowInFlight) {
    uint4 cu[kOneRowInFlight], cv[kSwiglu ? kOneRowInFlight : 1];
#pragma unroll
    for (int i = 0; i < kOneRowInFlight; ++i) {
      cu[i] = u[i];
      if constexpr (kSwiglu) cv[i] = v[i];
    }
    if (k0 + 256 * kOneRowInFlight < I) load(k0 + 256 * kOneRowInFlight);
#pragma unroll
    for (int i = 0; i < kOneRowInFlight; ++i) {
      const int k = k0 + i * 256;
      if (k >= I) break;
      acc += dot8<W>(cu[i], x + k);
      if constexpr (kSwiglu) accUp += dot8<W>(cv[i], x + k);
    }
  }
  acc = warpSum(acc);
  if constexpr (kSwiglu) accUp = warpSum(accUp);
  if (lane != 0) return;
  const W* bias = pick(t.bias, s);
  float* out = pick(t.out, s);
  const float g = acc + (bias ? toFloat(bias[f]) : 0.0f);
  if constexpr (!kSwiglu) {
    out[f] = g;
  } else {
    const float u = accUp + (t.bias[1] ? toFloat(t.bias[1][f]) : 0.0f);
    out[f] = (g / (1.0f + expf(-g))) * u;  // the same expression as the swiglu kernel and the CPU reference
  }
}

// ---- bf16 weights: tensor cores ------------------------------------------------------------------
// At 8 to 16 input rows the kernel above re-reads 16 f32 input values from L1 for every 8
// weights it loads, so L1, not memory, sets its speed. With bf16 weights the products go to
// mma.sync.m16n8k16 instead: a warp multiplies a tile of 16 output features by 8 input rows per
// instruction, each input value loaded once per tile. The f32 input is split into two bf16
// parts (hi + lo carries 16 of f32's 24 significant bits), both multiplied, so the products keep
// close to f32 precision. From 2 to 16 rows a row's result does not depend on the batch: each
// output column of an mma depends on its own input column only. (One row takes
// gemvOneRowKernel, whose f32 products differ from these in the last bits.)
//
// K order: the dot product does not care in which order k is visited, so each lane loads 8
// consecutive weights (16 bytes) of its two rows and the 8 matching inputs, and the fragments
// of two k16 steps are taken from them: lane (g, t) = (lane / 4, lane % 4) holds k = 8t..8t+7
// of a 32-wide block; its first mma uses 8t..8t+3 where the instruction expects k = 2t, 2t+1,
// 2t+8, 2t+9, its second 8t+4..8t+7. Weights and inputs are permuted the same way.
constexpr int kMmaWarps = 16;    // warps of a block: one 16-feature tile, K cut into 16 interleaved parts
constexpr int kMmaInFlight = 4;  // 32-wide k blocks each warp loads before using them

__device__ __forceinline__ void mmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ uint32_t packBf16(float low, float high) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += W[16 rows, 32 k] . x[32 k, 8 rows] for one 32-wide k block: `w0`/`w1` the lane's 8
// weights of rows g and g + 8, `xs` its 8 inputs of input row g.
__device__ __forceinline__ void mmaBlock(float (&d)[4], const uint4& w0, const uint4& w1, const float (&xs)[8]) {
  uint32_t hi[4], lo[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float a = xs[2 * i], b = xs[2 * i + 1];
    hi[i] = packBf16(a, b);
    const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&hi[i]);
    const float ha = __low2float(h), hb = __high2float(h);
    // An infinite high part (x infinite, or beyond bf16's range) carries x alone: inf - inf
    // would make the low part NaN where the CPU's product is infinite.
    lo[i] = packBf16(isinf(ha) ? 0.0f : a - ha, isinf(hb) ? 0.0f : b - hb);
  }
  const uint32_t first[4] = {w0.x, w1.x, w0.y, w1.y}, second[4] = {w0.z, w1.z, w0.w, w1.w};
  mmaBf16(d, first, hi[0], hi[1]);
  mmaBf16(d, first, lo[0], lo[1]);
  mmaBf16(d, second, hi[2], hi[3]);
  mmaBf16(d, second, lo[2], lo[3]);
}

// The matrices of one launch in tiles of 16 features: tile i belongs to matrix s when
// firstTile[s] <= i < firstTile[s + 1]. With swiglu, matrix 0 is the gate and 1 the up.
struct MmaTargets {
  const __nv_bfloat16* w[kGemvMaxTargets];
  const __nv_bfloat16* bias[kGemvMaxTargets];
  float* out[kGemvMaxTargets];
  int features[kGemvMaxTargets];
  int firstTile[kGemvMaxTargets + 1];
};

// Block = one tile of 16 features (of each of gate and up with swiglu); warp w takes the k
// blocks w, w + 16, ...; the warps' partial tiles are added in warp order through shared
// memory. NT: tiles of 8 input rows (1 for n <= 8, 2 for n <= 16).
template <int NT, bool kSwiglu>
__global__ void __launch_bounds__(kMmaWarps * 32, kSwiglu ? 1 : 2) gemvMmaKernel(const float* __restrict__ x, int n, int I, MmaTargets t) {
  constexpr int kMats = kSwiglu ? 2 : 1;
  __shared__ float partial[kMmaWarps][kMats][NT][4][32];
  waitForPrecedingKernels();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int tile = blockIdx.x;
  const int s = kSwiglu ? 0 : matrixOf(t.firstTile, tile);
  const int O = pick(t.features, s);
  const int row0 = (tile - pick(t.firstTile, s)) * 16;
  const __nv_bfloat16* wm[kMats];
  wm[0] = pick(t.w, s);
  if constexpr (kSwiglu) wm[kMats - 1] = t.w[1];
  const bool has0 = row0 + g < O, has1 = row0 + g + 8 < O;
  float d[kMats][NT][4] = {};
  for (int kb0 = warp * 32; kb0 < I; kb0 += kMmaWarps * 32 * kMmaInFlight) {
    uint4 w0[kMats][kMmaInFlight], w1[kMats][kMmaInFlight];
#pragma unroll
    for (int u = 0; u < kMmaInFlight; ++u) {
      const int k = kb0 + u * kMmaWarps * 32 + tq * 8;
#pragma unroll
      for (int m = 0; m < kMats; ++m) {
        const __nv_bfloat16* base = wm[m] + k;
        w0[m][u] = has0 && k < I ? __ldg(reinterpret_cast<const uint4*>(base + (int64_t)(row0 + g) * I)) : make_uint4(0, 0, 0, 0);
        w1[m][u] = has1 && k < I ? __ldg(reinterpret_cast<const uint4*>(base + (int64_t)(row0 + g + 8) * I)) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kMmaInFlight; ++u) {
      const int kb = kb0 + u * kMmaWarps * 32;
      if (kb >= I) break;  // the same for every lane: the mma needs the whole warp
      const int k = kb + tq * 8;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int r = nt * 8 + g;
        float xs[8] = {};
        if (r < n && k < I) {
          const float4 a = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k);
          const float4 b = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k + 4);
          xs[0] = a.x; xs[1] = a.y; xs[2] = a.z; xs[3] = a.w;
          xs[4] = b.x; xs[5] = b.y; xs[6] = b.z; xs[7] = b.w;
        }
#pragma unroll
        for (int m = 0; m < kMats; ++m) mmaBlock(d[m][nt], w0[m][u], w1[m][u], xs);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMats; ++m)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][m][nt][i][lane] = d[m][nt][i];
  __syncthreads();
  // Thread e adds element (nt, i, lane) of the tile over the warps, in warp order. Element i of
  // lane (g, tq): feature g (+8 for i >= 2), input row 2 tq + (i & 1) of the row tile.
  for (int e = threadIdx.x; e < NT * 4 * 32; e += blockDim.x) {
    const int nt = e / 128, i = (e / 32) % 4, l = e % 32;
    const int f = row0 + (l >> 2) + (i >= 2 ? 8 : 0), r = nt * 8 + (l & 3) * 2 + (i & 1);
    if (f >= O || r >= n) continue;
    const __nv_bfloat16* bias = pick(t.bias, s);
    float* out = pick(t.out, s);
    float v = bias ? __bfloat162float(bias[f]) : 0.0f;
    for (int w = 0; w < kMmaWarps; ++w) v += partial[w][0][nt][i][l];
    if constexpr (!kSwiglu) {
      out[(int64_t)r * O + f] = v;
    } else {
      float u = t.bias[1] ? __bfloat162float(t.bias[1][f]) : 0.0f;
      for (int w = 0; w < kMmaWarps; ++w) u += partial[w][kMats - 1][nt][i][l];
      out[(int64_t)r * O + f] = (v / (1.0f + expf(-v))) * u;  // the same expression as the swiglu kernel and the CPU reference
    }
  }
}

// Whether every row of x and of the weights can be read in 16-byte vectors.
bool loadsAligned(const float* x, int I, const GemvTarget* targets, int count) {
  bool aligned = I % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  for (int s = 0; s < count; ++s) aligned = aligned && reinterpret_cast<uintptr_t>(targets[s].weight) % 16 == 0;
  return aligned;
}

// Launches the tensor-core kernel when it applies (bf16, 16-byte aligned rows and input);
// returns false otherwise.
bool launchMma(const float* x, int n, int I, const GemvTarget* targets, int count, bool swiglu, cudaStream_t stream) {
  if (!loadsAligned(x, I, targets, count)) return false;
  MmaTargets t{};
  const int spanned = swiglu ? 1 : count;  // swiglu: tiles cover the gate's features; each block also does up's
  for (int s = 0; s < count; ++s) {
    t.w[s] = (const __nv_bfloat16*)targets[s].weight;
    t.bias[s] = (const __nv_bfloat16*)targets[s].bias;
    t.out[s] = targets[s].out;
    t.features[s] = targets[s].features;
  }
  t.firstTile[0] = 0;
  for (int s = 0; s < kGemvMaxTargets; ++s)
    t.firstTile[s + 1] = t.firstTile[s] + (s < spanned ? (targets[s].features + 15) / 16 : 0);
  const dim3 grid(t.firstTile[kGemvMaxTargets]);
  for (int r0 = 0; r0 < n; r0 += kMaxRows) {
    const int rows = std::min(kMaxRows, n - r0);
    MmaTargets tr = t;
    for (int s = 0; s < count; ++s) tr.out[s] = t.out[s] + (int64_t)r0 * targets[s].features;
    const float* xr = x + (int64_t)r0 * I;
    if (swiglu) {
      if (rows <= 8) launchKernel(gemvMmaKernel<1, true>, grid, kMmaWarps * 32, 0, stream, xr, rows, I, tr);
      else launchKernel(gemvMmaKernel<2, true>, grid, kMmaWarps * 32, 0, stream, xr, rows, I, tr);
    } else {
      if (rows <= 8) launchKernel(gemvMmaKernel<1, false>, grid, kMmaWarps * 32, 0, stream, xr, rows, I, tr);
      else launchKernel(gemvMmaKernel<2, false>, grid, kMmaWarps * 32, 0, stream, xr, rows, I, tr);
    }
  }
  return true;
}

template <typename W, bool kSwiglu>
void launchTyped(const float* x, int n, int I, const GemvTarget* targets, int count, cudaStream_t stream) {
  const bool vec = loadsAligned(x, I, targets, count);
  Targets<W> t{};
  const int spanned = kSwiglu ? 1 : count;  // swiglu: warps cover the gate's features; each also does up's
  t.first[0] = 0;
  for (int s = 0; s < count; ++s) {
    t.w[s] = (const W*)targets[s].weight;
    t.bias[s] = (const W*)targets[s].bias;
    t.out[s] = targets[s].out;
    if (s < spanned) t.first[s + 1] = t.first[s] + targets[s].features;
  }
  for (int s = spanned; s < kGemvMaxTargets; ++s) t.first[s + 1] = t.first[s];
  const int split = warpsPerRow(I), perBlock = kWarps / split;
  const dim3 grid((t.first[kGemvMaxTargets] + perBlock - 1) / perBlock);
  for (int r0 = 0; r0 < n; r0 += kMaxRows) {
    const int rows = std::min(kMaxRows, n - r0);
    const float* xr = x + (int64_t)r0 * I;
    Targets<W> tr = t;
    for (int s = 0; s < count; ++s) tr.out[s] = t.out[s] + (int64_t)r0 * targets[s].features;
    if constexpr (sizeof(W) == 2) {
      if (rows == 1 && vec) {
        launchKernel(gemvOneRowKernel<W, kSwiglu>, dim3((t.first[kGemvMaxTargets] + kOneRowWarps - 1) / kOneRowWarps),
                     kOneRowWarps * 32, 0, stream, xr, I, tr);
        continue;
      }
    }
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
    case WeightType::BF16:
      // One row: gemvOneRowKernel (through launchTyped). More: tensor cores where they apply.
      if (n == 1 || !launchMma(x, n, I, targets, count, kSwiglu, stream)) launchTyped<__nv_bfloat16, kSwiglu>(x, n, I, targets, count, stream);
      break;
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
