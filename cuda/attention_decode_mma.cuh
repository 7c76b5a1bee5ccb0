// Decode attention over a compact K/V cache (bf16, fp8, int8, int4) on the tensor cores: the
// same split-K flash-decoding as attention_decode.cuh (one block per row, K/V head and split,
// serving up to 8 query heads of the K/V head's group; partial results merged by the same
// kernel), for head sizes 32, 64 and 128. int4 (K scales per channel of a page, kv_format.h)
// takes it for its complete pages (DecodeKeys::CompletePages); the partial page's keys come from
// the bf16 residual through the CUDA-core kernel, into the same split-K workspace (attention.cu).
//
// Why tensor cores: with GQA a key is dotted with 8 queries, and a compact type brings 2 to 8
// times the keys per byte that f32 does. Scored on the CUDA cores, an int4 tile needs ~16 FMAs
// and its decoding per byte read, several times what the memory system delivers per cycle
// (measured: the CUDA-core kernel reached 6-9% of the copy bandwidth at int4, 38% at bf16).
// mma.sync m16n8k16 does a warp's 16 keys x 8 heads x 16 channels in one instruction.
//
// The layout of the products:
// - Scores: S[16 rows x 8 keys] = Q[16 x 16 channels] . K^T, per k-step of 16 channels. Rows
//   0-7 are the 8 query heads' high parts and rows 8-15 their low parts (q = hi + lo, each exact
//   in the mma's 16-bit type), so a score is row g + row g + 8: the queries keep ~22 bits in f16,
//   and no row of the mma is wasted on a group of 8 heads. bf16 (8-bit mantissas) takes a third
//   part in a second mma (rows 0-7 only), for f32's 24 bits: two parts (16 bits) measured near
//   the 1e-5 the op checks allow.
// - Output: O[16 x 8 dims] += P[16 x 16 keys] . V, with the probabilities split the same way.
//   P's A fragment is made of the thread's own score registers (no shuffle, no shared memory).
// - Codes enter the mma as exact 16-bit numbers: bf16 as stored; int8, int4 and e4m3 as f16
//   (every code is exactly an f16). The per-key scales stay out of the mma: K's multiplies the
//   score; V's enters the weights through a second running maximum (m2 over score + log(scale)),
//   so the f16 weights stay in (0, 1] whatever the scales' range (a V scale folded into the
//   weight directly would underflow f16 for small scales).
// - int4's K scales are per channel of a page, so they cannot multiply a score. A warp's 16 keys
//   of a tile lie in one page: the launch's chunks start at multiples of 16 keys (the first one
//   rounded down, its keys before the first visible one masked like those past the end), and
//   pages hold 16 or more. The warp multiplies its keys' codes by their channels' scales in f16,
//   each product split exactly into a high and a low f16 (mmaChannelScaleKeys), and scores both
//   parts: 2 mma per k-step and 8 keys (as bf16's third query part), and 2 f16 operations per
//   pair of codes. (Folding the scales into the query instead, q_c s_c for each page, takes per
//   thread and page kDim / 4 products, a power of two to keep them in f16's range and their
//   hi/lo splits: about twice the instructions, counted, not timed.) V keeps its scale per key,
//   as int8's, from the page's array of f16 V scales.
// - The channel of a k index is free (Q and K only need the same one), and so is the dim of an
//   output column: each type picks the order in which its codes unpack cheapest (kChannel,
//   kOutDim). bf16 keys load with ldmatrix, bf16 values with ldmatrix.trans; 8- and 4-bit keys
//   load with ldmatrix too (a 16-byte row piece is 16 or 32 channels), and 8- and 4-bit values
//   as row chunks whose bytes of two keys are interleaved with prmt (no transposing load exists
//   for 8-bit elements).
// - Shared-memory rows are an odd number of 16-byte pieces apart: the 8 rows of an ldmatrix
//   matrix, and the 4 rows x 8 chunks of a value load, then hit distinct banks.
// - Each of the 4 warps takes 16 keys of every 64-key tile and keeps its own softmax state; the
//   warps' results are merged at the end. A tile costs one barrier: the one that says it has
//   arrived also says the stage before it is free for the next load.
// - Scores, maxima and log V scales are in log2 units (the queries carry log2 e with the softmax
//   scale, as the prefill kernels' do), so each weight and rescale is one exp2 (exp2Ftz), not
//   expf's longer accurate sequence; a split's maximum goes to the split-K merge in natural-log
//   units.
#pragma once
#include <cuda_fp16.h>

#include "attention_common.cuh"
#include "mma.cuh"

namespace lckv::cuda {

namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaWarpKeys = 16;                        // a warp's keys of a tile (the mma's k = 16)
constexpr int kMmaTileKeys = kMmaWarpKeys * kMmaWarps;  // 64
constexpr int kMmaHeads = 8;                            // query heads per block (the mma's n = 8 rows of hi parts)

// Whether a type's codes enter the mma as f16 (scaled types) or bf16.
template <KvType T>
__host__ __device__ constexpr bool mmaCodesF16() { return T != KvType::BF16; }
// The head sizes the kernel takes (exactly; other sizes use the CUDA-core kernel).
__host__ __device__ constexpr bool mmaDecodeHeadDim(int d) { return d == 32 || d == 64 || d == 128; }
// Bytes of one key's codes of one head, and the shared-memory row stride: an odd number of
// 16-byte pieces (see above).
__host__ __device__ constexpr int mmaRowBytes(KvType t, int d) { return d * kvTypeBits(t) / 8; }
__host__ __device__ constexpr int mmaRowStride(KvType t, int d) { return 16 * ((mmaRowBytes(t, d) / 16) | 1); }
// Tiles in flight: about 32 KB of codes per block (as the f32 kernel keeps), 2 to 8 tiles.
__host__ __device__ constexpr int mmaStages(KvType t, int d) {
  const int bytes = 2 * kMmaTileKeys * mmaRowBytes(t, d);
  return bytes >= 16384 ? 2 : 32768 / bytes > 8 ? 8 : 32768 / bytes;
}
// A stage: the K rows, the V rows, a scale word per key and, for a channel-key type (int4), each
// warp's page's K scales (kMmaWarps x d f16).
__host__ __device__ constexpr int mmaChannelScaleBytes(KvType t, int d) { return kvTypeChannelKeys(t) ? kMmaWarps * d * 2 : 0; }
__host__ __device__ constexpr size_t mmaStageBytes(KvType t, int d) {
  return (size_t)2 * kMmaTileKeys * mmaRowStride(t, d) + 4 * kMmaTileKeys + mmaChannelScaleBytes(t, d);
}
// The tiles, or (after the last tile) the warps' outputs [warps][heads][d] floats, their
// maxima, sums and weights, and each head's maximum and sum.
__host__ __device__ constexpr size_t mmaDecodeSmemBytes(KvType t, int d) {
  const size_t tiles = mmaStages(t, d) * mmaStageBytes(t, d);
  const size_t reduce = sizeof(float) * (kMmaWarps * kMmaHeads * (d + 3) + 2 * kMmaHeads);
  return tiles > reduce ? tiles : reduce;
}

// ---- codes to exact f16 pairs -----------------------------------------------------------------
// An f16 whose exponent puts an integer u's unit in the mantissa's lowest bits is 1024 + u
// (u < 1024; 0x6400) or, for u in bits 4-7, 64 + u (0x5400). Flipping a signed code's top bit
// makes it u = code + 128 (int8) or code + 8 (int4); one subtraction then leaves the code.
__device__ __forceinline__ __half2 bitsHalf2(uint32_t x) { return *reinterpret_cast<const __half2*>(&x); }
__device__ __forceinline__ uint32_t half2Bits(__half2 x) { return *reinterpret_cast<const uint32_t*>(&x); }
__device__ __forceinline__ uint32_t hsub2Bits(uint32_t x, uint32_t y) { return half2Bits(__hsub2(bitsHalf2(x), bitsHalf2(y))); }
// (x & mask) ^ flip as one LOP3: written in C++, the compiler gives each constant its own LOP3
// (an instruction takes one immediate), two where one does with the other in a register.
__device__ __forceinline__ uint32_t andXor(uint32_t x, uint32_t mask, uint32_t flip) {
  uint32_t y;
  asm("lop3.b32 %0, %1, %2, %3, 0x6a;" : "=r"(y) : "r"(x), "r"(mask), "r"(flip));  // (a & b) ^ c
  return y;
}
// Bytes 0 and 2 of x (int8 codes) as an f16 pair.
__device__ __forceinline__ uint32_t int8PairF16(uint32_t x) {
  return hsub2Bits(andXor(x, 0x00ff00ffu, 0x64806480u), 0x64806480u);  // 0x6480 = 1152
}
// Nibbles 0 and 4 (low) or 1 and 5 (high) of x (int4 codes) as an f16 pair.
__device__ __forceinline__ uint32_t int4LowPairF16(uint32_t x) {
  return hsub2Bits(andXor(x, 0x000f000fu, 0x64086408u), 0x64086408u);  // 1032
}
__device__ __forceinline__ uint32_t int4HighPairF16(uint32_t x) {
  return hsub2Bits(andXor(x, 0x00f000f0u, 0x54805480u), 0x54805480u);  // 72
}
// Bytes 0 and 1 (lo) and bytes 2 and 3 (hi) of x (e4m3 codes) as f16 pairs: one instruction a
// pair on sm_89 and later, each reading its half of x in place (no shift); every e4m3 value is
// exactly an f16.
__device__ __forceinline__ void e4m3QuadF16(uint32_t x, uint32_t& lo, uint32_t& hi) {
#if __CUDA_ARCH__ >= 890
  asm("{ .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
#else
  lo = packPair<true>(kvE4m3ToF32((uint8_t)x), kvE4m3ToF32((uint8_t)(x >> 8)));
  hi = packPair<true>(kvE4m3ToF32((uint8_t)(x >> 16)), kvE4m3ToF32((uint8_t)(x >> 24)));
#endif
}

// The channel of k index (2t + (j & 1) + 8 (j >> 1)) in k-step s for thread column t: the order
// in which each type's key words unpack (see mmaKeyFragments).
template <KvType T>
__device__ __forceinline__ int kChannel(int s, int t, int j) {
  if constexpr (T == KvType::BF16) return 16 * s + 2 * t + (j & 1) + 8 * (j >> 1);
  else if constexpr (T == KvType::FP8) return 16 * s + 4 * t + j;
  else if constexpr (T == KvType::INT8) return 16 * s + 4 * t + 2 * (j & 1) + (j >> 1);
  else return 32 * (s >> 1) + 8 * t + 2 * (s & 1) + 4 * (j & 1) + (j >> 1);  // INT4
}
// The head dim of output column `col` (0-7) of n-block j.
template <KvType T, int kDim>
__device__ __forceinline__ int kOutDim(int j, int col) {
  if constexpr (T == KvType::BF16) return 8 * j + col;
  else return col * (kDim / 8) + j;
}

// The key fragments (B of the scores) of one warp's 16 keys, for every k-step: b[s][nb][0..1]
// for the keys 8 nb .. 8 nb + 7. kRows: the K tile's rows of the warp's keys.
template <KvType T, int kDim>
__device__ __forceinline__ void mmaKeyFragments(const uint8_t* kRows, int stride, uint32_t (&b)[kDim / 16][2][2]) {
  const int lane = threadIdx.x & 31, mi = lane >> 3, r = lane & 7;
  if constexpr (T == KvType::BF16) {
    // k-step s: pieces 2s, 2s + 1 (8 channels each); matrices (nb0, 2s) (nb0, 2s+1) (nb1, 2s) (nb1, 2s+1).
#pragma unroll
    for (int s = 0; s < kDim / 16; ++s) {
      uint32_t w[4];
      ldmatrixX4(w, kRows + (8 * (mi >> 1) + r) * stride + 16 * (2 * s + (mi & 1)));
      b[s][0][0] = w[0], b[s][0][1] = w[1], b[s][1][0] = w[2], b[s][1][1] = w[3];
    }
  } else if constexpr (T == KvType::INT8 || T == KvType::FP8) {
    // A piece is 16 channels, one k-step: matrices (nb0, s) (nb1, s) (nb0, s+1) (nb1, s+1).
#pragma unroll
    for (int s = 0; s < kDim / 16; s += 2) {
      uint32_t w[4];
      ldmatrixX4(w, kRows + (8 * (mi & 1) + r) * stride + 16 * (s + (mi >> 1)));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t& b0 = b[s + (i >> 1)][i & 1][0];
        uint32_t& b1 = b[s + (i >> 1)][i & 1][1];
        if constexpr (T == KvType::INT8) {
          b0 = int8PairF16(w[i]);       // channels 4t, 4t + 2
          b1 = int8PairF16(w[i] >> 8);  // 4t + 1, 4t + 3
        } else {
          e4m3QuadF16(w[i], b0, b1);  // 4t, 4t + 1 and 4t + 2, 4t + 3
        }
      }
    }
  } else {
    // INT4: a piece is 32 channels, two k-steps; word t holds channels 8t .. 8t + 7.
    constexpr int kPieces = kDim / 32;
    if constexpr (kPieces == 1) {
      uint32_t w[2];
      ldmatrixX2(w, kRows + (8 * (mi & 1) + r) * stride);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        b[0][nb][0] = int4LowPairF16(w[nb]);
        b[0][nb][1] = int4HighPairF16(w[nb]);
        b[1][nb][0] = int4LowPairF16(w[nb] >> 8);
        b[1][nb][1] = int4HighPairF16(w[nb] >> 8);
      }
    } else {
#pragma unroll
      for (int p = 0; p < kPieces; p += 2) {
        uint32_t w[4];
        ldmatrixX4(w, kRows + (8 * (mi & 1) + r) * stride + 16 * (p + (mi >> 1)));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int s = 2 * (p + (i >> 1)), nb = i & 1;
          b[s][nb][0] = int4LowPairF16(w[i]);
          b[s][nb][1] = int4HighPairF16(w[i]);
          b[s + 1][nb][0] = int4LowPairF16(w[i] >> 8);
          b[s + 1][nb][1] = int4HighPairF16(w[i] >> 8);
        }
      }
    }
  }
}

// Words of a row chunk of kBytes (2, 4, 8, 16 or 32) from shared memory.
template <int kBytes>
__device__ __forceinline__ void loadChunk(const uint8_t* p, uint32_t (&w)[(kBytes + 3) / 4]) {
  if constexpr (kBytes == 2) {
    w[0] = *reinterpret_cast<const uint16_t*>(p);
  } else if constexpr (kBytes == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (kBytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  }
}

// The value fragments (B of the output) of one warp's 16 keys, for every n-block j of 8 dims:
// b[j][0] holds keys 2t, 2t + 1 and b[j][1] keys 2t + 8, 2t + 9, of dim kOutDim(j, g).
template <KvType T, int kDim>
__device__ __forceinline__ void mmaValueFragments(const uint8_t* vRows, int stride, uint32_t (&b)[kDim / 8][2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if constexpr (T == KvType::BF16) {
    // Matrices (keys 0-7, piece c) (keys 8-15, c) (keys 0-7, c+1) (keys 8-15, c+1), transposed.
    const int mi = lane >> 3, r = lane & 7;
#pragma unroll
    for (int c = 0; c < kDim / 8; c += 2) {
      uint32_t w[4];
      ldmatrixX4Trans(w, vRows + (8 * (mi & 1) + r) * stride + 16 * (c + (mi >> 1)));
      b[c][0] = w[0], b[c][1] = w[1], b[c + 1][0] = w[2], b[c + 1][1] = w[3];
    }
  } else {
    // Thread (g, t) reads dims [g kDim/8, (g+1) kDim/8) of keys 2t, 2t+1, 2t+8, 2t+9, and
    // interleaves each pair of keys' bytes: dim j of the chunk becomes n-block j's column g.
    constexpr int kChunk = kDim / 8 * kvTypeBits(T) / 8;
    constexpr int kWords = (kChunk + 3) / 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t wa[kWords], wb[kWords];
      loadChunk<kChunk>(vRows + (2 * t + 8 * h) * stride + g * kChunk, wa);
      loadChunk<kChunk>(vRows + (2 * t + 8 * h + 1) * stride + g * kChunk, wb);
#pragma unroll
      for (int q = 0; q < kWords; ++q) {
        if constexpr (T == KvType::INT4) {
          // 8 dims per word: bytes (a0 a1 b0 b1) then (a2 a3 b2 b3), two dims per byte.
#pragma unroll
          for (int half = 0; half < 2 && 8 * q + 4 * half < kDim / 8; ++half) {
            const uint32_t c = __byte_perm(wa[q], wb[q], half ? 0x7632 : 0x5410);
            const int j = 8 * q + 4 * half;
            b[j][h] = int4LowPairF16(c);
            b[j + 1][h] = int4HighPairF16(c);
            b[j + 2][h] = int4LowPairF16(c >> 8);
            b[j + 3][h] = int4HighPairF16(c >> 8);
          }
        } else if constexpr (T == KvType::INT8) {
          // 4 dims per word: bytes (a0 a1 b0 b1) then (a2 a3 b2 b3).
          const uint32_t c0 = __byte_perm(wa[q], wb[q], 0x5410), c1 = __byte_perm(wa[q], wb[q], 0x7632);
          b[4 * q][h] = int8PairF16(c0);
          b[4 * q + 1][h] = int8PairF16(c0 >> 8);
          b[4 * q + 2][h] = int8PairF16(c1);
          b[4 * q + 3][h] = int8PairF16(c1 >> 8);
        } else {
          // FP8: bytes (a0 b0 a1 b1) then (a2 b2 a3 b3).
          const uint32_t c0 = __byte_perm(wa[q], wb[q], 0x5140), c1 = __byte_perm(wa[q], wb[q], 0x7362);
          e4m3QuadF16(c0, b[4 * q][h], b[4 * q + 1][h]);
          e4m3QuadF16(c1, b[4 * q + 2][h], b[4 * q + 3][h]);
        }
      }
    }
  }
}

// ---- tile loads ------------------------------------------------------------------------------
// A stage holds a tile's K rows, its V rows (stride bytes apart) and a scale word per key, and
// for a channel-key type (int4) each warp's page's K scales. Rows are copied in 16-byte pieces,
// consecutive threads on consecutive pieces: a thread's pieces of a whole tile are all at the
// same byte c of their rows, kKeyStep keys apart. The thread of a key's first piece also
// copies its scale word. Rows at or past the tile's keys arrive as zeros (page -1).
template <KvType T, int kDim>
struct MmaTileLoad {
  static constexpr int kPieces = mmaRowBytes(T, kDim) / 16;     // per row
  static constexpr int kKeyStep = kMmaWarps * 32 / kPieces;     // between a thread's rows
  static constexpr int kRows = (kMmaTileKeys + kKeyStep - 1) / kKeyStep;  // a thread's rows of a tile
  static constexpr int kScalePieces = kDim / 8;                 // a page's K scales (channel-key types)
};

// Where a stage's rows come from: the K and V codes of K/V head kvh (kBase, vBase, as
// decodeBlock gives them) and the scale words (scaleBase: a page's fp8/int8 word per (key, K/V
// head) or int4's K scales then V scales, past its codes).
struct MmaTileSource {
  const uint8_t* kBase;
  const uint8_t* vBase;
  const uint8_t* scaleBase;
  int kvh;
};
template <KvType T>
__device__ __forceinline__ MmaTileSource mmaTileSource(const PagedKv& kv, const uint8_t* kBase, const uint8_t* vBase, int kvh) {
  const uint8_t* scaleBase = kv.pool + kv.slotOffset + ((int64_t)2 << kv.pageShift) * kv.rowBytes +
                             (kvTypeChannelKeys(T) ? (int64_t)kv.kvDim * 2 : 4 * kvh);
  return MmaTileSource{kBase, vBase, scaleBase, kvh};
}

// Starts copying piece c of a tile's row `key` (the key at `row` of pool page `page`, -1 for a
// row past the tile's keys) into a stage.
template <KvType T, int kDim>
__device__ __forceinline__ void copyMmaPiece(uint8_t* stage, const MmaTileSource& src, const PagedKv& kv, int key,
                                             int row, int c, int32_t page) {
  constexpr int kStride = mmaRowStride(T, kDim);
  const bool in = page >= 0;
  // Offsets within a page in 32 bits: a page's rows of one slot are a few hundred KB at most.
  const int64_t pageOff = in ? (int64_t)page * kv.pageBytes : 0;
  const int64_t off = in ? pageOff + (row * kv.rowBytes + c) : 0;
  copyAsync16Fill(stage + key * kStride + c, src.kBase + off, in ? 16 : 0);
  copyAsync16Fill(stage + (kMmaTileKeys + key) * kStride + c, src.vBase + off, in ? 16 : 0);
  if (kvTypeScaled(T) && c == 0) {
    // fp8/int8: the key's word; int4: the aligned word that holds the key's f16 V scale (the
    // kernel picks its half).
    const int word = kvTypeChannelKeys(T) ? 2 * ((row * kv.kvHeads + src.kvh) & ~1) : 4 * row * kv.kvHeads;
    uint32_t* scaleDst = reinterpret_cast<uint32_t*>(stage + 2 * kMmaTileKeys * kStride);
    copyAsync4Fill(scaleDst + key, in ? src.scaleBase + pageOff + word : kv.pool, in ? 4 : 0);
  }
}
// Starts copying piece c of warp w's page's K scales (a channel-key type; page -1: zeros), in
// 16-byte pieces (kvKeyScalesOffset is 16-byte aligned where the rows are: decodeUsesMma).
template <KvType T, int kDim>
__device__ __forceinline__ void copyMmaChannelScales(uint8_t* stage, const PagedKv& kv, int kvh, int w, int c,
                                                     int32_t page) {
  uint8_t* channelDst = stage + 2 * kMmaTileKeys * mmaRowStride(T, kDim) + 4 * kMmaTileKeys;
  const uint8_t* from = page >= 0 ? kv.pool + kvKeyScalesOffset(kv, page, kvh, kDim) + c : kv.pool;
  copyAsync16Fill(channelDst + w * kDim * 2 + c, from, page >= 0 ? 16 : 0);
}

// Starts copying rows [lo, hi) of a tile whose first key is j0 (rows at or past `valid`, the
// tile's keys, as zeros), looking up each row's page: the first tile, in the two parts on either
// side of the wait for the preceding kernel. A channel-key type (j0 a multiple of 16, so a
// warp's 16 rows lie in one page) also brings the K scales of each warp whose first row is in
// [lo, hi).
template <KvType T, int kDim>
__device__ __forceinline__ void loadMmaRows(uint8_t* stage, const MmaTileSource& src, const int32_t* table,
                                            const PagedKv& kv, int j0, int lo, int hi, int valid) {
  using L = MmaTileLoad<T, kDim>;
  const int pageMask = kvPageMask(kv);
  for (int e = lo * L::kPieces + threadIdx.x; e < hi * L::kPieces; e += kMmaWarps * 32) {
    const int key = e / L::kPieces, j = j0 + key;
    copyMmaPiece<T, kDim>(stage, src, kv, key, j & pageMask, 16 * (e - key * L::kPieces),
                          key < valid ? table[j >> kv.pageShift] : -1);
  }
  if constexpr (kvTypeChannelKeys(T)) {
    const int w0 = (lo + kMmaWarpKeys - 1) / kMmaWarpKeys, w1 = (hi + kMmaWarpKeys - 1) / kMmaWarpKeys;
    for (int e = w0 * L::kScalePieces + threadIdx.x; e < w1 * L::kScalePieces; e += kMmaWarps * 32) {
      const int w = e / L::kScalePieces;
      copyMmaChannelScales<T, kDim>(stage, kv, src.kvh, w, 16 * (e - w * L::kScalePieces),
                                    kMmaWarpKeys * w < valid ? table[(j0 + kMmaWarpKeys * w) >> kv.pageShift] : -1);
    }
  }
}

// The pages of a thread's rows of a whole tile (and, for a channel-key type, of the warp whose K
// scales it copies), looked up one tile before the copy (copyMmaTile): the copy's addresses then
// wait on no load, where a lookup at the copy held every warp for a memory latency per tile.
template <KvType T, int kDim>
struct MmaTilePages {
  int32_t row[MmaTileLoad<T, kDim>::kRows];
  int32_t scales;
};
template <KvType T, int kDim>
__device__ __forceinline__ MmaTilePages<T, kDim> lookUpMmaTilePages(const int32_t* table, const PagedKv& kv, int j0,
                                                                    int valid) {
  using L = MmaTileLoad<T, kDim>;
  MmaTilePages<T, kDim> p;
  const int k = threadIdx.x / L::kPieces;
#pragma unroll
  for (int i = 0; i < L::kRows; ++i) {
    const int key = i * L::kKeyStep + k;
    p.row[i] = key < valid ? table[(j0 + key) >> kv.pageShift] : -1;
  }
  p.scales = -1;
  if constexpr (kvTypeChannelKeys(T)) {
    const int w = threadIdx.x / L::kScalePieces;
    if (w < kMmaWarps && kMmaWarpKeys * w < valid) p.scales = table[(j0 + kMmaWarpKeys * w) >> kv.pageShift];
  }
  return p;
}
// Starts copying a whole tile whose first key is j0 from the pages looked up for it.
template <KvType T, int kDim>
__device__ __forceinline__ void copyMmaTile(uint8_t* stage, const MmaTileSource& src, const PagedKv& kv, int j0,
                                            const MmaTilePages<T, kDim>& pages) {
  using L = MmaTileLoad<T, kDim>;
  const int pageMask = kvPageMask(kv);
  const int k = threadIdx.x / L::kPieces, c = 16 * (threadIdx.x % L::kPieces);
#pragma unroll
  for (int i = 0; i < L::kRows; ++i) {
    const int key = i * L::kKeyStep + k;
    if (L::kKeyStep * L::kRows <= kMmaTileKeys || key < kMmaTileKeys)
      copyMmaPiece<T, kDim>(stage, src, kv, key, (j0 + key) & pageMask, c, pages.row[i]);
  }
  if constexpr (kvTypeChannelKeys(T)) {
    const int w = threadIdx.x / L::kScalePieces;
    if (w < kMmaWarps) copyMmaChannelScales<T, kDim>(stage, kv, src.kvh, w, 16 * (threadIdx.x % L::kScalePieces), pages.scales);
  }
}

// A channel-key type's (int4's) key fragments times their channels' K scales: kb (codes as f16,
// from mmaKeyFragments) becomes the high parts and lo the low parts of code x s_c, for the page's
// K scales (channelScales: kDim f16). code x s_c is a multiple of the scale's unit with at most
// 15 significant bits (a 4-bit code times an 11-bit scale), so hi = f16(code x s_c) and the
// remainder lo (at most 4 bits, on that unit), which one fma gives, are both exact, subnormals
// included: hi + lo is kvDecode's f32 key value. A page whose scales reach 2^12 (keys near f16's
// range) has them taken down by 2^-4 first, so that no product overflows f16 (its scales below
// 2^-10 may then lose low bits: errors under 2^-21, beside a scale of 2^12 or more); returns the factor its scores take
// back (1 or 16).
template <int kDim>
__device__ __forceinline__ float mmaChannelScaleKeys(const uint8_t* channelScales, uint32_t (&kb)[kDim / 16][2][2],
                                                     uint32_t (&lo)[kDim / 16][2][2]) {
  constexpr int kPieces = kDim / 32;
  const int t = threadIdx.x & 3;
  // Piece p (k-steps 2p, 2p + 1) of the thread takes channels 32p + 8t .. + 7 (kChannel<INT4>): one
  // 16-byte load, paired as its key words unpack: (0, 4) (1, 5) for k-step 2p, (2, 6) (3, 7) for 2p + 1.
  uint32_t sc[kPieces][4];
  __half2 most = __float2half2_rn(0.0f);
#pragma unroll
  for (int p = 0; p < kPieces; ++p) {
    const uint4 w = reinterpret_cast<const uint4*>(channelScales)[4 * p + t];
    sc[p][0] = __byte_perm(w.x, w.z, 0x5410);
    sc[p][1] = __byte_perm(w.x, w.z, 0x7632);
    sc[p][2] = __byte_perm(w.y, w.w, 0x5410);
    sc[p][3] = __byte_perm(w.y, w.w, 0x7632);
    most = __hmax2(most, __hmax2(__hmax2(bitsHalf2(w.x), bitsHalf2(w.y)), __hmax2(bitsHalf2(w.z), bitsHalf2(w.w))));
  }
  float up = 1.0f;
  if (__any_sync(0xffffffffu, __half2float(__hmax(__low2half(most), __high2half(most))) >= 4096.0f)) {
    up = 16.0f;
    const __half2 down = __float2half2_rn(0.0625f);
#pragma unroll
    for (int p = 0; p < kPieces; ++p)
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[p][i] = half2Bits(__hmul2_rn(bitsHalf2(sc[p][i]), down));
  }
#pragma unroll
  for (int s = 0; s < kDim / 16; ++s)
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const __half2 code = bitsHalf2(kb[s][nb][i]), scale = bitsHalf2(sc[s >> 1][2 * (s & 1) + i]);
        const __half2 hi = __hmul2_rn(code, scale);
        lo[s][nb][i] = half2Bits(__hfma2(code, scale, __hneg2(hi)));
        kb[s][nb][i] = half2Bits(hi);
      }
  return up;
}

// One block: row blockIdx.x, K/V head blockIdx.y / headChunks (query heads cut into headChunks
// blocks of at most headsPerBlock <= 8), split blockIdx.z of gridDim.z, over the keys `span`
// takes. Writes out (span.outSplits 1) or the split's (max, sum, unnormalised output) per head
// into partial results [span.splitBase, + gridDim.z) of span.outSplits, as the CUDA-core decode
// kernel does. A channel-key type (int4) takes its complete pages (DecodeKeys::CompletePages),
// in chunks aligned to 16 keys.
template <int kDim, KvType T>
__global__ void __launch_bounds__(kMmaWarps * 32) attentionDecodeMmaKernel(
    const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv, int numHeads, int numKvHeads,
    int headDim, bool strict, int window, float scale, int headChunks, int headsPerBlock, DecodeSpan span,
    AttentionOut out, float* __restrict__ partial) {
#if __CUDA_ARCH__ >= 800
  constexpr bool kF16 = mmaCodesF16<T>();
  constexpr bool kScaled = kvTypeScaled(T);
  constexpr bool kChannelKeys = kvTypeChannelKeys(T);  // K scales per channel of a page (mmaChannelScaleKeys)
  constexpr bool kKeyScale = kScaled && !kChannelKeys;  // a K scale per key (multiplies its score)
  constexpr int kStride = mmaRowStride(T, kDim), kStages = mmaStages(T, kDim);
  constexpr int kStage = (int)mmaStageBytes(T, kDim);
  constexpr int kSteps = kDim / 16, kBlocks = kDim / 8;
  extern __shared__ float4 smem4[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem4);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  // Every other type takes all of a row's keys: a span of compile-time DecodeKeys::All keeps its
  // chunking free of the channel-key branches.
  const DecodeSpan keySpan = kChannelKeys ? span : DecodeSpan{DecodeKeys::All, 0, span.splitBase, span.outSplits};
  const DecodeBlock b = decodeBlock<kMmaTileKeys>(positions, kv, numHeads, numKvHeads, strict, window, headChunks,
                                                  headsPerBlock, kvHeadBytes(T, headDim), keySpan,
                                                  kChannelKeys ? kMmaWarpKeys : 1);
  const int r = b.r, split = b.split, kvh = b.kvh, h0 = b.h0, heads = b.heads;
  const int32_t* table = b.table;
  const uint8_t *kBase = b.kBase, *vBase = b.vBase;
  const int first = b.first, keys = b.keys, numTiles = b.numTiles, firstTileKeys = b.firstTileKeys, earlyKeys = b.earlyKeys;

  const MmaTileSource src = mmaTileSource<T>(kv, kBase, vBase, kvh);
  const auto tileKeys = [&](int tile) { return min(kMmaTileKeys, keys - tile * kMmaTileKeys); };
  // The first tile's keys that no kernel of this step writes load before the wait (as in the
  // CUDA-core kernel), the rest after it; then the next kStages - 2 tiles, all their pages looked
  // up before any is copied.
  if (numTiles > 0 && earlyKeys > 0) loadMmaRows<T, kDim>(smem, src, table, kv, first, 0, earlyKeys, earlyKeys);
  waitForPrecedingKernels();
  if (numTiles > 0) loadMmaRows<T, kDim>(smem, src, table, kv, first, earlyKeys, kMmaTileKeys, firstTileKeys);
  copyAsyncCommit();
  {
    MmaTilePages<T, kDim> pages[kStages > 2 ? kStages - 2 : 1];
#pragma unroll
    for (int st = 1; st < kStages - 1; ++st)
      if (st < numTiles) pages[st - 1] = lookUpMmaTilePages<T, kDim>(table, kv, first + st * kMmaTileKeys, tileKeys(st));
#pragma unroll
    for (int st = 1; st < kStages - 1; ++st) {
      if (st < numTiles) copyMmaTile<T, kDim>(smem + st * kStage, src, kv, first + st * kMmaTileKeys, pages[st - 1]);
      copyAsyncCommit();
    }
  }
  // The pages of the tile the loop's first iteration copies.
  MmaTilePages<T, kDim> aheadPages;
  if (kStages - 1 < numTiles)
    aheadPages = lookUpMmaTilePages<T, kDim>(table, kv, first + (kStages - 1) * kMmaTileKeys, tileKeys(kStages - 1));

  // The queries of heads h0 + g (zero past `heads`), times the softmax scale, as the A fragments
  // of every k-step: rows g (high parts) and g + 8 (low parts); bf16's third parts in qa3's rows g.
  constexpr int kQ3 = kF16 ? 1 : kSteps;
  uint32_t qa[kSteps][4], qa3[kQ3][4];
  {
    const float* qh = q + ((int64_t)r * numHeads + h0 + min(g, heads - 1)) * headDim;
    const float live = g < heads ? scale * kLog2e : 0.0f;  // scores in log2 units (see the header)
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const float x0 = qh[kChannel<T>(s, t, 0)] * live, x1 = qh[kChannel<T>(s, t, 1)] * live;
      const float x2 = qh[kChannel<T>(s, t, 2)] * live, x3 = qh[kChannel<T>(s, t, 3)] * live;
      if constexpr (kF16) {
        splitPair<kF16>(x0, x1, qa[s][0], qa[s][1]);
        splitPair<kF16>(x2, x3, qa[s][2], qa[s][3]);
      } else {
        splitPair3<kF16>(x0, x1, qa[s][0], qa[s][1], qa3[s][0]);
        splitPair3<kF16>(x2, x3, qa[s][2], qa[s][3], qa3[s][2]);
        qa3[s][1] = qa3[s][3] = 0u;
      }
    }
  }

  // Per thread: head g's running max m (and m2 of score + log V scale), its partial sum over the
  // thread's keys, and the output columns 2t, 2t+1 of every n-block (rows g: hi, g + 8: lo).
  float m = -INFINITY, m2 = -INFINITY, l = 0.0f;
  float acc[kBlocks][4];
#pragma unroll
  for (int j = 0; j < kBlocks; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  for (int tile = 0; tile < numTiles; ++tile) {
    // One barrier a tile: past it, this tile is in place and every warp is done with the last
    // one, whose stage the load below refills (kStages - 1 groups were in flight; this tile's is
    // the oldest).
    copyAsyncWait<kStages - 2>();
    __syncthreads();
    const int ahead = tile + kStages - 1;
    if (ahead < numTiles)
      copyMmaTile<T, kDim>(smem + (ahead % kStages) * kStage, src, kv, first + ahead * kMmaTileKeys, aheadPages);
    copyAsyncCommit();
    if (ahead + 1 < numTiles)
      aheadPages = lookUpMmaTilePages<T, kDim>(table, kv, first + (ahead + 1) * kMmaTileKeys, tileKeys(ahead + 1));

    const int slabStart = tile * kMmaTileKeys + kMmaWarpKeys * warp;  // this warp's first key in the chunk
    const int slabValid = min(kMmaTileKeys, keys - tile * kMmaTileKeys) - kMmaWarpKeys * warp;  // its keys
    const int slabLead = kChannelKeys ? b.lead - slabStart : 0;  // its first keys that are not visible (aligned chunks)
    if (slabValid > 0) {
      const uint8_t* stage = smem + (tile % kStages) * kStage;
      const uint8_t* kRows = stage + kMmaWarpKeys * warp * kStride;
      const uint8_t* vRows = stage + (kMmaTileKeys + kMmaWarpKeys * warp) * kStride;
      const uint32_t* scales = reinterpret_cast<const uint32_t*>(stage + 2 * kMmaTileKeys * kStride) + kMmaWarpKeys * warp;

      // Scores of the thread's keys 2t, 2t+1 (nb 0) and 2t+8, 2t+9 (nb 1) for head g.
      float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      float pageUp = 1.0f;  // a channel-key type's power of two to take back (mmaChannelScaleKeys)
      {
        uint32_t kb[kSteps][2][2];
        mmaKeyFragments<T, kDim>(kRows, kStride, kb);
        if constexpr (kChannelKeys) {
          uint32_t kbLo[kSteps][2][2];
          pageUp = mmaChannelScaleKeys<kDim>(stage + 2 * kMmaTileKeys * kStride + 4 * kMmaTileKeys + warp * kDim * 2, kb, kbLo);
#pragma unroll
          for (int s = 0; s < kSteps; ++s) {
            mma16816<kF16>(sc[0], qa[s], kbLo[s][0][0], kbLo[s][0][1]);
            mma16816<kF16>(sc[1], qa[s], kbLo[s][1][0], kbLo[s][1][1]);
          }
        }
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
          mma16816<kF16>(sc[0], qa[s], kb[s][0][0], kb[s][0][1]);
          mma16816<kF16>(sc[1], qa[s], kb[s][1][0], kb[s][1][1]);
          if constexpr (!kF16) {
            mma16816<kF16>(sc[0], qa3[s], kb[s][0][0], kb[s][0][1]);
            mma16816<kF16>(sc[1], qa3[s], kb[s][1][0], kb[s][1][1]);
          }
        }
      }
      float e[4], e2[4];  // key (nb, i) at index 2 nb + i: key 8 nb + 2t + i of the slab
      float mx = -INFINITY, mx2 = -INFINITY;
      // The log of key (lane & 15)'s V scale, taken once per key and shuffled to the 8 rows
      // that score it (as the scores, in log2 units: one MUFU.LG2, whose 2^-22 error moves a
      // weight by about 1e-7 of itself). A zero scale (an all-zero head, or a key
      // past the end) has zero codes, and any finite value serves. fp8/int8 keep it in the high
      // half of the key's scale word; int4 in the half of the page's f16 array that its index
      // (row x kvHeads + kvh) picks (copyMmaPiece).
      float logVScale = 0.0f;
      if constexpr (kScaled) {
        int shift = 16;
        if constexpr (kChannelKeys) {
          const int row = ((first + slabStart) & kvPageMask(kv)) + (lane & 15);  // the slab lies in one page
          shift = 16 * ((row * kv.kvHeads + kvh) & 1);
        }
        logVScale = log2Ftz(fmaxf(kvF16ToF32((uint16_t)(scales[lane & 15] >> shift)), 1e-30f));
      }
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        // The scale words of keys 8 nb + 2t and 8 nb + 2t + 1 in one load.
        uint2 sw = make_uint2(0u, 0u);
        if constexpr (kKeyScale) sw = *reinterpret_cast<const uint2*>(scales + 8 * nb + 2 * t);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int key = 8 * nb + 2 * t + i;
          float s = sc[nb][i] + sc[nb][2 + i];
          if constexpr (kKeyScale) s *= kvF16ToF32((uint16_t)(i ? sw.y : sw.x));
          if constexpr (kChannelKeys) s *= pageUp;
          float s2 = s;
          if constexpr (kScaled) s2 = s + __shfl_sync(0xffffffffu, logVScale, key);
          if (key >= slabValid || (kChannelKeys && key < slabLead)) s = s2 = -INFINITY;
          e[2 * nb + i] = s;
          e2[2 * nb + i] = s2;
          mx = fmaxf(mx, s);
          mx2 = fmaxf(mx2, s2);
        }
      }
      // Head g's keys of this slab are spread over the 4 threads t of the row.
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mNew = fmaxf(m, mx);  // finite: the slab has a valid key
      const float corr = exp2Ftz(m - mNew);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) sum += exp2Ftz(e[i] - mNew);
      l = l * corr + sum;
      m = mNew;
      float w[4], corr2;
      if constexpr (kScaled) {
        mx2 = fmaxf(mx2, __shfl_xor_sync(0xffffffffu, mx2, 1));
        mx2 = fmaxf(mx2, __shfl_xor_sync(0xffffffffu, mx2, 2));
        const float m2New = fmaxf(m2, mx2);
        corr2 = exp2Ftz(m2 - m2New);
        m2 = m2New;
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = exp2Ftz(e2[i] - m2New);
      } else {
        corr2 = corr;
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = exp2Ftz(e[i] - mNew);
      }
      // Rescaling by 1 changes no bit: once the running maxima settle (most tiles), the warp
      // skips the kDim / 2 multiplications.
      if (__any_sync(0xffffffffu, corr2 != 1.0f)) {
#pragma unroll
        for (int j = 0; j < kBlocks; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][i] *= corr2;
      }

      // Weights as P's A fragment: rows g (hi) and g + 8 (lo); k = keys 2t, 2t+1 | 2t+8, 2t+9
      // (bf16: a third part in pa3's rows g, as for the queries).
      uint32_t pa[4], pa3[4] = {0u, 0u, 0u, 0u};
      if constexpr (kF16) {
        splitPair<kF16>(w[0], w[1], pa[0], pa[1]);
        splitPair<kF16>(w[2], w[3], pa[2], pa[3]);
      } else {
        splitPair3<kF16>(w[0], w[1], pa[0], pa[1], pa3[0]);
        splitPair3<kF16>(w[2], w[3], pa[2], pa[3], pa3[2]);
      }
      uint32_t vb[kBlocks][2];
      mmaValueFragments<T, kDim>(vRows, kStride, vb);
#pragma unroll
      for (int j = 0; j < kBlocks; ++j) {
        mma16816<kF16>(acc[j], pa, vb[j][0], vb[j][1]);
        if constexpr (!kF16) mma16816<kF16>(acc[j], pa3, vb[j][0], vb[j][1]);
      }
    }
  }

  // Each warp's result per head g, relative to its max m: the sum over the row's 4 threads, the
  // output hi + lo (and, for a scaled type, moved from m2 to m), through shared memory.
  copyAsyncWait<0>();
  __syncthreads();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  const float toM = !kScaled || m == -INFINITY ? 1.0f : exp2Ftz(m2 - m);
  float* red = reinterpret_cast<float*>(smem);  // [warps][heads][kDim], then [warps][heads] max, sum and weight
  float* redMax = red + kMmaWarps * kMmaHeads * kDim;
  float* redSum = redMax + kMmaWarps * kMmaHeads;
  float* redWeight = redSum + kMmaWarps * kMmaHeads;
  float* headMax = redWeight + kMmaWarps * kMmaHeads;  // [heads], then [heads] sums
  float* headSum = headMax + kMmaHeads;
#pragma unroll
  for (int j = 0; j < kBlocks; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i)
      red[(warp * kMmaHeads + g) * kDim + kOutDim<T, kDim>(j, 2 * t + i)] = (acc[j][i] + acc[j][2 + i]) * toM;
  if (t == 0) {
    redMax[warp * kMmaHeads + g] = m;
    redSum[warp * kMmaHeads + g] = l;
  }
  __syncthreads();
  // Each head's maximum over the warps, each warp's weight in it and the head's sum, once per
  // head (not per output element).
  if (threadIdx.x < heads) {
    const int hg = threadIdx.x;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) M = fmaxf(M, redMax[w * kMmaHeads + hg]);
    float L = 0.0f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) {
      const float mw = redMax[w * kMmaHeads + hg];
      const float f = mw == -INFINITY ? 0.0f : exp2Ftz(mw - M);
      redWeight[w * kMmaHeads + hg] = f;
      L += f * redSum[w * kMmaHeads + hg];
    }
    headMax[hg] = M;
    headSum[hg] = L;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < heads * headDim; e += blockDim.x) {
    const int hg = e / headDim, d = e - hg * headDim;
    const float M = headMax[hg], L = headSum[hg];
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) v += redWeight[w * kMmaHeads + hg] * red[(w * kMmaHeads + hg) * kDim + d];
    const int64_t rh = (int64_t)r * numHeads + h0 + hg;
    if (span.outSplits == 1) {
      out.store(rh * headDim + d, L > 0.0f ? v / L : 0.0f);
    } else {
      const int64_t slot = rh * span.outSplits + span.splitBase + split;
      partial[slot * (headDim + 2) + 2 + d] = v;
      if (d == 0) {
        partial[slot * (headDim + 2)] = M * kLn2;  // in the merge's natural-log units; -inf for an empty chunk: the merge skips it
        partial[slot * (headDim + 2) + 1] = L;
      }
    }
  }
#endif
}

}  // namespace

}  // namespace lckv::cuda
