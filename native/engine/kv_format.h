// The K/V cache's value types, the byte layout of a page, and the quantization rule: one
// description that the CPU backend and the CUDA kernels both compile (host and device code), so
// that they write the same codes and scales bit for bit and read them at the same addresses.
//
// Types (kvCacheDtype): f32; bf16 (round to nearest even); two types that keep one f16 scale per
// (token, K/V head) for K and one for V:
//   fp8  (e4m3fn, saturating): code = e4m3(x / s), s = amax / 448
//   int8 (symmetric):        code = rint(x / s) in [-127, 127], s = amax / 127
// and int4, which follows KIVI: keys per channel over a page, values per token, and the page
// being written kept in bf16 until it is full (below):
//   int4 (symmetric):        code = rint(x / s) in [-7, 7], s = amax / 7; two codes a byte,
//                            the even channel in the low nibble
// where amax is the largest |x| of the values a scale covers and s is rounded to f16 before the
// codes are computed with it (a zero scale gives zero codes). A value reads back as code * s.
// x / s is clamped to [-codeMax, codeMax] first, a NaN to +codeMax, so no scaled type writes a
// NaN: e4m3fn has no infinity and spends 0x7f and 0xff on NaN, which is how the GPU's conversion
// (cvt.rn.f16x2.e4m3x2) and kvE4m3ToF32 read them. fp8 and int8 scale a (token, head): a K/V
// write stays one pass fused with RoPE and a page is final as soon as its row is written.
//
// int4 (kvTypeChannelKeys): a K/V head's keys get one scale per channel and page, over the
// page's pageTokens tokens; its values one scale per token (docs/quality.md, "Scale layouts":
// +0.3% perplexity on the default model, against +2% for per-token keys). A channel's scale
// needs the whole page, so each sequence keeps a residual: the bf16 K and V of the page being
// written, the page that holds the position last written. Rows are written there (rounded to
// bf16); the write of a page's last row quantizes the page from the residual's bf16 values
// (keys per channel, values per token) into its pool page. The rule of what a query reads:
//   a query whose last visible key is `last` (its position, or the one before for a strict
//   layer) reads every page wholly at or below `last` from its quantized pool page, and the
//   keys of the page of `last` from the residual unless that page is complete (its last row is
//   `last`).
// So a full page is read quantized once its last row is written, and the page being written in
// bf16: what the PyTorch fake quantization (scripts/eval/kv_layer_types.py, `int4:kpage`)
// computes token by token. It follows that the rows of one sequence in one K/V write or one
// attention call lie in one page (the engine prefills such a cache a page at a time). Reading
// the cache back (kvRead: the fixed-point check, a context shift) takes the residual's page from
// the residual, which keeps a page it has just quantized until the next page is written.
//
// A page holds pageTokens positions of every KV slot of the plan:
//
//   page = [slot] { K codes [pageTokens][rowBytes] | V codes [pageTokens][rowBytes] | scales }
//   (each slot's block 16-byte aligned), the scales being
//     fp8, int8:  [pageTokens][kvHeads] x (f16 K scale, f16 V scale)
//     int4:       K [kvDim] f16 (channel c of head h at h * headDim + c) | V [pageTokens][kvHeads] f16
//
// rowBytes = kvDim * bits / 8. A K/V head's codes of one token are contiguous; an fp8/int8 head's
// two scales are one 32-bit word, so a kernel copies a key's scales with one 4-byte load. For f32
// this is exactly the float layout [slot][K | V][pageTokens][kvDim] of before.
//
// The residual lives in pool pages too: residualParts() pages, each holding the bf16 rows of
// residualTokensPerPart() consecutive positions of the page (a power of two that fits a slot's
// block), at the same slot offsets as a page:
//
//   residual part j, slot block = K bf16 [tokensPerPart][kvDim] | V bf16 [tokensPerPart][kvDim]
//
// so residual row `off` of a sequence is in its part off / tokensPerPart. The parts are ordinary
// pages of the pool (counted, shared by fork and copied before a write like any page), which
// keeps one allocator and one admission count. For the default model (3 KV layers, 4 K/V heads
// of 32) an int4 page is 16 x 456 bytes and the residual 4 of them (28.5 KiB a sequence): 6.74
// times f32's tokens in the same memory, 6.5 times from about 1,750 tokens a sequence.
//
// Every cache operation follows from the rule. Fork shares the residual with the pages; the
// first write of either copies it (copy-on-write). Truncating to n keeps the residual when the
// page of n is the residual's (or n starts a page); truncating into an earlier, quantized page is
// lossy once: the next write first reads that page's surviving rows back from their codes into
// the residual (KvPages::residualStale, Model::moveResidual). The prefix cache therefore rewinds
// a shared sequence only to a point where truncation keeps the K/V exact (KvPages::exactRewind).
// A context shift re-rotates the moved keys and writes them back a page at a time through the
// residual, which ends holding the last page. A step run ahead never starts a new page (that
// would overwrite the residual's rows of the page before it, which a rewind may need).
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
// Keys scaled per channel over a page, values per token, the page being written kept in a bf16
// residual (KIVI; see above).
LCKV_HD constexpr bool kvTypeChannelKeys(KvType t) { return t == KvType::INT4; }
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
  LCKV_HD int headDim() const { return kvDim / kvHeads; }
  LCKV_HD int64_t rowBytes() const { return (int64_t)kvDim * kvTypeBits(type) / 8; }
  LCKV_HD int64_t scaleBytes() const {
    if (kvTypeChannelKeys(type)) return (int64_t)kvDim * 2 + (int64_t)pageTokens * kvHeads * 2;
    return kvTypeScaled(type) ? (int64_t)pageTokens * kvHeads * 4 : 0;
  }
  LCKV_HD int64_t slotBytes() const { return (2 * pageTokens * rowBytes() + scaleBytes() + 15) / 16 * 16; }
  LCKV_HD int64_t pageBytes() const { return slots * slotBytes(); }
  // The position just past the page of `pos` (where a write that goes a page at a time stops).
  LCKV_HD int pageEnd(int pos) const { return (pos / pageTokens + 1) * pageTokens; }
  // Byte offset in the pool of K (v = 0) or V (v = 1) codes of `slot` at offset `off` of `page`.
  LCKV_HD int64_t codeOffset(int page, int slot, int v, int off) const {
    return (int64_t)page * pageBytes() + slot * slotBytes() + ((int64_t)v * pageTokens + off) * rowBytes();
  }
  // Byte offset of the (K, V) scale word of K/V head `kvh` at offset `off` (fp8, int8).
  LCKV_HD int64_t scaleOffset(int page, int slot, int off, int kvh) const {
    return (int64_t)page * pageBytes() + slot * slotBytes() + 2 * pageTokens * rowBytes() + ((int64_t)off * kvHeads + kvh) * 4;
  }
  // Channel-key types: the f16 K scale of channel `channel` (of all kvDim), and the f16 V scale
  // of K/V head `kvh` at offset `off`.
  LCKV_HD int64_t keyScaleOffset(int page, int slot, int channel) const {
    return (int64_t)page * pageBytes() + slot * slotBytes() + 2 * pageTokens * rowBytes() + (int64_t)channel * 2;
  }
  LCKV_HD int64_t valueScaleOffset(int page, int slot, int off, int kvh) const {
    return (int64_t)page * pageBytes() + slot * slotBytes() + 2 * pageTokens * rowBytes() + (int64_t)kvDim * 2 +
           ((int64_t)off * kvHeads + kvh) * 2;
  }
  // The residual (channel-key types): positions per residual part, the largest power of two up
  // to pageTokens whose bf16 K and V rows fit a slot's block (0: none fits, a page too small for
  // the type), and the parts a residual takes (0 for the other types).
  LCKV_HD int residualTokensPerPart() const {
    if (!kvTypeChannelKeys(type)) return 0;
    int t = pageTokens;
    while (t > 0 && 2 * (int64_t)t * kvDim * 2 > slotBytes()) t /= 2;
    return t;
  }
  LCKV_HD int residualParts() const {
    const int t = residualTokensPerPart();
    return t > 0 ? pageTokens / t : 0;
  }
  // Byte offset of the bf16 K (v = 0) or V row at offset `off` of `slot` in the residual whose
  // parts (pool pages) are parts[0 .. residualParts()).
  LCKV_HD int64_t residualOffset(const int32_t* parts, int slot, int v, int off) const {
    const int t = residualTokensPerPart();
    return (int64_t)parts[off / t] * pageBytes() + slot * slotBytes() + ((int64_t)v * t + off % t) * kvDim * 2;
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

// Writes code c of channel i into a head's code bytes (which an int4 write must have zeroed).
LCKV_HD void kvPutCode(KvType t, uint8_t* codes, int i, uint32_t c) {
  switch (t) {
    case KvType::F32:
      for (int b = 0; b < 4; ++b) codes[4 * i + b] = (uint8_t)(c >> (8 * b));
      break;
    case KvType::BF16: codes[2 * i] = (uint8_t)c, codes[2 * i + 1] = (uint8_t)(c >> 8); break;
    case KvType::INT4: codes[i >> 1] |= (uint8_t)(c << ((i & 1) * 4)); break;
    default: codes[i] = (uint8_t)c;
  }
}

// Quantizes one head's values x[headDim] into `codes` (headDim * bits / 8 bytes) and returns
// its f16 scale (0 for unscaled types): the reference of the kernels' K/V write (all types but
// the channel-key ones, which kvQuantizePage quantizes a page at a time).
inline uint16_t kvQuantizeHead(KvType t, const float* x, int headDim, uint8_t* codes) {
  float amax = 0.0f;
  for (int i = 0; i < headDim; ++i) amax = fmaxf(amax, fabsf(x[i]));
  const uint16_t scale = kvTypeScaled(t) ? kvScaleOf(t, amax) : 0;
  const float s = kvF16ToF32(scale);
  if (t == KvType::INT4) std::memset(codes, 0, (size_t)headDim * kvTypeBits(t) / 8);
  for (int i = 0; i < headDim; ++i) kvPutCode(t, codes, i, kvEncode(t, x[i], s));
  return scale;
}

// Quantizes a full page of a channel-key type from its residual: k and v are the page's bf16
// rows [pageTokens][kvDim] (as bits); writes the codes and scales of one slot into slotBlock
// (the bytes of the page from the slot's codeOffset on). Keys: one scale per channel, over the
// page's tokens; values: one per token and head (kvQuantizeHead). The reference of the kernels'.
inline void kvQuantizePage(const KvLayout& L, const uint16_t* k, const uint16_t* v, uint8_t* slotBlock) {
  const int P = L.pageTokens, D = L.kvDim, hd = L.headDim();
  const int64_t rowBytes = L.rowBytes(), headBytes = (int64_t)hd * kvTypeBits(L.type) / 8;
  uint8_t* kScales = slotBlock + 2 * P * rowBytes;
  uint8_t* vScales = kScales + (int64_t)D * 2;
  std::memset(slotBlock, 0, (size_t)(P * rowBytes));
  for (int c = 0; c < D; ++c) {
    float amax = 0.0f;
    for (int t = 0; t < P; ++t) amax = fmaxf(amax, fabsf(kvBf16ToF32(k[(int64_t)t * D + c])));
    const uint16_t scale = kvScaleOf(L.type, amax);
    std::memcpy(kScales + 2 * c, &scale, 2);
    const float s = kvF16ToF32(scale);
    for (int t = 0; t < P; ++t) kvPutCode(L.type, slotBlock + t * rowBytes, c, kvEncode(L.type, kvBf16ToF32(k[(int64_t)t * D + c]), s));
  }
  std::memset(slotBlock + P * rowBytes, 0, (size_t)(P * rowBytes));
  for (int t = 0; t < P; ++t)
    for (int h = 0; h < L.kvHeads; ++h) {
      const uint16_t* x = v + (int64_t)t * D + h * hd;
      float amax = 0.0f;
      for (int i = 0; i < hd; ++i) amax = fmaxf(amax, fabsf(kvBf16ToF32(x[i])));
      const uint16_t scale = kvScaleOf(L.type, amax);
      std::memcpy(vScales + ((int64_t)t * L.kvHeads + h) * 2, &scale, 2);
      const float s = kvF16ToF32(scale);
      uint8_t* codes = slotBlock + (P + t) * rowBytes + h * headBytes;
      for (int i = 0; i < hd; ++i) kvPutCode(L.type, codes, i, kvEncode(L.type, kvBf16ToF32(x[i]), s));
    }
}

// Decodes K (v = 0) or V (v = 1) of page offset `off` from the bytes of one page's slot (its
// codes from slotOffset on, scales included) into out[kvDim]: how a backend reads the cache back.
// (A channel-key type's page being written is read from the residual instead: kvDecodeResidualRow.)
LCKV_HD void kvDecodeRow(const KvLayout& L, const uint8_t* slotBlock, int v, int off, float* out) {
  const int hd = L.headDim();
  const int64_t headBytes = (int64_t)hd * kvTypeBits(L.type) / 8;
  const uint8_t* codes = slotBlock + ((int64_t)v * L.pageTokens + off) * L.rowBytes();
  const uint8_t* scales = slotBlock + 2 * L.pageTokens * L.rowBytes();
  const bool channelKeys = kvTypeChannelKeys(L.type);
  for (int h = 0; h < L.kvHeads; ++h) {
    // The f16 scales as kvCodeAt reads a bf16 code: two little-endian bytes (any alignment).
    float s = 0.0f;
    if (channelKeys && v == 1) {
      s = kvF16ToF32((uint16_t)kvCodeAt(KvType::BF16, scales + (int64_t)L.kvDim * 2, off * L.kvHeads + h));
    } else if (kvTypeScaled(L.type) && !channelKeys) {
      s = kvF16ToF32((uint16_t)kvCodeAt(KvType::BF16, scales + (int64_t)off * L.kvHeads * 4 + 4 * h + 2 * v, 0));
    }
    for (int i = 0; i < hd; ++i) {
      if (channelKeys && v == 0) s = kvF16ToF32((uint16_t)kvCodeAt(KvType::BF16, scales, h * hd + i));
      out[h * hd + i] = kvDecode(L.type, kvCodeAt(L.type, codes + h * headBytes, i), s);
    }
  }
}

// Decodes the bf16 row of K (v = 0) or V at residual offset `off` of `slot` into out[kvDim];
// pool is the pool's bytes, parts the residual's pages.
LCKV_HD void kvDecodeResidualRow(const KvLayout& L, const uint8_t* pool, const int32_t* parts, int slot, int v, int off,
                                float* out) {
  const uint8_t* row = pool + L.residualOffset(parts, slot, v, off);
  for (int i = 0; i < L.kvDim; ++i) out[i] = kvDecode(KvType::BF16, kvCodeAt(KvType::BF16, row, i), 0.0f);
}

}  // namespace lckv
