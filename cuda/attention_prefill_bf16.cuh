// Prefill over a compact K/V cache (bf16, fp8, int8, int4) on the bf16 tensor cores: flash
// attention 2 with mma.sync m16n8k16. A block takes kPrefillQueries consecutive queries of one
// head (16 per warp, the rows of an mma tile) and streams the keys they can see through shared
// memory in tiles of kPrefillKeyTile, two tiles in flight; scores, probabilities and the output
// stay in registers. Not for int4, whose keys are scaled per channel of a page (kv_format.h):
// an int4 call's rows of one sequence lie in one page, and all of them take the decode kernel
// (attention.cu), a mixed step's chunk too.
//
// Precision: every code of every compact type is exactly a bf16 (bf16's 8 significant bits hold
// an int8 or int4 code and an e4m3 value; a bf16 cache's values are bf16), so keys and values
// enter the mma as stored, and the per-key scales stay outside it: K's multiplies the score, V's
// the probability before it enters the product. The other operand of each product is f32 and is
// split into bf16 parts, each taking its own mma. The scaled queries take three (hi + mid + lo,
// f32's 24 bits), so a score is the f32 computation to within the tensor cores' f32
// accumulation: a score's error is multiplied by the softmax's exponent. The probabilities take
// two (16 significant bits, a relative error under 2^-17 each): they lie in [0, 1] and the
// output divides by their f32 sum, so an output row is off by under 2^-17 of its largest value
// times the V scale, inside the op checks' 1e-5, and the third part's mma per 16 keys is saved
// (a 2048-token prompt: 16.3 -> 15.6 ms; docs/profiling.md).
//
// Where the output is written in bf16 (kOutBf16: it feeds the output projection's bf16 product,
// CudaBackend::linearInputType), each output is rounded to 8 significant bits anyway, and the
// queries and probabilities enter as one bf16 part each, as in FlashAttention: a score's error is
// then about 2^-9 of the products it sums, of the order of that rounding (the op checks hold this
// variant to the CPU within their bf16 tolerance). A third of the score products and half of the
// value products, and a third of the queries' shared memory (at head size 64: 166 registers a
// thread to 132 for fp8 and int8, 159 to 139 for bf16; 64 KB to 46 KB a block).
//
// The tile's keys and values are stored in shared memory as bf16, one row per key, rows an odd
// number of 16-byte pieces apart so that ldmatrix's 8 rows hit distinct banks: a bf16 cache's
// rows are copied as they are (cp.async), other types' codes are converted on the way in.
// Keys load as B fragments with ldmatrix, values with ldmatrix.trans; the queries' parts sit
// in shared memory too and load as A fragments with ldmatrix; the probabilities' A
// fragments are the thread's own score registers (the C fragment of two 8-key score tiles is
// the A fragment of a 16-key step).
//
// The kernel template; attention_prefill_bf16.cu holds its launcher and instances. f32 caches
// take the 3xTF32 kernel (attention_prefill.cuh): their keys are not exact in any 16-bit type.
#pragma once
#include <cstdint>

#include "attention_prefill_common.cuh"
#include "mma.cuh"

namespace lckv::cuda {

namespace {

constexpr int kPrefillBf16Warps = 4;
constexpr int kPrefillBf16Queries = 16 * kPrefillBf16Warps;
constexpr int kPrefillKeyTile = 64;
constexpr int kPrefillStages = 2;
// Parts of the queries (hi + mid + lo) and of the probabilities (hi + lo); one each for a bf16 output.
__host__ __device__ constexpr int prefillQueryParts(bool outBf16) { return outBf16 ? 1 : 3; }
__host__ __device__ constexpr int prefillProbabilityParts(bool outBf16) { return outBf16 ? 1 : 2; }

// Bytes between shared-memory rows of kDim bf16 values: an odd number of 16-byte pieces.
__host__ __device__ constexpr int prefillBf16Stride(int kDim) { return 16 * ((2 * kDim / 16) | 1); }
// One stage: K rows, V rows, then the tile's scale words.
__host__ __device__ constexpr int prefillBf16StageBytes(int kDim) {
  return 2 * kPrefillKeyTile * prefillBf16Stride(kDim) + 4 * kPrefillKeyTile;
}
__host__ __device__ constexpr size_t prefillBf16SmemBytes(int kDim, bool outBf16) {
  return (size_t)prefillQueryParts(outBf16) * kPrefillBf16Queries * prefillBf16Stride(kDim) + (size_t)kPrefillStages * prefillBf16StageBytes(kDim);
}

// Code c of type T as a bf16 (exact: see above); NaN codes of e4m3 stay NaN.
template <KvType T>
__device__ __forceinline__ uint16_t codeBf16(uint32_t c) {
  const __nv_bfloat16 b = __float2bfloat16_rn(kvDecode(T, c, 1.0f));
  return *reinterpret_cast<const uint16_t*>(&b);
}

// Fills one stage with the keys j0 .. j0 + kPrefillKeyTile - 1 (those past `last` as zeros,
// which are finite and masked): K and V rows as bf16 and, for a scaled type, the scale words.
// A bf16 cache whose rows load as 16-byte pieces is copied asynchronously; every other case
// converts 32-bit words of codes through registers (synchronously: it is done when this returns).
template <int kDim, KvType T>
__device__ __forceinline__ void loadPrefillTile(uint8_t* stage, const uint8_t* kBase, const uint8_t* vBase,
                                                const int32_t* table, const PagedKv& kv, int pageMask, int kvh, int j0,
                                                int last, int headBytes, bool vec16) {
  constexpr int kStride = prefillBf16Stride(kDim);
  uint8_t* kDst = stage;
  uint8_t* vDst = stage + kPrefillKeyTile * kStride;
  if (T == KvType::BF16 && vec16) {
    const int pieces = headBytes / 16;
    for (int e = threadIdx.x; e < kPrefillKeyTile * pieces; e += blockDim.x) {
      const int key = e / pieces, c = 16 * (e - key * pieces);
      const bool in = j0 + key <= last;
      const int64_t off = in ? kvRowOffset(table, kv, pageMask, j0 + key) + c : 0;
      copyAsync16Fill(kDst + key * kStride + c, kBase + off, in ? 16 : 0);
      copyAsync16Fill(vDst + key * kStride + c, vBase + off, in ? 16 : 0);
    }
    return;
  }
  constexpr int kPerWord = 32 / kvTypeBits(T);
  const int words = headBytes / 4;
  for (int e = threadIdx.x; e < kPrefillKeyTile * words; e += blockDim.x) {
    const int key = e / words, w = e - key * words;
    uint32_t kw = 0, vw = 0;
    if (j0 + key <= last) {
      const int64_t off = kvRowOffset(table, kv, pageMask, j0 + key) + 4 * w;
      kw = *reinterpret_cast<const uint32_t*>(kBase + off);
      vw = *reinterpret_cast<const uint32_t*>(vBase + off);
    }
    uint16_t kb[kPerWord], vb[kPerWord];
    if constexpr (T == KvType::BF16) {
      kb[0] = (uint16_t)kw, kb[1] = (uint16_t)(kw >> 16), vb[0] = (uint16_t)vw, vb[1] = (uint16_t)(vw >> 16);
    } else {
      constexpr int kBits = kvTypeBits(T);
      constexpr uint32_t kMask = (1u << kBits) - 1u;
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) {
        kb[i] = codeBf16<T>((kw >> (i * kBits)) & kMask);
        vb[i] = codeBf16<T>((vw >> (i * kBits)) & kMask);
      }
    }
    // kPerWord bf16 values at column w * kPerWord: 4, 8 or 16 bytes, aligned to their size.
    uint32_t kp[kPerWord / 2], vp[kPerWord / 2];
#pragma unroll
    for (int i = 0; i < kPerWord / 2; ++i) {
      kp[i] = kb[2 * i] | ((uint32_t)kb[2 * i + 1] << 16);
      vp[i] = vb[2 * i] | ((uint32_t)vb[2 * i + 1] << 16);
    }
    uint8_t* kd = kDst + key * kStride + 2 * kPerWord * w;
    uint8_t* vd = vDst + key * kStride + 2 * kPerWord * w;
    if constexpr (kPerWord == 2) {
      *reinterpret_cast<uint32_t*>(kd) = kp[0];
      *reinterpret_cast<uint32_t*>(vd) = vp[0];
    } else if constexpr (kPerWord == 4) {
      *reinterpret_cast<uint2*>(kd) = make_uint2(kp[0], kp[1]);
      *reinterpret_cast<uint2*>(vd) = make_uint2(vp[0], vp[1]);
    } else {
      *reinterpret_cast<uint4*>(kd) = make_uint4(kp[0], kp[1], kp[2], kp[3]);
      *reinterpret_cast<uint4*>(vd) = make_uint4(vp[0], vp[1], vp[2], vp[3]);
    }
  }
  if constexpr (kvTypeScaled(T)) {
    uint32_t* scaleDst = reinterpret_cast<uint32_t*>(stage + 2 * kPrefillKeyTile * kStride);
    for (int key = threadIdx.x; key < kPrefillKeyTile; key += blockDim.x)
      scaleDst[key] = j0 + key <= last ? *reinterpret_cast<const uint32_t*>(kv.pool + kvScaleOffset(kv, table, j0 + key, kvh)) : 0u;
  }
}

// kDim: the head size rounded up to 16, 32, 64 or 128 (zero-padded); T: the cache's type;
// kOutBf16: out.bf16, which sets the parts (see the precision note above).
template <int kDim, KvType T, bool kOutBf16>
__global__ void __launch_bounds__(kPrefillBf16Warps * 32) attentionPrefillBf16Kernel(
    const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv, int n, int numHeads, int numKvHeads,
    int headDim, bool strict, int window, float scale, bool vec16, AttentionOut out) {
  static_assert(!kvTypeChannelKeys(T), "keys scaled per channel take the decode kernel");
#if __CUDA_ARCH__ >= 800
  waitForPrecedingKernels();
  constexpr bool kScaled = kvTypeScaled(T);
  constexpr int kQueryParts = prefillQueryParts(kOutBf16), kProbabilityParts = prefillProbabilityParts(kOutBf16);
  constexpr int kStride = prefillBf16Stride(kDim), kStage = prefillBf16StageBytes(kDim);
  constexpr int kSteps = kDim / 16, kDimTiles = kDim / 8, kKeyTiles = kPrefillKeyTile / 8;
  extern __shared__ float4 smem4[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem4);
  uint8_t* qs = smem;  // [part][kPrefillBf16Queries rows], scaled
  uint8_t* stages = qs + kQueryParts * kPrefillBf16Queries * kStride;

  const int h = blockIdx.y, kvh = h / (numHeads / numKvHeads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  // The last queries see the most keys: their blocks start first, so the short ones fill the tail.
  const int r0 = (gridDim.x - 1 - blockIdx.x) * kPrefillBf16Queries;
  const int32_t* table = kvPageTable(kv, r0);  // one sequence for all rows
  const int headBytes = kvHeadBytes(T, headDim);
  const uint8_t* kBase = kvHeadBase(kv, 0, kvh, headBytes);
  const uint8_t* vBase = kvHeadBase(kv, 1, kvh, headBytes);
  const int pageMask = kvPageMask(kv);

  const PrefillRows rows = prefillRows<kPrefillBf16Queries>(positions, n, r0, warp, g, strict, window);
  const int firstKey = rows.hi >= 0 ? rows.lo : 0;
  const int numTiles = rows.hi >= 0 ? (rows.hi - firstKey) / kPrefillKeyTile + 1 : 0;

  // Columns past the head size stay zero in both stages (the loads write [0, headBytes) only).
  if (kDim != headDim)
    for (int e = threadIdx.x; e < kPrefillStages * 2 * kPrefillKeyTile * (kDim - headDim); e += blockDim.x) {
      const int row = e / (kDim - headDim), d = headDim + e % (kDim - headDim);
      reinterpret_cast<__nv_bfloat16*>(stages + (row / (2 * kPrefillKeyTile)) * kStage + (row % (2 * kPrefillKeyTile)) * kStride)[d] =
          __float2bfloat16_rn(0.0f);
    }
  if (numTiles > 0)
    loadPrefillTile<kDim, T>(stages, kBase, vBase, table, kv, pageMask, kvh, firstKey, rows.hi, headBytes, vec16);
  copyAsyncCommit();
  // The queries times the softmax scale in log2 units (prefillQueryScale), as kQueryParts bf16
  // parts (rows past n and columns past the head size zero), two columns per thread step.
  const float qScale = prefillQueryScale(scale);
  for (int e = threadIdx.x; e < kPrefillBf16Queries * kDim / 2; e += blockDim.x) {
    const int i = e / (kDim / 2), d = 2 * (e % (kDim / 2));
    const float* qr = q + ((int64_t)(r0 + i) * numHeads + h) * headDim;
    const bool row = r0 + i < n;
    const float x0 = row && d < headDim ? qr[d] * qScale : 0.0f;
    const float x1 = row && d + 1 < headDim ? qr[d + 1] * qScale : 0.0f;
    uint8_t* at = qs + i * kStride + 2 * d;
    if constexpr (kQueryParts == 1) {
      *reinterpret_cast<uint32_t*>(at) = packPair<false>(x0, x1);
    } else {
      uint32_t p0, p1, p2;
      splitPair3<false>(x0, x1, p0, p1, p2);
      *reinterpret_cast<uint32_t*>(at) = p0;
      *reinterpret_cast<uint32_t*>(at + kPrefillBf16Queries * kStride) = p1;
      *reinterpret_cast<uint32_t*>(at + 2 * kPrefillBf16Queries * kStride) = p2;
    }
  }

  // The online softmax of rows A and B, and the output tile in C fragments, 8 head dims each.
  PrefillSoftmax sm;
  float o[kDimTiles][4];
#pragma unroll
  for (int i = 0; i < kDimTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  // ldmatrix rows of this lane: the warp's query row (lane % 16) at piece lane / 16 of a k-step;
  // a key or value row (lane % 8) of matrix lane / 8.
  const uint8_t* qLane = qs + (warp * 16 + (lane & 15)) * kStride + 16 * (lane >> 4);
  const int mi = lane >> 3, mr = lane & 7;

  for (int tile = 0; tile < numTiles; ++tile) {
    const int j0 = firstKey + tile * kPrefillKeyTile;
    if (tile + 1 < numTiles)
      loadPrefillTile<kDim, T>(stages + ((tile + 1) % kPrefillStages) * kStage, kBase, vBase, table, kv, pageMask, kvh,
                               j0 + kPrefillKeyTile, rows.hi, headBytes, vec16);
    copyAsyncCommit();
    copyAsyncWait<1>();
    __syncthreads();  // this tile (and, the first time, the queries) is in place
    if (!(rows.warpHi < j0 || rows.warpLo > j0 + kPrefillKeyTile - 1)) {  // warp-uniform: a key of this tile is visible
      const uint8_t* kRows = stages + (tile % kPrefillStages) * kStage;
      const uint8_t* vRows = kRows + kPrefillKeyTile * kStride;
      const uint32_t* scales = reinterpret_cast<const uint32_t*>(vRows + kPrefillKeyTile * kStride);

      // Scores of the warp's 16 queries against the tile's keys: s[kt] covers keys 8 kt .. 8 kt + 7.
      float s[kKeyTiles][4];
#pragma unroll
      for (int kt = 0; kt < kKeyTiles; ++kt) s[kt][0] = s[kt][1] = s[kt][2] = s[kt][3] = 0.0f;
#pragma unroll
      for (int st = 0; st < kSteps; ++st) {
        uint32_t qa[kQueryParts][4];
#pragma unroll
        for (int part = 0; part < kQueryParts; ++part)
          ldmatrixX4(qa[part], qLane + part * kPrefillBf16Queries * kStride + 32 * st);
#pragma unroll
        for (int kg = 0; kg < kKeyTiles / 2; ++kg) {
          // Matrices (keys 0-7, piece 2st) (keys 0-7, 2st + 1) (keys 8-15, 2st) (keys 8-15, 2st + 1).
          uint32_t kb[4];
          ldmatrixX4(kb, kRows + (16 * kg + 8 * (mi >> 1) + mr) * kStride + 16 * (2 * st + (mi & 1)));
#pragma unroll
          for (int part = 0; part < kQueryParts; ++part) {
            mma16816<false>(s[2 * kg], qa[part], kb[0], kb[1]);
            mma16816<false>(s[2 * kg + 1], qa[part], kb[2], kb[3]);
          }
        }
      }
      // K scales, then the mask and the online softmax.
      if constexpr (kScaled) {
#pragma unroll
        for (int kt = 0; kt < kKeyTiles; ++kt)
#pragma unroll
          for (int c = 0; c < 4; ++c) s[kt][c] *= kvF16ToF32((uint16_t)scales[kt * 8 + 2 * t + (c & 1)]);
      }
      sm.tile(s, j0, t, rows);
      // Probabilities x values, 16 keys per step, summed for this tile alone (prefillAddTile).
      float po[kDimTiles][4];
#pragma unroll
      for (int i = 0; i < kDimTiles; ++i) po[i][0] = po[i][1] = po[i][2] = po[i][3] = 0.0f;
#pragma unroll
      for (int kg = 0; kg < kKeyTiles / 2; ++kg) {
        // The weights (probability x V scale) of keys 16 kg + 2t, +1 (score tile 2 kg) and
        // 16 kg + 8 + 2t, +1 (tile 2 kg + 1), rows g and g + 8: P's A fragment, in kProbabilityParts.
        float w[2][4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int kt = 2 * kg + half;
          const float p0 = prefillWeight(s[kt][0], sm.baseA), p1 = prefillWeight(s[kt][1], sm.baseA);
          const float p2 = prefillWeight(s[kt][2], sm.baseB), p3 = prefillWeight(s[kt][3], sm.baseB);
          sm.lA += p0 + p1;
          sm.lB += p2 + p3;
          float v0 = 1.0f, v1 = 1.0f;
          if constexpr (kScaled) {
            v0 = kvF16ToF32((uint16_t)(scales[kt * 8 + 2 * t] >> 16));
            v1 = kvF16ToF32((uint16_t)(scales[kt * 8 + 2 * t + 1] >> 16));
          }
          w[half][0] = p0 * v0, w[half][1] = p1 * v1, w[half][2] = p2 * v0, w[half][3] = p3 * v1;
        }
        uint32_t pa[kProbabilityParts][4];
        // (g, keys 2t, 2t + 1) (g + 8, 2t, 2t + 1) (g, 8 + 2t, 9 + 2t) (g + 8, 8 + 2t, 9 + 2t)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          const float x = w[f >> 1][2 * (f & 1)], y = w[f >> 1][2 * (f & 1) + 1];
          if constexpr (kProbabilityParts == 1) pa[0][f] = packPair<false>(x, y);
          else splitPair<false>(x, y, pa[0][f], pa[1][f]);
        }
#pragma unroll
        for (int dp = 0; dp < kDimTiles / 2; ++dp) {
          // Matrices (keys 0-7, dims 16 dp ..) (keys 8-15, 16 dp ..) (keys 0-7, 16 dp + 8 ..)
          // (keys 8-15, 16 dp + 8 ..), transposed: B fragments of dim tiles 2 dp and 2 dp + 1.
          uint32_t vb[4];
          ldmatrixX4Trans(vb, vRows + (16 * kg + 8 * (mi & 1) + mr) * kStride + 16 * (2 * dp + (mi >> 1)));
#pragma unroll
          for (int part = 0; part < kProbabilityParts; ++part) {
            mma16816<false>(po[2 * dp], pa[part], vb[0], vb[1]);
            mma16816<false>(po[2 * dp + 1], pa[part], vb[2], vb[3]);
          }
        }
      }
      prefillAddTile(o, po, sm);
    }
    __syncthreads();  // the stage is free for the tile after next
  }
  copyAsyncWait<0>();
  prefillStore(o, sm, rows, n, t, h, numHeads, headDim, out);
#endif
}

}  // namespace

}  // namespace lckv::cuda
