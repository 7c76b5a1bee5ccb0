// Rotary embeddings (rotate-half layout, as Hugging Face Llama) and the write of K/V rows into
// a KV slot of the cache.
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

__global__ void ropeKernel(float* x, int heads, int headDim, const int32_t* positions, const float* invFreq, float scale) {
  // grid: (n), block: heads * headDim/2 threads, looped
  const int r = blockIdx.x;
  const int half = headDim / 2;
  const float pos = (float)positions[r];
  float* row = x + (int64_t)r * heads * headDim;
  for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
    const int h = t / half, j = t % half;
    // Angle rounded to f32 before cos/sin, as the CPU reference and Hugging Face do; sincosf
    // (full precision, not the __sincosf intrinsic) is within 2 ulp of them.
    const float ang = pos * invFreq[j];
    float s, c;
    sincosf(ang, &s, &c);
    c *= scale;
    s *= scale;
    float* v = row + h * headDim;
    const float a = v[j], b = v[j + half];
    v[j] = a * c - b * s;
    v[j + half] = b * c + a * s;
  }
}

__global__ void kvWriteKernel(const float* k, const float* v, const int32_t* positions, PagedKv kv) {
  const int r = blockIdx.x;
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r] * kv.stride;
  float* kd = kv.pool + pagedOffset(table, positions[r], kv.pageShift, kv.pageFloats, kv.slot, 0, kv.kvDim);
  float* vd = kv.pool + pagedOffset(table, positions[r], kv.pageShift, kv.pageFloats, kv.slot, 1, kv.kvDim);
  for (int j = threadIdx.x; j < kv.kvDim; j += blockDim.x) {
    kd[j] = k[(int64_t)r * kv.kvDim + j];
    vd[j] = v[(int64_t)r * kv.kvDim + j];
  }
}

}  // namespace

void launchRope(float* x, int n, int heads, int headDim, const int32_t* positions, const float* invFreq,
                float attentionScale, cudaStream_t stream) {
  NvtxRange r("rope");
  if (n <= 0) return;
  if (headDim % 2) throw std::invalid_argument("rope: odd headDim");
  ropeKernel<<<n, 256, 0, stream>>>(x, heads, headDim, positions, invFreq, attentionScale);
  LCKV_LAUNCH_CHECK("rope");
}

void launchKvWrite(const float* k, const float* v, int n, const int32_t* positions, const PagedKv& kv,
                   cudaStream_t stream) {
  NvtxRange r("kv_write");
  if (n <= 0) return;
  kvWriteKernel<<<n, 256, 0, stream>>>(k, v, positions, kv);
  LCKV_LAUNCH_CHECK("kv_write");
}

}  // namespace lckv::cuda
