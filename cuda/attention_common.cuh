// Shared by the attention files: which keys a query sees (the plan's diagonal rule and sliding
// window), the largest head size, where a key's K and V rows lie in the paged pool and whether
// they load as float4, and the launchers of each kernel family for one head-size class. attention.cu picks the class
// (the one place a head size becomes a template argument) and calls them; attention_decode.cu and
// attention_prefill.cu define and instantiate them for every class.
#pragma once
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

// Where attention writes its rows: f32, or bf16 when they only feed the output projection's
// cuBLASLt product (which reads bf16). One flag for the whole launch, so the branch costs nothing.
struct AttentionOut {
  void* data;
  bool bf16;
  __device__ __forceinline__ void store(int64_t i, float v) const {
    if (bf16) static_cast<__nv_bfloat16*>(data)[i] = __float2bfloat16(v);
    else static_cast<float*>(data)[i] = v;
  }
};

// External linkage (outside the unnamed namespace below): the launchers that attention.cu calls
// take a DecodeSpan, and attention_decode.cu defines them, so both must name one type.
//
// Which of a row's visible keys a decode launch takes. A channel-key type (int4, kv_format.h)
// reads a query's keys in two launches into one split-K workspace, whose partial results the
// merge kernel combines:
//   CompletePages: from the int4 pages, the keys up to the last visible one's page when that page
//     is complete (its last row is the last visible key), else up to the start of that page;
//   PartialPage: the keys of the last visible one's page when it is not complete, from the
//     residual's bf16 view (residualView), numbered from the page's start; none otherwise.
// All (every other type) takes every visible key. pageShift is the cache's log2(pageTokens).
// The launch's gridDim.z splits write partial results [splitBase, splitBase + gridDim.z) of
// outSplits per (row, head); outSplits 1: the launch writes the output itself.
enum class DecodeKeys : int { All = 0, CompletePages = 1, PartialPage = 2 };
struct DecodeSpan {
  DecodeKeys keys = DecodeKeys::All;
  int pageShift = 0;
  int splitBase = 0;
  int outSplits = 1;
};

// Internal linkage, as in every kernel file: each .cu that includes this has its own copy, and
// the kernels built on it keep the names they show in profiles.
namespace {

constexpr int kMaxDimsPerLane = kMaxHeadDim / 32;
static_assert(kMaxDimsPerLane * 32 == kMaxHeadDim, "a warp's lanes hold the largest head in whole dims each");
// Splits of a decode row's keys at most (the merge kernel keeps one weight per split).
constexpr int kMaxDecodeSplits = 64;
// log2(e) and ln(2): the tensor-core kernels keep scores in log2 units (one exp2 a weight); the
// split-K merge's partial maxima are natural logs.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x and log2(x), one MUFU instruction each. exp2f and __log2f wrap the same instruction in a
// fix-up for results (arguments) below 2^-126, three more instructions on the softmax's path
// that no caller here needs: a weight or rescale that small is below f32's rounding of the sum
// it joins (the running maximum's own weight is 1), and the logs taken are of f16 scales
// (2^-24 and up). Above 2^-126 the results are the same bits.
__device__ __forceinline__ float exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float log2Ftz(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

struct Range {
  int first, last;  // visible keys [first, last]; empty when last < first
};

__device__ __forceinline__ Range visible(int p, bool strict, int window) {
  return {window > 0 ? max(0, p - window + 1) : 0, strict ? p - 1 : p};
}

__device__ __forceinline__ Range visibleKeys(int p, bool strict, int window, const DecodeSpan& span) {
  const Range all = visible(p, strict, window);
  if (span.keys == DecodeKeys::All) return all;
  const int mask = (1 << span.pageShift) - 1;
  const int pageStart = all.last & ~mask;              // of the last visible key's page (all.last -1: none)
  const bool complete = (all.last & mask) == mask;     // true for all.last = -1 too: nothing partial
  if (span.keys == DecodeKeys::CompletePages) return {all.first, complete ? all.last : pageStart - 1};
  if (complete) return {0, -1};
  return {max(all.first, pageStart) - pageStart, all.last - pageStart};
}

// A decode block's chunk of its row's visible keys (the row at position p): split `split` of
// `splits`, `keys` keys from `first` on. Cut on the device from the row's position rather than
// by the host, so a launch replayed from a CUDA graph at later positions still covers every key
// (the number of splits is fixed; a split past the end gets no keys and writes an empty partial).
// align (a power of two): the chunks start at multiples of align keys, from the first visible
// key rounded down to one, and the `lead` keys of the first chunk that come before the first
// visible key are not visible (the kernel masks them). The tensor-core kernel aligns an int4
// launch to 16 keys, so that each warp's 16 keys of a tile lie in one page (pages are 16 keys
// or more, a power of two) and share its K scales.
struct DecodeChunk {
  int first, keys, lead;
};
__device__ __forceinline__ DecodeChunk decodeChunk(int p, bool strict, int window, int split, int splits,
                                                   const DecodeSpan& span, int align = 1) {
  const Range all = visibleKeys(p, strict, window, span);
  const int base = all.first & -align;
  const int count = all.last < all.first ? 0 : all.last - base + 1;
  const int chunk = ((count + splits - 1) / splits + align - 1) & -align;
  const int first = base + split * chunk;
  return {first, max(0, min(count - split * chunk, chunk)), max(0, all.first - first)};
}
// Of the chunk's first tile (firstTileKeys keys), those that no kernel of this step writes: a
// step's n rows write K/V only at their own positions, which for this row's sequence are
// p - (n - 1) or later. They may load before the wait for the preceding kernel. A channel-key
// type's write also quantizes the page of those rows when they complete it (the kernel just
// before the int4 launch), so that launch loads early only the pages below it; the residual's
// keys are numbered from its page's start.
__device__ __forceinline__ int decodeEarlyKeys(int p, int n, bool strict, int first, int firstTileKeys,
                                               const DecodeSpan& span) {
  int written = p - n + 1;  // the first key this step writes, in the launch's numbering
  if (span.keys != DecodeKeys::All) {
    const int mask = (1 << span.pageShift) - 1;
    if (span.keys == DecodeKeys::CompletePages) written &= ~mask;
    else written -= (strict ? p - 1 : p) & ~mask;
  }
  return min(firstTileKeys, max(0, written - first));
}

// ---- the paged K/V pool (PagedKv, kernels.h) ---------------------------------------------------
// The pages hold per slot [K codes | V codes][pageTokens][rowBytes], then the scales: within a
// page, keys are contiguous. Key j's K codes of K/V head kvh are at byte kvHeadBase(kv, 0 for K
// or 1 for V, kvh, headBytes) + kvRowOffset(table, kv, kvPageMask(kv), j) of the pool, with the
// page table of the row's sequence; its scale word at kvScaleOffset (common.cuh). (The mask is
// an argument so that a kernel can compute it once, outside its loops.)
__device__ __forceinline__ const int32_t* kvPageTable(const PagedKv& kv, int row) {
  return kv.tables + (int64_t)kv.rowSeq[row] * kv.stride;
}
__device__ __forceinline__ const uint8_t* kvHeadBase(const PagedKv& kv, int v, int kvh, int headBytes) {
  return kv.pool + kv.slotOffset + ((int64_t)v << kv.pageShift) * kv.rowBytes + (int64_t)kvh * headBytes;
}
__device__ __forceinline__ int kvPageMask(const PagedKv& kv) { return (1 << kv.pageShift) - 1; }
__device__ __forceinline__ int64_t kvRowOffset(const int32_t* table, const PagedKv& kv, int pageMask, int j) {
  return (int64_t)table[j >> kv.pageShift] * kv.pageBytes + (int64_t)(j & pageMask) * kv.rowBytes;
}

// Bytes of one key's codes of one K/V head.
__host__ __device__ constexpr int kvHeadBytes(KvType t, int headDim) { return headDim * kvTypeBits(t) / 8; }

// What one block of either decode kernel (attention_decode.cuh, attention_decode_mma.cuh) works
// on: row blockIdx.x; K/V head kvh = blockIdx.y / headChunks and its query heads [h0, h0 + heads)
// (the head's group cut into headChunks blocks of at most headsPerBlock); the row's page table
// and the head's K and V bases in the pool (heads of headBytes); split blockIdx.z of gridDim.z
// and its chunk of the row's visible keys (decodeChunk) in numTiles tiles of kTileKeys; and of
// the first tile's firstTileKeys keys, the earlyKeys that may load before the wait for the
// preceding kernel (decodeEarlyKeys). With align > 1 the chunk's first `lead` keys are not
// visible (decodeChunk).
struct DecodeBlock {
  int r, split, splits, kvh, h0, heads;
  const int32_t* table;
  const uint8_t* kBase;
  const uint8_t* vBase;
  int first, keys, lead, numTiles, firstTileKeys, earlyKeys;
};
template <int kTileKeys>
__device__ __forceinline__ DecodeBlock decodeBlock(const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                                                   bool strict, int window, int headChunks, int headsPerBlock, int headBytes,
                                                   const DecodeSpan& span = DecodeSpan{}, int align = 1) {
  DecodeBlock b;
  b.r = blockIdx.x;
  b.split = blockIdx.z;
  b.splits = gridDim.z;
  const int group = numHeads / numKvHeads;
  const int part = blockIdx.y % headChunks;
  b.kvh = blockIdx.y / headChunks;
  b.h0 = b.kvh * group + part * headsPerBlock;
  b.heads = min(headsPerBlock, group - part * headsPerBlock);
  b.table = kvPageTable(kv, b.r);
  b.kBase = kvHeadBase(kv, 0, b.kvh, headBytes);
  b.vBase = kvHeadBase(kv, 1, b.kvh, headBytes);
  const int p = positions[b.r];
  const DecodeChunk chunk = decodeChunk(p, strict, window, b.split, b.splits, span, align);
  b.first = chunk.first;
  b.keys = chunk.keys;
  b.lead = chunk.lead;
  b.numTiles = (b.keys + kTileKeys - 1) / kTileKeys;
  b.firstTileKeys = min(kTileKeys, b.keys);
  b.earlyKeys = decodeEarlyKeys(p, (int)gridDim.x, strict, b.first, b.firstTileKeys, span);
  return b;
}

// Channel-key types (int4, kv_format.h): the byte offset of K/V head kvh's f16 K scales (one per
// channel, headDim of them) in pool page `page`, and of the 32-bit word that holds key j's f16 V
// scale, whose half kvValueScaleHalf is (the other half is a neighbouring key's or head's: a
// copy of the word is 4-byte aligned, a copy of the half would not be).
__device__ __forceinline__ int64_t kvKeyScalesOffset(const PagedKv& kv, int32_t page, int kvh, int headDim) {
  return (int64_t)page * kv.pageBytes + kv.slotOffset + ((int64_t)2 << kv.pageShift) * kv.rowBytes + (int64_t)kvh * headDim * 2;
}
__device__ __forceinline__ int kvValueScaleIndex(const PagedKv& kv, int j, int kvh) {
  return (j & kvPageMask(kv)) * kv.kvHeads + kvh;
}
__device__ __forceinline__ int64_t kvValueScaleWordOffset(const PagedKv& kv, const int32_t* table, int j, int kvh) {
  return (int64_t)table[j >> kv.pageShift] * kv.pageBytes + kv.slotOffset + ((int64_t)2 << kv.pageShift) * kv.rowBytes +
         (int64_t)kv.kvDim * 2 + (int64_t)(kvValueScaleIndex(kv, j, kvh) & ~1) * 2;
}
__device__ __forceinline__ int kvValueScaleHalf(const PagedKv& kv, int j, int kvh) { return kvValueScaleIndex(kv, j, kvh) & 1; }

// Whether a head's K/V rows in the paged pool can be read in 16-byte pieces (rows, pages and
// the pool 16-byte aligned); else 4-byte pieces (every compact head's bytes are a multiple of 4).
inline bool kvRowsLoadAs16Bytes(const PagedKv& kv, int headDim) {
  const int headBytes = kvHeadBytes((KvType)kv.type, headDim);
  return headBytes % 16 == 0 && kv.rowBytes % 16 == 0 && kv.pageBytes % 16 == 0 && kv.slotOffset % 16 == 0 &&
         reinterpret_cast<uintptr_t>(kv.pool) % 16 == 0;
}

// Decodes the 32-bit word w of a head's codes (channels w * 32 / bits ...) into dst, times the
// scale (scaled types).
template <KvType T>
__device__ __forceinline__ void kvDecodeWord(uint32_t word, float scale, float* dst) {
  constexpr int kBits = kvTypeBits(T), kPerWord = 32 / kBits;
  constexpr uint32_t kMask = kBits == 32 ? 0xffffffffu : (1u << (kBits & 31)) - 1u;
#pragma unroll
  for (int i = 0; i < kPerWord; ++i) dst[i] = kvDecode(T, (word >> ((i * kBits) & 31)) & kMask, scale);
}

// Asynchronous global -> shared copies (sm_80 and later; a plain copy before).
__device__ __forceinline__ void copyAsync16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
// The same 16-byte copy that reads only srcBytes (0 or 16) of src and zero-fills the rest: rows
// past a tile's last key arrive as zeros, which decode to finite values (0 x NaN would not).
__device__ __forceinline__ void copyAsync16Fill(void* dst, const void* src, int srcBytes) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src),
               "r"(srcBytes)
               : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = srcBytes ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void copyAsync4Fill(void* dst, const void* src, int srcBytes) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src),
               "r"(srcBytes)
               : "memory");
#else
  *reinterpret_cast<uint32_t*>(dst) = srcBytes ? *reinterpret_cast<const uint32_t*>(src) : 0u;
#endif
}
__device__ __forceinline__ void copyAsync4(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
#else
  *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
#endif
}
__device__ __forceinline__ void copyAsyncCommit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void copyAsyncWait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

}  // namespace

// ---- launchers for one head-size class -------------------------------------------------------
namespace attention {

// Each for every K/V type T (kv_format.h).
// Decode (attention_decode.cu), for kDimsPerLane 1 to kMaxDimsPerLane (head sizes up to
// 32 * kDimsPerLane): the blocks that serve one K/V head's query heads, the number of splits of
// the keys, the launch of `splits` splits over the keys `span` takes (out when span.outSplits ==
// 1, else partial results [span.splitBase, + splits) of n * numHeads * span.outSplits *
// (headDim + 2) in `partial`), and the merge of the partial results into out.
void decodeHeadBlocks(int group, int& headsPerBlock, int& headChunks);
template <int kDimsPerLane, KvType T>
int decodeSplits(int64_t blocks, int headDim, int maxVisible);
template <int kDimsPerLane, KvType T>
void launchDecode(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                  int headDim, bool strict, int window, float scale, int headChunks, int headsPerBlock, int splits,
                  AttentionOut out, float* partial, cudaStream_t stream, const DecodeSpan& span);
void launchDecodeMerge(const float* partial, int n, int numHeads, int headDim, int splits, AttentionOut out,
                       cudaStream_t stream);

// Decode on the tensor cores (attention_decode_mma.cu), for compact K/V types at head sizes
// kDim = 32, 64 and 128 with rows that load in 16-byte pieces (decodeUsesMma): the same blocks,
// splits (at most one per 64 keys), spans and partial results as the CUDA-core kernel; a
// channel-key type (int4) takes DecodeKeys::CompletePages only.
bool decodeUsesMma(KvType type, int headDim, const PagedKv& kv);
template <int kDim, KvType T>
int decodeMmaSplits(int64_t blocks, int maxVisible);
template <int kDim, KvType T>
void launchDecodeMma(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                     bool strict, int window, float scale, int headChunks, int headsPerBlock, int splits, AttentionOut out,
                     float* partial, cudaStream_t stream, const DecodeSpan& span);

// Prefill, for kDim 16, 32, 64 and 128: the head size rounded up to one of them (zero-padded).
// An f32 cache on tf32 products (attention_prefill.cu), a compact type T on bf16 products
// (attention_prefill_bf16.cu).
template <int kDim>
void launchPrefill(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                   int headDim, bool strict, int window, float scale, AttentionOut out, cudaStream_t stream);
template <int kDim, KvType T>
void launchPrefillBf16(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                       int headDim, bool strict, int window, float scale, AttentionOut out, cudaStream_t stream);

}  // namespace attention

}  // namespace lckv::cuda
