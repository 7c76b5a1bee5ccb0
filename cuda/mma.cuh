// The tensor-core primitives the attention kernels share: 16-bit pairs (packing, and splitting
// an f32 into two or three exact 16-bit parts so that a product keeps f32's precision),
// mma.sync m16n8k16 with f32 accumulators, and ldmatrix.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lckv::cuda {

namespace {

template <bool kF16>
__device__ __forceinline__ uint32_t packPair(float lo, float hi) {
  uint32_t r;
  if constexpr (kF16) {
    const __half2 h = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&h);
  }
  return r;
}
template <bool kF16>
__device__ __forceinline__ float2 unpackPair(uint32_t r) {
  if constexpr (kF16) return __half22float2(*reinterpret_cast<const __half2*>(&r));
  else return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r));
}
// (x, y) as a high pair and the low pair of what it leaves out: x = hi.x + lo.x to ~22 bits
// (f16) or 16 bits (bf16). splitPair3 adds a third pair (bf16: 24 bits, f32's precision).
template <bool kF16>
__device__ __forceinline__ void splitPair(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = packPair<kF16>(x, y);
  const float2 h = unpackPair<kF16>(hi);
  lo = packPair<kF16>(x - h.x, y - h.y);
}
template <bool kF16>
__device__ __forceinline__ void splitPair3(float x, float y, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  hi = packPair<kF16>(x, y);
  const float2 h = unpackPair<kF16>(hi);
  splitPair<kF16>(x - h.x, y - h.y, mid, lo);
}

// d += a . b, m16n8k16, f32 accumulators.
template <bool kF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Lane l gives the address of row l % 8 of matrix l / 8; register i gets matrix i, the thread
// (g, t) holding its row g, 32-bit word t (.trans: rows 2t and 2t + 1 of its column g).
__device__ __forceinline__ void ldmatrixX4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"((unsigned)__cvta_generic_to_shared(row)));
}
__device__ __forceinline__ void ldmatrixX2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"((unsigned)__cvta_generic_to_shared(row)));
}
__device__ __forceinline__ void ldmatrixX4Trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"((unsigned)__cvta_generic_to_shared(row)));
}

}  // namespace

}  // namespace lckv::cuda
