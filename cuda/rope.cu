// Rotary embeddings (rotate-half layout, as Hugging Face Llama) and the write of K/V rows into
// a KV slot of the cache (for int4, into the sequences' bf16 residuals, after which
// kv_page_quantize.cu quantizes the pages the rows complete).
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

// (cos, sin) of pos * invFreq, scaled. The angle is rounded to f32 before cos/sin, as the CPU
// reference and Hugging Face do; sincosf (full precision, not the __sincosf intrinsic) is within
// 2 ulp of them.
__device__ __forceinline__ float2 rotation(float pos, float invFreq, float scale) {
  const float ang = pos * invFreq;
  float s, c;
  sincosf(ang, &s, &c);
  return {c * scale, s * scale};
}
// The pair (a, b) = (x[j], x[j + half]) rotated by `cs` (rotation()).
__device__ __forceinline__ float2 rotate(float a, float b, float2 cs) { return {a * cs.x - b * cs.y, b * cs.x + a * cs.y}; }
__device__ __forceinline__ float2 rotatePair(float a, float b, float pos, float invFreq, float scale) {
  return rotate(a, b, rotation(pos, invFreq, scale));
}

__global__ void ropeKernel(float* x, int heads, int headDim, const int32_t* positions, const float* invFreq, float scale) {
  waitForPrecedingKernels();
  // grid: (n), block: heads * headDim/2 threads, looped
  const int r = blockIdx.x;
  const int half = headDim / 2;
  const float pos = (float)positions[r];
  float* row = x + (int64_t)r * heads * headDim;
  for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
    const int h = t / half, j = t % half;
    float* v = row + h * headDim;
    const float2 r2 = rotatePair(v[j], v[j + half], pos, invFreq[j], scale);
    v[j] = r2.x;
    v[j + half] = r2.y;
  }
}

// The f32 cache's K and V rows of position `pos`.
__device__ __forceinline__ float* kvRowF32(const PagedKv& kv, const int32_t* table, int pos, int v) {
  return reinterpret_cast<float*>(kv.pool + kvCodeOffset(kv, table, pos, v));
}

// Decode and prefill of a layer that owns K/V: q rotated in place, k rotated on its way into the
// cache and v copied beside it, in one pass (rope(q), rope(k) and kvWrite were three launches).
// The rotation is ropeKernel's (rotatePair).
__global__ void ropeKvWriteKernel(float* q, int numHeads, const float* k, const float* v, int numKvHeads, int headDim,
                                  const int32_t* positions, const float* invFreq, float scale, PagedKv kv) {
  // Before the wait, what no kernel writes: the position and page table (the step's inputs), the
  // frequencies, and so the cache addresses and the thread's first rotation. After it, only the
  // loads of q, k and v and the rotation itself remain.
  const int r = blockIdx.x;
  const int half = headDim / 2;
  const int p = positions[r];
  const float pos = (float)p;
  float* qrow = q + (int64_t)r * numHeads * headDim;
  const float* krow = k ? k + (int64_t)r * kv.kvDim : nullptr;
  float *kd = nullptr, *vd = nullptr;
  if (k) {
    const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r] * kv.stride;
    kd = kvRowF32(kv, table, p, 0);
    vd = kvRowF32(kv, table, p, 1);
  }
  const int qPairs = numHeads * half, pairs = qPairs + (k ? numKvHeads * half : 0);
  const int first = blockIdx.y * blockDim.x + threadIdx.x, step = gridDim.y * blockDim.x;
  const float2 firstRotation = first < pairs ? rotation(pos, invFreq[(first < qPairs ? first : first - qPairs) % half], scale)
                                             : make_float2(0.0f, 0.0f);
  waitForPrecedingKernels();
  for (int t = first; t < pairs; t += step) {
    const bool isQ = t < qPairs;
    const int u = isQ ? t : t - qPairs;
    const int h = u / half, j = u % half;
    // q in place; k on its way into the cache.
    const float* x = (isQ ? qrow : krow) + h * headDim;
    float* dst = isQ ? qrow + h * headDim : kd + h * headDim;
    const float2 r2 = rotate(x[j], x[j + half], t == first ? firstRotation : rotation(pos, invFreq[j], scale));
    dst[j] = r2.x;
    dst[j + half] = r2.y;
  }
  if (k)
    for (int j = first; j < kv.kvDim; j += step) vd[j] = v[(int64_t)r * kv.kvDim + j];
}

// The same for a compact cache type: the blocks y < qBlocks rotate q as ropeKvWriteKernel does;
// block y = qBlocks writes the row's K and V, one warp per (K/V head, K or V). The warp rotates
// (K, when invFreq is given) its head's values into shared memory, takes their largest magnitude,
// and writes codes and its half of the head's scale word by kv_format.h's rule: the CPU
// backend's kvQuantizeHead, bit for bit on the same input. Without q (kvWrite), qBlocks is 0.
// The cache is addressed at position & positionMask: a channel-key type's rows go to the
// residual's bf16 view (residualView), whose positions are offsets in the page; -1 elsewhere.
constexpr int kKvWriteThreads = 256;
template <KvType T>
__global__ void __launch_bounds__(kKvWriteThreads) quantizedKvWriteKernel(
    float* q, int numHeads, const float* k, const float* v, int headDim, const int32_t* positions,
    const float* invFreq, float scale, PagedKv kv, int qBlocks, int positionMask) {
  constexpr int kWarps = kKvWriteThreads / 32, kBits = kvTypeBits(T), kPerWord = 32 / kBits;
  __shared__ float values[kWarps][kMaxHeadDim];
  const int r = blockIdx.x, half = headDim / 2;
  const int p = positions[r];
  const float pos = (float)p;
  if ((int)blockIdx.y < qBlocks) {
    float* qrow = q + (int64_t)r * numHeads * headDim;
    const int t = blockIdx.y * blockDim.x + threadIdx.x;
    const float2 cs = t < numHeads * half ? rotation(pos, invFreq[t % half], scale) : make_float2(0.0f, 0.0f);
    waitForPrecedingKernels();
    if (t < numHeads * half) {
      float* x = qrow + (t / half) * headDim;
      const int j = t % half;
      const float2 r2 = rotate(x[j], x[j + half], cs);
      x[j] = r2.x;
      x[j + half] = r2.y;
    }
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r] * kv.stride;
  const int at = p & positionMask;  // where the row goes (the rotation above takes p itself)
  const int headBytes = headDim * kBits / 8;
  waitForPrecedingKernels();
  float* x = values[warp];
  for (int task = warp; task < 2 * kv.kvHeads; task += kWarps) {
    const int which = task & 1, h = task >> 1;  // which: 0 K, 1 V
    const float* src = (which ? v : k) + (int64_t)r * kv.kvDim + h * headDim;
    if (which == 0 && invFreq) {
      for (int j = lane; j < half; j += 32) {
        const float2 r2 = rotatePair(src[j], src[j + half], pos, invFreq[j], scale);
        x[j] = r2.x;
        x[j + half] = r2.y;
      }
    } else {
      for (int j = lane; j < headDim; j += 32) x[j] = src[j];
    }
    __syncwarp();
    float amax = 0.0f;
    for (int j = lane; j < headDim; j += 32) amax = fmaxf(amax, fabsf(x[j]));
    amax = warpMax(amax);
    const uint16_t scaleBits = kvTypeScaled(T) ? kvScaleOf(T, amax) : 0;
    const float s = kvF16ToF32(scaleBits);
    uint32_t* codes = reinterpret_cast<uint32_t*>(kv.pool + kvCodeOffset(kv, table, at, which) + h * headBytes);
    for (int w = lane; w < headBytes / 4; w += 32) {
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) word |= kvEncode(T, x[w * kPerWord + i], s) << (i * kBits);
      codes[w] = word;
    }
    if (kvTypeScaled(T) && lane == 0)
      reinterpret_cast<uint16_t*>(kv.pool + kvScaleOffset(kv, table, at, h))[which] = scaleBits;
    __syncwarp();  // x is free for the warp's next task
  }
}

template <KvType T>
void launchQuantizedKvWrite(float* q, int numHeads, const float* k, const float* v, int headDim, int n,
                            const int32_t* positions, const float* invFreq, float scale, const PagedKv& kv,
                            int positionMask, cudaStream_t stream) {
  const int qBlocks = q ? (numHeads * (headDim / 2) + kKvWriteThreads - 1) / kKvWriteThreads : 0;
  launchKernel(quantizedKvWriteKernel<T>, dim3(n, qBlocks + 1), kKvWriteThreads, 0, stream, q, numHeads, k, v, headDim,
               positions, invFreq, scale, kv, qBlocks, positionMask);
}

// The compact-type write for kv.type (not f32); q may be null (no rotation of q), and invFreq
// null (k is written as it is). A channel-key type (int4) writes the rows to the residual in
// bf16 and then quantizes the pages they complete: two launches, the second checked here.
void quantizedKvWrite(float* q, int numHeads, const float* k, const float* v, int headDim, int n, const int32_t* positions,
                      const float* invFreq, float scale, const PagedKv& kv, cudaStream_t stream) {
  const std::string headDimProblem = kvHeadDimProblem((KvType)kv.type, headDim);
  if (!headDimProblem.empty()) throw std::invalid_argument("kv_write: " + headDimProblem);
  if (headDim > kMaxHeadDim)  // the shared memory of quantizedKvWriteKernel; attentionProblem refuses these at load
    throw std::invalid_argument("kv_write: a compact K/V type takes head sizes of at most " + std::to_string(kMaxHeadDim) +
                                ", not " + std::to_string(headDim));
  switch ((KvType)kv.type) {
    case KvType::BF16: return launchQuantizedKvWrite<KvType::BF16>(q, numHeads, k, v, headDim, n, positions, invFreq, scale, kv, -1, stream);
    case KvType::FP8: return launchQuantizedKvWrite<KvType::FP8>(q, numHeads, k, v, headDim, n, positions, invFreq, scale, kv, -1, stream);
    case KvType::INT8: return launchQuantizedKvWrite<KvType::INT8>(q, numHeads, k, v, headDim, n, positions, invFreq, scale, kv, -1, stream);
    case KvType::INT4: {
      static_assert(kvTypeChannelKeys(KvType::INT4), "int4 writes through the residual");
      if (!kv.residuals) throw std::invalid_argument("kv_write: an int4 cache needs the sequences' residuals");
      launchQuantizedKvWrite<KvType::BF16>(q, numHeads, k, v, headDim, n, positions, invFreq, scale, residualView(kv),
                                           (1 << kv.pageShift) - 1, stream);
      LCKV_LAUNCH_CHECK("kv_write residual");
      return launchKvQuantizePages(n, positions, kv, stream);
    }
    default: throw std::invalid_argument("kv_write: unknown K/V type");
  }
}

// The f32 cache: one block per row copies K and V.
__global__ void kvWriteKernel(const float* k, const float* v, const int32_t* positions, PagedKv kv) {
  waitForPrecedingKernels();
  const int r = blockIdx.x;
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r] * kv.stride;
  float* kd = kvRowF32(kv, table, positions[r], 0);
  float* vd = kvRowF32(kv, table, positions[r], 1);
  for (int j = threadIdx.x; j < kv.kvDim; j += blockDim.x) {
    kd[j] = k[(int64_t)r * kv.kvDim + j];
    vd[j] = v[(int64_t)r * kv.kvDim + j];
  }
}

}  // namespace

void launchRopeKvWrite(float* q, int numHeads, const float* k, const float* v, int numKvHeads, int headDim, int n,
                       const int32_t* positions, const float* invFreq, float attentionScale, const PagedKv* kv,
                       cudaStream_t stream) {
  NvtxRange r("rope_kv_write");
  if (n <= 0) return;
  if (headDim % 2) throw std::invalid_argument("rope_kv_write: odd headDim");
  if (k && (!v || !kv || kv->kvDim != numKvHeads * headDim))
    throw std::invalid_argument("rope_kv_write: k needs v and a cache slot of numKvHeads * headDim");
  if (k && kv->type != (int)KvType::F32) {
    quantizedKvWrite(q, numHeads, k, v, headDim, n, positions, invFreq, attentionScale, *kv, stream);
    LCKV_LAUNCH_CHECK("rope_kv_write");
    return;
  }
  // A block per row would loop ~5 times over TinyLlama's 1152 pairs, each round a dependent
  // memory round trip; blocks along y give every pair its own thread (one round).
  const int pairs = (numHeads + (k ? numKvHeads : 0)) * (headDim / 2);
  launchKernel(ropeKvWriteKernel, dim3(n, (pairs + 255) / 256), 256, 0, stream, q, numHeads, k, v, numKvHeads, headDim, positions, invFreq, attentionScale,
                                           k ? *kv : PagedKv{});
  LCKV_LAUNCH_CHECK("rope_kv_write");
}

void launchRope(float* x, int n, int heads, int headDim, const int32_t* positions, const float* invFreq,
                float attentionScale, cudaStream_t stream) {
  NvtxRange r("rope");
  if (n <= 0) return;
  if (headDim % 2) throw std::invalid_argument("rope: odd headDim");
  launchKernel(ropeKernel, n, 256, 0, stream, x, heads, headDim, positions, invFreq, attentionScale);
  LCKV_LAUNCH_CHECK("rope");
}

void launchKvWrite(const float* k, const float* v, int n, const int32_t* positions, const PagedKv& kv,
                   cudaStream_t stream) {
  NvtxRange r("kv_write");
  if (n <= 0) return;
  if (kv.type != (int)KvType::F32) {
    quantizedKvWrite(nullptr, 0, k, v, kv.kvDim / kv.kvHeads, n, positions, nullptr, 1.0f, kv, stream);
    LCKV_LAUNCH_CHECK("kv_write");
    return;
  }
  launchKernel(kvWriteKernel, n, 256, 0, stream, k, v, positions, kv);
  LCKV_LAUNCH_CHECK("kv_write");
}

}  // namespace lckv::cuda
