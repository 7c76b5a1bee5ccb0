// The K/V cache's value types, the byte layout of a page, and the quantization rule: one
// description that the CPU backend and the CUDA kernels both compile (host and device code), so
// that they write the same codes and scales bit for bit and read them at the same addresses.
//
// Types (kvCacheDtype): f32; bf16 (round to nearest even); and three scaled types that keep one
// f16 scale per (token, K/V head) for K and one for V:
//   fp8  (e4m3fn, saturating): code = e4m3(x / s), s = amax / 448
//   int8 (symmetric):        code = rint(x / s) in [-127, 127], s = amax / 127
//   int4 (symmetric):        code = rint(x / s) in [-7, 7], s = amax / 7; two codes a byte,
//                            the even channel in the low nibble
// where amax is the largest |x| of the head's values in that token's row and s is rounded to f16
// before the codes are computed with it (a zero scale gives zero codes). A value reads back as
// code * s. x / s is clamped to [-codeMax, codeMax] first, a NaN to +codeMax, so no type writes a
// NaN: e4m3fn has no infinity and spends 0x7f and 0xff on NaN, which is how the GPU's conversion
// (cvt.rn.f16x2.e4m3x2) and kvE4m3ToF32 read them. Per (token, head) scales need nothing but the row being written, so a K/V write
// stays one pass fused with RoPE, a page is final as soon as its row is written (fork, the
// prefix cache and truncation see no half-quantized page), and the scales cost 4 bytes per head
// and token against 64 to 256 bytes of codes (docs/quality.md has the measured quality).
//
// A page holds pageTokens positions of every KV slot of the plan:
//
//   page = [slot] { K codes [pageTokens][rowBytes] | V codes [pageTokens][rowBytes] |
//                   scales [pageTokens][kvHeads] x (f16 K scale, f16 V scale) }  (16-byte aligned)
//
// rowBytes = kvDim * bits / 8. A K/V head's codes of one token are contiguous, and its two
// scales are one 32-bit word, so a kernel copies a key's scales with one 4-byte load. For f32
// this is exactly the float layout [slot][K | V][pageTokens][kvDim] of before.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define LCKV_HD __host__ __device__ __forceinline__
#else
#define LCKV_HD inline
#endif

namespace lckv {

enum class KvType : int32_t { F32 = 0, BF16 = 1, FP8 = 2, INT8 = 3, INT4 = 4 };
constexpr int kKvTypeCount = 5;

LCKV_HD constexpr int kvTypeBits(KvType t) {
  return t == KvType::F32 ? 32 : t == KvType::BF16 ? 16 : t == KvType::INT4 ? 4 : 8;
}
LCKV_HD constexpr bool kvTypeScaled(KvType t) { return t == KvType::FP8 || t == KvType::INT8 || t == KvType::INT4; }
// The largest code magnitude of a scaled type: amax maps to it.
LCKV_HD constexpr float kvTypeCodeMax(KvType t) {
  return t == KvType::FP8 ? 448.0f : t == KvType::INT8 ? 127.0f : t == KvType::INT4 ? 7.0f : 1.0f;
}
// The kernels read a head's codes in 32-bit words: the head size must be a multiple of the
// channels a word holds (f32 takes any head size).
LCKV_HD constexpr int kvTypeHeadDimMultiple(KvType t) { return t == KvType::F32 ? 1 : 32 / kvTypeBits(t); }

// Names as the options spell them ("f32", "bf16", "fp8", "int8", "int4"); null for none.
inline const char* kvTypeName(KvType t) {
  switch (t) {
    case KvType::F32: return "f32";
    case KvType::BF16: return "bf16";
    case KvType::FP8: return "fp8";
    case KvType::INT8: return "int8";
    case KvType::INT4: return "int4";
  }
  return nullptr;
}
// Why a cache of type t cannot hold heads of headDim values ("" when it can): the one wording of
// kvTypeHeadDimMultiple's rule, which a model's load, a K/V pool, the op bench and the GPU's K/V
// write each prefix with what refused it.
inline std::string kvHeadDimProblem(KvType t, int headDim) {
  if (headDim % kvTypeHeadDimMultiple(t) == 0) return "";
  return std::string(kvTypeName(t)) + " needs a head size that is a multiple of " + std::to_string(kvTypeHeadDimMultiple(t)) +
         ", not " + std::to_string(headDim) + " (f32 takes any head size)";
}
inline bool parseKvType(const char* name, KvType& out) {
  for (int i = 0; i < kKvTypeCount; ++i)
    if (std::strcmp(name, kvTypeName((KvType)i)) == 0) {
      out = (KvType)i;
      return true;
    }
  return false;
}

// The geometry of the paged cache (kv_pool.h has the whole picture).
struct KvLayout {
  int slots = 0, kvDim = 0, kvHeads = 1, pageTokens = 16;
  KvType type = KvType::F32;
  int headDim() const { return kvDim / kvHeads; }
  int64_t rowBytes() const { return (int64_t)kvDim * kvTypeBits(type) / 8; }
  int64_t scaleBytes() const { return kvTypeScaled(type) ? (int64_t)pageTokens * kvHeads * 4 : 0; }
  int64_t slotBytes() const { return (2 * pageTokens * rowBytes() + scaleBytes() + 15) / 16 * 16; }
  int64_t pageBytes() const { return slots * slotBytes(); }
  // Byte offset in the pool of K (v = 0) or V (v = 1) codes of `slot` at offset `off` of `page`.
  int64_t codeOffset(int page, int slot, int v, int off) const {
    return (int64_t)page * pageBytes() + slot * slotBytes() + ((int64_t)v * pageTokens + off) * rowBytes();
  }
  // Byte offset of the (K, V) scale word of K/V head `kvh` at offset `off` (scaled types).
  int64_t scaleOffset(int page, int slot, int off, int kvh) const {
    return (int64_t)page * pageBytes() + slot * slotBytes() + 2 * pageTokens * rowBytes() + ((int64_t)off * kvHeads + kvh) * 4;
  }
};

// ---- bit-exact conversions (the same code on the host and the device) ---------------------------

LCKV_HD uint32_t kvFloatBits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
LCKV_HD float kvBitsFloat(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// m >> shift rounded to nearest, ties to even (shift 1 to 31).
LCKV_HD uint32_t kvRoundShift(uint32_t m, int shift) {
  const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

// Round to nearest even; NaN stays NaN.
LCKV_HD uint16_t kvF32ToBf16(float f) {
  const uint32_t x = kvFloatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
LCKV_HD float kvBf16ToF32(uint16_t b) { return kvBitsFloat((uint32_t)b << 16); }

// IEEE half, round to nearest even (for the scales).
LCKV_HD uint16_t kvF32ToF16(float f) {
  uint32_t x = kvFloatBits(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);  // inf, NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and above round to inf
  if (x < 0x38800000u) {                         // below 2^-14: a subnormal half, units of 2^-24
    const int e = (int)(x >> 23);
    const int shift = 126 - e;
    if (shift > 24) return sign;  // below 2^-25
    return sign | (uint16_t)kvRoundShift((x & 0x7fffffu) | 0x800000u, shift);
  }
  return sign | (uint16_t)kvRoundShift(x - 0x38000000u, 13);  // exponent rebiased from 127 to 15
}
LCKV_HD float kvF16ToF32(uint16_t h) {
#ifdef __CUDA_ARCH__
  // One conversion instruction, exact for every finite half and infinity (the bit rule below
  // gives the same float); NaN payloads may differ, and no scale is ever NaN (kvScaleOf).
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = (float)m * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return kvBitsFloat(sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13)));
#endif
}

// FP8 e4m3fn (bias 7, no infinities, largest finite 448; 0x7f and 0xff are NaN), round to
// nearest even, saturating finite values; a NaN stays NaN (kvEncode never passes one).
LCKV_HD uint8_t kvF32ToE4m3(float f) {
  uint32_t x = kvFloatBits(f);
  const uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7fu;    // NaN
  if (x >= 0x43e00000u) return sign | 0x7eu;   // 448 and above (infinity too) saturate to 448
  if (x < 0x3c800000u) {                        // below 2^-6: subnormal, units of 2^-9
    const int e = (int)(x >> 23);
    const int shift = 141 - e;
    if (shift > 24) return sign;
    return sign | (uint8_t)kvRoundShift((x & 0x7fffffu) | 0x800000u, shift);
  }
  const uint32_t q = kvRoundShift(x - (120u << 23), 20);  // exponent rebiased from 127 to 7
  return sign | (uint8_t)(q > 0x7eu ? 0x7eu : q);
}
LCKV_HD float kvE4m3ToF32(uint8_t c) {
  const uint32_t e = (c >> 3) & 0xfu, m = c & 7u;
  if ((c & 0x7fu) == 0x7fu) return kvBitsFloat(0x7fc00000u);  // e4m3fn's NaN (the exponent and mantissa all ones)
  const float v = e == 0 ? (float)m * 0.001953125f : kvBitsFloat(((e + 120u) << 23) | (m << 20));
  return (c & 0x80u) ? -v : v;
}

// ---- the quantization rule ---------------------------------------------------------------------

// The f16 scale of a head whose largest |value| is amax (scaled types).
// Capped at f16's largest finite value: a head whose values reach past codeMax x 65504 (an
// overflowing activation, say) saturates its codes instead of getting an infinite scale, which
// would decode every value of the head, zeros included, as inf or NaN.
LCKV_HD uint16_t kvScaleOf(KvType t, float amax) { return kvF32ToF16(fminf(amax / kvTypeCodeMax(t), 65504.0f)); }

// The code of x (its low kvTypeBits(t) bits), with the scale already widened to f32.
LCKV_HD uint32_t kvEncode(KvType t, float x, float scale) {
  if (t == KvType::F32) return kvFloatBits(x);
  if (t == KvType::BF16) return kvF32ToBf16(x);
  const float m = kvTypeCodeMax(t);
  // fminf/fmaxf drop a NaN: it clamps to +m (for fp8 too, whose NaN codes are never written).
  const float y = fmaxf(-m, fminf(m, scale > 0.0f ? x / scale : 0.0f));
  if (t == KvType::FP8) return kvF32ToE4m3(y);
  return (uint32_t)(int)rintf(y) & (t == KvType::INT4 ? 0xfu : 0xffu);
}
LCKV_HD float kvDecode(KvType t, uint32_t code, float scale) {
  switch (t) {
    case KvType::F32: return kvBitsFloat(code);
    case KvType::BF16: return kvBf16ToF32((uint16_t)code);
    case KvType::FP8: return kvE4m3ToF32((uint8_t)code) * scale;
    case KvType::INT8: return (float)(int8_t)(uint8_t)code * scale;
    case KvType::INT4: return (float)(((int32_t)(code << 28)) >> 28) * scale;
  }
  return 0.0f;
}

// Channel i's code in a head's code bytes (little-endian for the 16- and 32-bit types), and the
// write of one.
LCKV_HD uint32_t kvCodeAt(KvType t, const uint8_t* codes, int i) {
  switch (t) {
    case KvType::F32: return (uint32_t)codes[4 * i] | (uint32_t)codes[4 * i + 1] << 8 | (uint32_t)codes[4 * i + 2] << 16 |
                             (uint32_t)codes[4 * i + 3] << 24;
    case KvType::BF16: return (uint32_t)codes[2 * i] | (uint32_t)codes[2 * i + 1] << 8;
    case KvType::INT4: return (codes[i >> 1] >> ((i & 1) * 4)) & 0xfu;
    default: return codes[i];
  }
}

// Quantizes one head's values x[headDim] into `codes` (headDim * bits / 8 bytes) and returns
// its f16 scale (0 for unscaled types): the reference of the kernels' K/V write.
inline uint16_t kvQuantizeHead(KvType t, const float* x, int headDim, uint8_t* codes) {
  float amax = 0.0f;
  for (int i = 0; i < headDim; ++i) amax = fmaxf(amax, fabsf(x[i]));
  const uint16_t scale = kvTypeScaled(t) ? kvScaleOf(t, amax) : 0;
  const float s = kvF16ToF32(scale);
  const int bytes = headDim * kvTypeBits(t) / 8;
  if (t == KvType::INT4) std::memset(codes, 0, (size_t)bytes);
  for (int i = 0; i < headDim; ++i) {
    const uint32_t c = kvEncode(t, x[i], s);
    switch (t) {
      case KvType::F32: std::memcpy(codes + 4 * i, &c, 4); break;
      case KvType::BF16: codes[2 * i] = (uint8_t)c, codes[2 * i + 1] = (uint8_t)(c >> 8); break;
      case KvType::INT4: codes[i >> 1] |= (uint8_t)(c << ((i & 1) * 4)); break;
      default: codes[i] = (uint8_t)c;
    }
  }
  return scale;
}

// Decodes K (v = 0) or V (v = 1) of page offset `off` from the bytes of one page's slot (its
// codes from slotOffset on, scales included) into out[kvDim]: how a backend reads the cache back.
inline void kvDecodeRow(const KvLayout& L, const uint8_t* slotBlock, int v, int off, float* out) {
  const int hd = L.headDim();
  const int64_t headBytes = (int64_t)hd * kvTypeBits(L.type) / 8;
  const uint8_t* codes = slotBlock + ((int64_t)v * L.pageTokens + off) * L.rowBytes();
  const uint8_t* scales = slotBlock + 2 * L.pageTokens * L.rowBytes() + (int64_t)off * L.kvHeads * 4;
  for (int h = 0; h < L.kvHeads; ++h) {
    float s = 0.0f;
    if (kvTypeScaled(L.type)) {
      uint16_t bits;
      std::memcpy(&bits, scales + 4 * h + 2 * v, 2);
      s = kvF16ToF32(bits);
    }
    for (int i = 0; i < hd; ++i) out[h * hd + i] = kvDecode(L.type, kvCodeAt(L.type, codes + h * headBytes, i), s);
  }
}

}  // namespace lckv
