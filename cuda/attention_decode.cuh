// Decode attention (rows of different sequences, one query each): split-K flash-decoding, one
// block per (row, K/V head, split) that serves every query head of that K/V head's group (up to
// kGroupHeads; a larger group is cut into several blocks). The block streams the keys and values
// of its chunk through shared memory once, in tiles copied asynchronously while the previous
// tile is scored, and scores each tile against all its query heads: with GQA (8 query heads per
// K/V head in TinyLlama) a key is read once instead of once per query head. It writes
// (max, sum, unnormalised output) per head for its chunk and a second kernel merges the chunks;
// when one chunk covers the keys, the first kernel writes the final output directly.
//
// The kernel template; attention_decode.cu holds its launcher, its instances and the merge.
#pragma once
#include "attention_common.cuh"

namespace lckv::cuda {

namespace {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeKeys = 32;    // keys per tile: one per lane in the softmax step
// Tiles in shared memory: one scored while the next arrives. A third stage measured slower on an
// H100: the shared memory it takes costs resident blocks, which hide latency better.
constexpr int kDecodeStages = 2;
// Query heads one block serves (TinyLlama's group); it bounds the accumulators each lane keeps
// (kGroupHeads x 4 dims at head size 128).
constexpr int kGroupHeads = 8;
constexpr int kHeadsPerWarp = kGroupHeads / kDecodeWarps;
static_assert(kGroupHeads % kDecodeWarps == 0 && kGroupHeads % 4 == 0, "heads are read as float4 per key");
// Splits are at least one tile of keys, and at most kMaxDecodeSplits of them. One sequence of 4096
// tokens has 4 K/V heads to spread over 132 SMs: at 64 splits its attention took 11.9 us on an
// H100 against 15.6 at 32 (a block then streams two tiles instead of four); 128 splits measured
// no faster than 64, and batches of 16 and more are not cut that far anyway (one wave).
constexpr int kMinSplitKeys = kDecodeKeys;

// Floats per key row in shared memory: a whole number of float4 (the dot products read float4)
// and an odd number of them, so lane j reading row j is free of bank conflicts.
__host__ __device__ inline int decodeRowStride(int headDim) {
  const int vecs = (headDim + 3) / 4;
  return 4 * (vecs | 1);
}
// A compact type's tiles arrive as codes, with one (K, V) scale word per key, and the arithmetic
// reads the codes where they arrived, decoding as it goes (no f32 copy of the tile). A tile of
// codes is a half (bf16) to an eighth (int4) of an f32 tile's bytes, so more of them are in
// flight at once (decodeArriveStages): a block keeps about as many bytes coming as with f32.
// Code rows are a whole, odd number of 16-byte pieces apart (or of 4-byte words, for a head too
// small to be copied in 16-byte pieces): lane j reading row j's piece c then meets no bank
// conflict.
template <KvType T>
__host__ __device__ constexpr int decodeArriveStages() { return T == KvType::F32 ? kDecodeStages : T == KvType::BF16 ? 4 : 8; }
__host__ __device__ inline int decodeCodeStride(KvType t, int headDim, bool vec16) {
  const int bytes = kvHeadBytes(t, headDim);
  return vec16 ? 16 * (((bytes + 15) / 16) | 1) : 4 * ((bytes / 4) | 1);
}
// A channel-key type (int4) keeps the f16 K scales of each page a tile touches beside the tile:
// 32 keys from any position touch at most 3 pages of 16 (the launcher refuses smaller pages).
constexpr int kDecodeTilePages = kDecodeKeys / 16 + 1;
template <KvType T>
__host__ __device__ inline int decodeChannelScaleBytes(int headDim) {
  return kvTypeChannelKeys(T) ? kDecodeTilePages * headDim * 2 : 0;
}
// Bytes before the queries: the f32 tiles, or the code tiles and their scales (at least the
// 32 x headDim floats the warps' accumulators are summed through at the end).
template <KvType T>
__host__ __device__ inline size_t decodeTileBytes(int headDim) {
  if (T == KvType::F32) return sizeof(float) * 2 * kDecodeStages * kDecodeKeys * decodeRowStride(headDim);
  const size_t codes = (size_t)decodeArriveStages<T>() *
                       ((size_t)kDecodeKeys * (2 * decodeCodeStride(T, headDim, true) + 4) + decodeChannelScaleBytes<T>(headDim));
  const size_t reduce = sizeof(float) * kDecodeWarps * kGroupHeads * headDim;
  return (codes > reduce ? codes : reduce + 15) / 16 * 16;
}
template <KvType T>
__host__ __device__ inline size_t decodeSmemBytes(int headDim) {
  const int stride = decodeRowStride(headDim);
  return decodeTileBytes<T>(headDim) +
         sizeof(float) * ((size_t)kGroupHeads * stride         // the queries
                          + (size_t)kDecodeKeys * kGroupHeads  // scores, then probabilities
                          + 3 * kGroupHeads);                  // per head: rescale factor, final max and sum
}

// The code of channel d in a row of codes in shared memory.
template <KvType T>
__device__ __forceinline__ uint32_t sharedCode(const uint8_t* row, int d) {
  if (T == KvType::BF16) return *reinterpret_cast<const uint16_t*>(row + 2 * d);
  if (T == KvType::INT4) return (row[d >> 1] >> ((d & 1) * 4)) & 0xfu;
  return row[d];
}

// s[i] += q_i . k, k the kPerWord decoded channels of word w of a key's codes, q_i the query rows
// of this warp's heads (i) at channel w * kPerWord, read as float2 (broadcast: every lane reads them).
template <int kPerWord, int kHeads>
__device__ __forceinline__ void dotDecodedWord(const float (&k)[kPerWord], int w, const float* q0, int qStride,
                                               float (&s)[kHeads]) {
#pragma unroll
  for (int i = 0; i < kHeads; ++i) {
    const float* qw = q0 + i * qStride + w * kPerWord;
#pragma unroll
    for (int e = 0; e < kPerWord; e += 2) {
      const float2 qq = *reinterpret_cast<const float2*>(qw + e);
      s[i] = fmaf(qq.x, k[e], s[i]);
      s[i] = fmaf(qq.y, k[e + 1], s[i]);
    }
  }
}

// s[i] += q_i . (the kPerWord channels of one word of codes).
template <KvType T, int kHeads>
__device__ __forceinline__ void dotCodeWord(uint32_t word, int w, const float* q0, int qStride, float (&s)[kHeads]) {
  constexpr int kPerWord = 32 / kvTypeBits(T);
  float k[kPerWord];
  kvDecodeWord<T>(word, 1.0f, k);
  dotDecodedWord<kPerWord>(k, w, q0, qStride, s);
}

// s[i] += q_i . (the 8 channels of one word of int4 codes, each times its channel's K scale):
// a channel-key type's keys (kv_format.h), whose scales come per channel of the key's page.
// code x scale is rounded once, as kvDecode rounds it on the CPU.
template <KvType T, int kHeads>
__device__ __forceinline__ void dotChannelScaledCodeWord(uint32_t word, int w, const float* q0, int qStride,
                                                         const __half2* channelScales, float (&s)[kHeads]) {
  constexpr int kPerWord = 32 / kvTypeBits(T);
  float k[kPerWord];
  kvDecodeWord<T>(word, 1.0f, k);
#pragma unroll
  for (int e = 0; e < kPerWord; e += 2) {
    const float2 sc = __half22float2(channelScales[(w * kPerWord + e) / 2]);
    k[e] *= sc.x;
    k[e + 1] *= sc.y;
  }
  dotDecodedWord<kPerWord>(k, w, q0, qStride, s);
}

// Starts copying keys j0 + lo .. j0 + hi - 1 of the block's K/V head into rows lo .. hi - 1 of
// one stage's K and V tiles (rows of dstStride bytes) and, for a scaled type, their scale words
// into scaleDst[lo .. hi - 1]. Lane j looks up key j0 + j's page once (all lanes at once, so the
// table reads overlap), and the warp's copies take each key row's offset from its lane.
// Consecutive threads copy consecutive pieces of a key row (coalesced); 16-byte pieces need every
// row 16-byte aligned (kvRowsLoadAs16Bytes), else they are 4 bytes. A channel-key type's scale
// word is the one that holds the key's V scale (kvValueScaleWordOffset), and the K scales of
// each page the keys touch go to channelScaleDst[page - (j0's page)][headDim] (f16).
template <KvType T>
__device__ __forceinline__ void loadDecodeTile(uint8_t* kDst, uint8_t* vDst, uint32_t* scaleDst, uint8_t* channelScaleDst,
                                               const uint8_t* kBase, const uint8_t* vBase, const int32_t* table,
                                               const PagedKv& kv, int kvh, int j0, int lo, int hi, int headBytes,
                                               int dstStride, bool vec16) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j = j0 + lane;
  const bool mine = lane >= lo && lane < hi;
  const int64_t rowOffset = mine ? kvRowOffset(table, kv, kvPageMask(kv), j) : 0;
  const int width = vec16 ? 16 : 4, perRow = headBytes / width, total = (hi - lo) * perRow;
  for (int e0 = warp * 32; e0 < total; e0 += kDecodeWarps * 32) {  // warp-uniform: the shuffle needs every lane
    const int e = e0 + lane;
    const int jj = min(lo + e / perRow, kDecodeKeys - 1), c = (e - (jj - lo) * perRow) * width;
    const int64_t off = __shfl_sync(0xffffffffu, rowOffset, jj) + c;
    if (e < total) {
      if (vec16) {
        copyAsync16(kDst + jj * dstStride + c, kBase + off);
        copyAsync16(vDst + jj * dstStride + c, vBase + off);
      } else {
        copyAsync4(kDst + jj * dstStride + c, kBase + off);
        copyAsync4(vDst + jj * dstStride + c, vBase + off);
      }
    }
  }
  if constexpr (kvTypeChannelKeys(T)) {
    if (warp == kDecodeWarps - 1 && mine) copyAsync4(scaleDst + lane, kv.pool + kvValueScaleWordOffset(kv, table, j, kvh));
    const int headDim = headBytes * 8 / kvTypeBits(T), pairs = headDim / 2;
    const int firstPage = (j0 + lo) >> kv.pageShift, pages = ((j0 + hi - 1) >> kv.pageShift) - firstPage + 1;
    const int slot0 = firstPage - (j0 >> kv.pageShift);
    for (int e = threadIdx.x; e < pages * pairs; e += kDecodeWarps * 32) {
      const int page = e / pairs, pair = e - page * pairs;
      copyAsync4(channelScaleDst + ((slot0 + page) * pairs + pair) * 4,
                 kv.pool + kvKeyScalesOffset(kv, table[firstPage + page], kvh, headDim) + pair * 4);
    }
  } else if (kvTypeScaled(T) && warp == kDecodeWarps - 1 && mine) {
    copyAsync4(scaleDst + lane, kv.pool + kvScaleOffset(kv, table, j, kvh));
  }
}

// One block: row blockIdx.x, K/V head blockIdx.y / headChunks (its query heads cut into
// headChunks blocks of at most headsPerBlock), split blockIdx.z of gridDim.z.
//   Scores: lane = key of the tile, warp w = heads w and w + 4 (dot products from shared memory:
//     the key row is read once for both heads, the query as a broadcast).
//   Softmax: the warp that scored head g keeps its running max and sum, and turns the tile's
//     scores into probabilities against the new max (and a factor for the old accumulators).
//   P.V: warp w takes keys w, w + 4, ...; lane holds dims lane + 32 t of every head, so a value
//     row is read once for all heads. The warps' accumulators are summed at the end.
template <int kDimsPerLane, KvType T>
__global__ void __launch_bounds__(kDecodeWarps * 32) attentionDecodeKernel(
    const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv, int numHeads, int numKvHeads,
    int headDim, bool strict, int window, float scale, int headChunks, int headsPerBlock, bool vec16,
    DecodeSpan span, AttentionOut out, float* __restrict__ partial) {
  constexpr bool kCodes = T != KvType::F32;  // tiles arrive as codes, read where they arrive
  constexpr bool kChannelKeys = kvTypeChannelKeys(T);
  constexpr int kStages = decodeArriveStages<T>();
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int stride = decodeRowStride(headDim);
  const int tileFloats = kDecodeKeys * stride;
  // The tiles: f32 [stages][keys][stride] for K then V, or codes [stages][keys][arriveStride]
  // bytes for K then V, the scale words [stages][keys] and (channel-key types) the K scales
  // [stages][kDecodeTilePages][headDim] f16.
  float* kS = smem;
  float* vS = kS + kDecodeStages * tileFloats;  // (f32 only)
  const int headBytes = kvHeadBytes(T, headDim);
  const int arriveStride = kCodes ? decodeCodeStride(T, headDim, vec16) : stride * (int)sizeof(float);
  const int arriveTile = kDecodeKeys * arriveStride;
  uint8_t* kArrive = reinterpret_cast<uint8_t*>(kS);
  uint8_t* vArrive = kCodes ? kArrive + kStages * arriveTile : reinterpret_cast<uint8_t*>(vS);
  uint32_t* scaleArrive = reinterpret_cast<uint32_t*>(vArrive + kStages * arriveTile);
  uint8_t* channelScaleArrive = reinterpret_cast<uint8_t*>(scaleArrive + kStages * kDecodeKeys);
  const int channelScaleTile = decodeChannelScaleBytes<T>(headDim);
  float* qS = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(smem) + decodeTileBytes<T>(headDim));  // [kGroupHeads][stride]
  float* pS = qS + kGroupHeads * stride;           // [keys][kGroupHeads]
  float* corrS = pS + kDecodeKeys * kGroupHeads;   // [kGroupHeads]
  float* maxS = corrS + kGroupHeads;               // [kGroupHeads]
  float* sumS = maxS + kGroupHeads;                // [kGroupHeads]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const DecodeBlock b = decodeBlock<kDecodeKeys>(positions, kv, numHeads, numKvHeads, strict, window, headChunks,
                                                 headsPerBlock, headBytes, span);
  const int r = b.r, split = b.split, kvh = b.kvh, h0 = b.h0, heads = b.heads;
  const int32_t* table = b.table;
  const uint8_t *kBase = b.kBase, *vBase = b.vBase;
  const int first = b.first, keys = b.keys, numTiles = b.numTiles, firstTileKeys = b.firstTileKeys, earlyKeys = b.earlyKeys;

  // Everything above, and the keys of the first tile that no kernel of this step writes, come
  // before the wait for the preceding kernel (under programmatic launch they load while it
  // runs): positions and page tables are the step's inputs, and this op's rows write K/V only
  // at their own positions, which for this row's sequence are p - (n - 1) or later. A short
  // context's block streams a single tile, so at batch 1 the wait is followed by the queries
  // and the arithmetic alone.
  if (earlyKeys > 0)
    loadDecodeTile<T>(kArrive, vArrive, scaleArrive, channelScaleArrive, kBase, vBase, table, kv, kvh, first, 0,
                      earlyKeys, headBytes, arriveStride, vec16);
  // While the first tile arrives: zero the f32 K rows' padding (the float4 dot products read it;
  // the copies never write it).
  const int pad = stride - headDim;
  if (!kCodes)
    for (int e = threadIdx.x; e < kDecodeStages * kDecodeKeys * pad; e += blockDim.x)
      kS[(e / pad) * stride + headDim + e % pad] = 0.0f;
  waitForPrecedingKernels();
  if (earlyKeys < firstTileKeys)
    loadDecodeTile<T>(kArrive, vArrive, scaleArrive, channelScaleArrive, kBase, vBase, table, kv, kvh, first, earlyKeys,
                      firstTileKeys, headBytes, arriveStride, vec16);
  copyAsyncCommit();
  // The tiles after the first, up to one stage short of all (the loop issues the last), one
  // group each (an empty group past the end keeps the count the loop waits on).
#pragma unroll
  for (int st = 1; st < kStages - 1; ++st) {
    if (st < numTiles)
      loadDecodeTile<T>(kArrive + st * arriveTile, vArrive + st * arriveTile, scaleArrive + st * kDecodeKeys,
                        channelScaleArrive + st * channelScaleTile, kBase, vBase, table, kv, kvh, first + st * kDecodeKeys,
                        0, min(kDecodeKeys, keys - st * kDecodeKeys), headBytes, arriveStride, vec16);
    copyAsyncCommit();
  }
  // The queries (written by the preceding kernel), zero-padded.
  for (int e = threadIdx.x; e < kGroupHeads * stride; e += blockDim.x) {
    const int g = e / stride, d = e - g * stride;
    qS[e] = g < heads && d < headDim ? q[((int64_t)r * numHeads + h0 + g) * headDim + d] : 0.0f;
  }

  float acc[kGroupHeads][kDimsPerLane];
#pragma unroll
  for (int g = 0; g < kGroupHeads; ++g)
#pragma unroll
    for (int t = 0; t < kDimsPerLane; ++t) acc[g][t] = 0.0f;
  float m[kHeadsPerWarp], l[kHeadsPerWarp];
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  const int vecs = (headDim + 3) / 4;

  for (int tile = 0; tile < numTiles; ++tile) {
    const int ahead = tile + kStages - 1;
    if (ahead < numTiles) {
      const int st = ahead % kStages;
      loadDecodeTile<T>(kArrive + st * arriveTile, vArrive + st * arriveTile, scaleArrive + st * kDecodeKeys,
                        channelScaleArrive + st * channelScaleTile, kBase, vBase, table, kv, kvh,
                        first + ahead * kDecodeKeys, 0, min(kDecodeKeys, keys - ahead * kDecodeKeys), headBytes,
                        arriveStride, vec16);
    }
    copyAsyncCommit();
    copyAsyncWait<kStages - 1>();
    __syncthreads();  // this tile (and, the first time, the queries and padding) is in place
    const int valid = min(kDecodeKeys, keys - tile * kDecodeKeys);
    const int st = tile % kStages;
    const float* kt = kS + st * tileFloats;  // (f32)
    const float* vt = vS + st * tileFloats;
    const uint8_t* kc = kArrive + st * arriveTile;  // (codes)
    const uint8_t* vc = vArrive + st * arriveTile;
    const uint32_t* scales = scaleArrive + st * kDecodeKeys;
    const int j0 = first + tile * kDecodeKeys;  // the tile's first key

    // Scores of key `lane` against this warp's heads.
    {
      float s[kHeadsPerWarp];
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) s[i] = 0.0f;
      const float* q0 = qS + warp * stride;  // head warp + kDecodeWarps * i at q0 + i * kDecodeWarps * stride
      if constexpr (kChannelKeys) {
        // The K scales of key `lane`'s page (a key past the tile's end reads some page's; its
        // score is dropped below).
        const int page = min(((j0 + lane) >> kv.pageShift) - (j0 >> kv.pageShift), kDecodeTilePages - 1);
        const __half2* channelScales =
            reinterpret_cast<const __half2*>(channelScaleArrive + st * channelScaleTile + page * headDim * 2);
        const uint8_t* krow = kc + lane * arriveStride;
        for (int w = 0; w < headBytes / 4; ++w)
          dotChannelScaledCodeWord<T>(*reinterpret_cast<const uint32_t*>(krow + 4 * w), w, q0, kDecodeWarps * stride,
                                      channelScales, s);
      } else if constexpr (kCodes) {
        const uint8_t* krow = kc + lane * arriveStride;
        if (vec16) {
          for (int c = 0; c < headBytes / 16; ++c) {
            const uint4 w4 = *reinterpret_cast<const uint4*>(krow + 16 * c);
            dotCodeWord<T>(w4.x, 4 * c, q0, kDecodeWarps * stride, s);
            dotCodeWord<T>(w4.y, 4 * c + 1, q0, kDecodeWarps * stride, s);
            dotCodeWord<T>(w4.z, 4 * c + 2, q0, kDecodeWarps * stride, s);
            dotCodeWord<T>(w4.w, 4 * c + 3, q0, kDecodeWarps * stride, s);
          }
        } else {
          for (int w = 0; w < headBytes / 4; ++w)
            dotCodeWord<T>(*reinterpret_cast<const uint32_t*>(krow + 4 * w), w, q0, kDecodeWarps * stride, s);
        }
        const float kScale = kvTypeScaled(T) ? kvF16ToF32((uint16_t)scales[lane]) : 1.0f;
#pragma unroll
        for (int i = 0; i < kHeadsPerWarp; ++i) s[i] *= kScale;
      } else {
        const float4* k4 = reinterpret_cast<const float4*>(kt + lane * stride);
        for (int c = 0; c < vecs; ++c) {
          const float4 kk = k4[c];
#pragma unroll
          for (int i = 0; i < kHeadsPerWarp; ++i) {
            const float4 qq = reinterpret_cast<const float4*>(q0 + i * kDecodeWarps * stride)[c];
            s[i] = fmaf(qq.x, kk.x, s[i]);
            s[i] = fmaf(qq.y, kk.y, s[i]);
            s[i] = fmaf(qq.z, kk.z, s[i]);
            s[i] = fmaf(qq.w, kk.w, s[i]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i)
        pS[lane * kGroupHeads + warp + kDecodeWarps * i] = lane < valid ? s[i] * scale : -INFINITY;
    }
    __syncthreads();

    // Online softmax of each head over the tile.
#pragma unroll
    for (int i = 0; i < kHeadsPerWarp; ++i) {
      const int g = warp + kDecodeWarps * i;
      if (g >= heads) break;  // warp-uniform
      const float s = pS[lane * kGroupHeads + g];
      const float mNew = fmaxf(m[i], warpMax(s));  // finite: the tile has a valid key
      const float p = lane < valid ? expf(s - mNew) : 0.0f;
      const float corr = expf(m[i] - mNew);  // 0 on the first tile (m = -inf)
      l[i] = l[i] * corr + warpSum(p);
      m[i] = mNew;
      pS[lane * kGroupHeads + g] = p;
      if (lane == 0) corrS[g] = corr;
    }
    __syncthreads();

    // Accumulate P.V for every head.
#pragma unroll
    for (int g = 0; g < kGroupHeads; ++g) {
      if (g < heads) {
        const float corr = corrS[g];
#pragma unroll
        for (int t = 0; t < kDimsPerLane; ++t) acc[g][t] *= corr;
      }
    }
    for (int jj = warp; jj < valid; jj += kDecodeWarps) {
      float vv[kDimsPerLane];
      if constexpr (kCodes) {
        const uint8_t* vrow = vc + jj * arriveStride;
        const int vHalf = kChannelKeys ? kvValueScaleHalf(kv, j0 + jj, kvh) : 1;  // the V scale's half of its word
        const float vScale = kvTypeScaled(T) ? kvF16ToF32((uint16_t)(scales[jj] >> (16 * vHalf))) : 1.0f;
#pragma unroll
        for (int t = 0; t < kDimsPerLane; ++t) {
          const int d = lane + 32 * t;
          vv[t] = d < headDim ? kvDecode(T, sharedCode<T>(vrow, d), vScale) : 0.0f;
        }
      } else {
#pragma unroll
        for (int t = 0; t < kDimsPerLane; ++t) {
          const int d = lane + 32 * t;
          vv[t] = d < headDim ? vt[jj * stride + d] : 0.0f;
        }
      }
      float p[kGroupHeads];
#pragma unroll
      for (int g4 = 0; g4 < kGroupHeads / 4; ++g4) {
        const float4 pp = reinterpret_cast<const float4*>(pS + jj * kGroupHeads)[g4];
        p[4 * g4] = pp.x;
        p[4 * g4 + 1] = pp.y;
        p[4 * g4 + 2] = pp.z;
        p[4 * g4 + 3] = pp.w;
      }
#pragma unroll
      for (int g = 0; g < kGroupHeads; ++g) {
        if (g < heads) {
#pragma unroll
          for (int t = 0; t < kDimsPerLane; ++t) acc[g][t] = fmaf(p[g], vv[t], acc[g][t]);
        }
      }
    }
    __syncthreads();  // the tile's buffers and the probabilities are free again
  }

  // Sum the warps' accumulators through the (now idle) tile buffers and write the result.
  copyAsyncWait<0>();
  __syncthreads();
  float* red = smem;  // [warps][kGroupHeads][headDim]: 32 * headDim floats fit in the K tiles
#pragma unroll
  for (int g = 0; g < kGroupHeads; ++g) {
    if (g < heads) {
#pragma unroll
      for (int t = 0; t < kDimsPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < headDim) red[(warp * kGroupHeads + g) * headDim + d] = acc[g][t];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    const int g = warp + kDecodeWarps * i;
    if (g < heads && lane == 0) {
      maxS[g] = m[i];
      sumS[g] = l[i];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < heads * headDim; e += blockDim.x) {
    const int g = e / headDim, d = e - g * headDim;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) v += red[(w * kGroupHeads + g) * headDim + d];
    const int64_t rh = (int64_t)r * numHeads + h0 + g;
    if (span.outSplits == 1) {
      out.store(rh * headDim + d, sumS[g] > 0.0f ? v / sumS[g] : 0.0f);
    } else {
      partial[(rh * span.outSplits + span.splitBase + split) * (headDim + 2) + 2 + d] = v;
    }
  }
  if (span.outSplits > 1 && threadIdx.x < heads) {
    const int g = threadIdx.x;
    const int64_t slot = ((int64_t)r * numHeads + h0 + g) * span.outSplits + span.splitBase + split;
    partial[slot * (headDim + 2)] = maxS[g];  // -inf for an empty chunk: the merge skips it
    partial[slot * (headDim + 2) + 1] = sumS[g];
  }
}

}  // namespace

}  // namespace lckv::cuda
