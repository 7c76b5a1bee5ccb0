// Rotary embeddings (rotate-half layout, as Hugging Face Llama) and the write of K/V rows into
// a KV slot of the cache.
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

__global__ void kvWriteKernel(const float* k, const float* v, const int32_t* positions, PagedKv kv) {
  waitForPrecedingKernels();
  const int r = blockIdx.x;
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r] * kv.stride;
  float* kd = kv.pool + pagedOffset(table, positions[r], kv.pageShift, kv.pageFloats, kv.slot, 0, kv.kvDim);
  float* vd = kv.pool + pagedOffset(table, positions[r], kv.pageShift, kv.pageFloats, kv.slot, 1, kv.kvDim);
  for (int j = threadIdx.x; j < kv.kvDim; j += blockDim.x) {
    kd[j] = k[(int64_t)r * kv.kvDim + j];
    vd[j] = v[(int64_t)r * kv.kvDim + j];
  }
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
    kd = kv.pool + pagedOffset(table, p, kv.pageShift, kv.pageFloats, kv.slot, 0, kv.kvDim);
    vd = kv.pool + pagedOffset(table, p, kv.pageShift, kv.pageFloats, kv.slot, 1, kv.kvDim);
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

}  // namespace

void launchRopeKvWrite(float* q, int numHeads, const float* k, const float* v, int numKvHeads, int headDim, int n,
                       const int32_t* positions, const float* invFreq, float attentionScale, const PagedKv* kv,
                       cudaStream_t stream) {
  NvtxRange r("rope_kv_write");
  if (n <= 0) return;
  if (headDim % 2) throw std::invalid_argument("rope_kv_write: odd headDim");
  if (k && (!v || !kv || kv->kvDim != numKvHeads * headDim))
    throw std::invalid_argument("rope_kv_write: k needs v and a cache slot of numKvHeads * headDim");
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
  launchKernel(kvWriteKernel, n, 256, 0, stream, k, v, positions, kv);
  LCKV_LAUNCH_CHECK("kv_write");
}

}  // namespace lckv::cuda
