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

// Internal linkage, as in every kernel file: each .cu that includes this has its own copy, and
// the kernels built on it keep the names they show in profiles.
namespace {

constexpr int kMaxDimsPerLane = 4;  // headDim <= 128

struct Range {
  int first, last;  // visible keys [first, last]; empty when last < first
};

__device__ __forceinline__ Range visible(int p, bool strict, int window) {
  return {window > 0 ? max(0, p - window + 1) : 0, strict ? p - 1 : p};
}

// ---- the paged K/V pool (PagedKv, kernels.h) ---------------------------------------------------
// The pages hold [K | V][pageTokens][kvDim] per slot: within a page, keys are contiguous. Key j
// of K/V head kvh is at kvHeadBase(kv, 0 for K or 1 for V, kvh, headDim) + kvRowOffset(table,
// kv, kvPageMask(kv), j), with the page table of the row's sequence. (The mask is an argument so
// that a kernel can compute it once, outside its loops.)
__device__ __forceinline__ const int32_t* kvPageTable(const PagedKv& kv, int row) {
  return kv.tables + (int64_t)kv.rowSeq[row] * kv.stride;
}
__device__ __forceinline__ const float* kvHeadBase(const PagedKv& kv, int v, int kvh, int headDim) {
  return kv.pool + ((int64_t)(kv.slot * 2 + v) << kv.pageShift) * kv.kvDim + kvh * headDim;
}
__device__ __forceinline__ int kvPageMask(const PagedKv& kv) { return (1 << kv.pageShift) - 1; }
__device__ __forceinline__ int64_t kvRowOffset(const int32_t* table, const PagedKv& kv, int pageMask, int j) {
  return (int64_t)table[j >> kv.pageShift] * kv.pageFloats + (int64_t)(j & pageMask) * kv.kvDim;
}

// Whether a head's K/V rows in the paged pool can be read as float4 (16-byte aligned rows).
inline bool kvRowsLoadAsFloat4(const PagedKv& kv, int headDim) {
  return headDim % 4 == 0 && kv.kvDim % 4 == 0 && kv.pageFloats % 4 == 0 && reinterpret_cast<uintptr_t>(kv.pool) % 16 == 0;
}

}  // namespace

// ---- launchers for one head-size class -------------------------------------------------------
namespace attention {

// Decode (attention_decode.cu), for kDimsPerLane 1 to kMaxDimsPerLane (head sizes up to
// 32 * kDimsPerLane): the blocks that serve one K/V head's query heads, the number of splits of
// the keys, the launch (out when splits == 1, else n * numHeads * splits * (headDim + 2) partial
// results in `partial`), and the merge of the partial results into out.
void decodeHeadBlocks(int group, int& headsPerBlock, int& headChunks);
template <int kDimsPerLane>
int decodeSplits(int64_t blocks, int headDim, int maxVisible);
template <int kDimsPerLane>
void launchDecode(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                  int headDim, bool strict, int window, float scale, int headChunks, int headsPerBlock, int splits,
                  float* out, float* partial, cudaStream_t stream);
void launchDecodeMerge(const float* partial, int n, int numHeads, int headDim, int splits, float* out,
                       cudaStream_t stream);

// Prefill (attention_prefill.cu), for kDim 16, 32, 64 and 128: the head size rounded up to one
// of them (zero-padded).
template <int kDim>
void launchPrefill(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                   int headDim, bool strict, int window, float scale, float* out, cudaStream_t stream);

}  // namespace attention

}  // namespace lckv::cuda
