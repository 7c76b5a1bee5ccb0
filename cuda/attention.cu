// Condensed-KV attention: the queries of one layer attend to the K/V slot of the layer's
// target, with the plan's diagonal rule (strict: keys < p; no visible key -> zero output) and
// sliding window. GQA maps query head h to K/V head h / (numHeads / numKvHeads).
//
// This file picks the kernel and its head-size class and launches it: split-K flash-decoding for
// rows of different sequences (attention_decode.cuh, attention_decode.cu; on the tensor cores
// for a compact K/V type at head sizes 32, 64 and 128: attention_decode_mma.cuh,
// attention_decode_mma.cu) and flash attention on the tensor cores for 16 or more queries of
// one sequence (an f32 cache: attention_prefill.cuh, attention_prefill.cu; a compact type:
// attention_prefill_bf16.cuh, attention_prefill_bf16.cu); and it cuts a call's rows into the
// parts each kernel takes (attentionParts), since a mixed step has both. What the kernels share
// is in attention_common.cuh, and their tensor-core primitives in mma.cuh.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention_common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

// The head sizes the kernels are instantiated for: a head size takes the kernels of the
// smallest class that holds it, zero-padded. The decode kernel keeps ceil(size / 32) dims per
// lane (32, 64, 96, 128) and the prefill kernel's tiles a power of two from 16 (16, 32, 64,
// 128); the classes are the union of both, so one choice serves both kernels.
template <int kHeadDim>
struct HeadDimClass {
  static constexpr int kDecodeDimsPerLane = (kHeadDim + 31) / 32;
  static constexpr int kPrefillDim = kHeadDim <= 16 ? 16 : kHeadDim <= 32 ? 32 : kHeadDim <= 64 ? 64 : 128;
};

// Calls f(HeadDimClass<k>{}) for the class k of headDim (1 to 32 * kMaxDimsPerLane): the one
// place a head size becomes a template argument.
template <typename F>
void withHeadDimClass(int headDim, F&& f) {
  static_assert(kMaxDimsPerLane == 4, "a class for every head size up to 32 * kMaxDimsPerLane");
  if (headDim <= 16)
    f(HeadDimClass<16>{});
  else if (headDim <= 32)
    f(HeadDimClass<32>{});
  else if (headDim <= 64)
    f(HeadDimClass<64>{});
  else if (headDim <= 96)
    f(HeadDimClass<96>{});
  else
    f(HeadDimClass<128>{});
}

// Calls f(std::integral_constant<KvType, T>{}) for the cache's type: the one place a K/V type
// becomes a template argument of the attention kernels.
template <typename F>
void withKvType(int type, F&& f) {
  static_assert(kKvTypeCount == 5, "a case for every K/V type");
  switch ((KvType)type) {
    case KvType::F32: return f(std::integral_constant<KvType, KvType::F32>{});
    case KvType::BF16: return f(std::integral_constant<KvType, KvType::BF16>{});
    case KvType::FP8: return f(std::integral_constant<KvType, KvType::FP8>{});
    case KvType::INT8: return f(std::integral_constant<KvType, KvType::INT8>{});
    case KvType::INT4: return f(std::integral_constant<KvType, KvType::INT4>{});
  }
  throw std::invalid_argument("attention: unknown K/V type");
}

// Calls f(std::integral_constant<int, d>{}) for a head size the tensor-core decode kernel takes
// (32, 64, 128; decodeUsesMma checked it).
template <typename F>
void withMmaHeadDim(int headDim, F&& f) {
  if (headDim == 32) return f(std::integral_constant<int, 32>{});
  if (headDim == 64) return f(std::integral_constant<int, 64>{});
  if (headDim == 128) return f(std::integral_constant<int, 128>{});
  throw std::invalid_argument("attention: the tensor-core decode kernel has no instance for head size " + std::to_string(headDim));
}

// int4 (a channel-key type, kv_format.h): every call takes the decode kernels (an int4 call's
// rows of one sequence lie in one page: the engine prefills such a cache a page at a time, and a
// mixed step's chunk of an int4 sequence ends at its page), in two launches into one split-K
// workspace that the merge kernel combines. The first reads the complete int4 pages (K scales
// per channel of each page, V scales per key) in as many splits as any decode: on the tensor
// cores where decodeUsesMma allows (head sizes 32, 64, 128, rows that load in 16-byte pieces;
// each warp's page's K scales multiply its key codes), else on the CUDA cores. The second, one
// split, reads the keys of each row's partial page from the residual's bf16 view (residualView)
// on the CUDA cores. Rows whose last visible page is complete get no keys there, and the merge
// skips the empty partial result.
// The partial results per (row, head) for `pageSplits` splits of the pages: those splits, at most
// one short of what the merge takes (kMaxDecodeSplits), and the residual's.
int channelKeyOutSplits(int pageSplits) { return std::min(pageSplits, kMaxDecodeSplits - 1) + 1; }

template <int kDimsPerLane>
void launchChannelKeyDecode(const float* q, int n, const int32_t* positions, int maxVisible, const PagedKv& kv,
                            int numHeads, int numKvHeads, int headDim, bool strict, int window, float scale,
                            AttentionOut out, float* workspace, int64_t workspaceFloats, cudaStream_t stream) {
  if (!kv.residuals) throw std::invalid_argument("attention: an int4 cache needs the sequences' residuals");
  int headsPerBlock = 0, headChunks = 0;
  attention::decodeHeadBlocks(numHeads / numKvHeads, headsPerBlock, headChunks);
  const int64_t blocks = (int64_t)n * numKvHeads * headChunks;
  const int64_t perSplit = (int64_t)n * numHeads * (headDim + 2);
  const bool mma = attention::decodeUsesMma(KvType::INT4, headDim, kv);
  int pageSplits = 0;
  if (mma)
    withMmaHeadDim(headDim, [&](auto dim) { pageSplits = attention::decodeMmaSplits<decltype(dim)::value, KvType::INT4>(blocks, maxVisible); });
  else
    pageSplits = attention::decodeSplits<kDimsPerLane, KvType::INT4>(blocks, headDim, maxVisible);
  // The splits attentionWorkspaceFloats counts; fewer pages' splits if the workspace is smaller,
  // but always the residual's own.
  int outSplits = channelKeyOutSplits(pageSplits);
  if (outSplits * perSplit > workspaceFloats) outSplits = (int)std::min<int64_t>(outSplits, workspaceFloats / perSplit);
  if (outSplits < 2)
    throw std::invalid_argument("attention: an int4 cache needs a split-K workspace of " + std::to_string(2 * perSplit) +
                                " floats at least, not " + std::to_string(workspaceFloats));
  pageSplits = outSplits - 1;
  const DecodeSpan pages{DecodeKeys::CompletePages, kv.pageShift, 0, outSplits};
  if (mma) {
    withMmaHeadDim(headDim, [&](auto dim) {
      attention::launchDecodeMma<decltype(dim)::value, KvType::INT4>(q, n, positions, kv, numHeads, numKvHeads, strict,
                                                                     window, scale, headChunks, headsPerBlock, pageSplits,
                                                                     out, workspace, stream, pages);
    });
    LCKV_LAUNCH_CHECK("attention_int4_pages_mma");
  } else {
    attention::launchDecode<kDimsPerLane, KvType::INT4>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window,
                                                        scale, headChunks, headsPerBlock, pageSplits, out, workspace,
                                                        stream, pages);
    LCKV_LAUNCH_CHECK("attention_int4_pages");
  }
  attention::launchDecode<kDimsPerLane, KvType::BF16>(
      q, n, positions, residualView(kv), numHeads, numKvHeads, headDim, strict, window, scale, headChunks, headsPerBlock, 1,
      out, workspace, stream, DecodeSpan{DecodeKeys::PartialPage, kv.pageShift, pageSplits, outSplits});
  LCKV_LAUNCH_CHECK("attention_int4_residual");
  attention::launchDecodeMerge(workspace, n, numHeads, headDim, outSplits, out, stream);
}

}  // namespace

std::string attentionProblem(int numHeads, int numKvHeads, int headDim, int kvType) {
  // kMaxHeadDim (kernels.h): the decode kernel's dims per lane, where withHeadDimClass's classes
  // (the prefill kernel's tiles too) end, and a compact type's K/V write (rope.cu). The tensor-core
  // decode kernel's head sizes (32, 64, 128) choose among kernels; they limit nothing, since the
  // CUDA-core kernel takes the rest.
  if (headDim <= 0 || headDim > kMaxHeadDim)
    return "the CUDA attention kernels take head sizes 1 to " + std::to_string(kMaxHeadDim) + ", not " + std::to_string(headDim);
  if (numKvHeads <= 0 || numHeads % numKvHeads)
    return "the CUDA attention kernels need numHeads (" + std::to_string(numHeads) + ") to be a multiple of numKvHeads (" +
           std::to_string(numKvHeads) + ")";
  if (kvType < 0 || kvType >= kKvTypeCount) return "unknown K/V type " + std::to_string(kvType);
  return kvHeadDimProblem((KvType)kvType, headDim);
}

std::string kvPageProblem(int kvType, int pageTokens) {
  if (kvType < 0 || kvType >= kKvTypeCount) return "unknown K/V type " + std::to_string(kvType);
  if (kvTypeChannelKeys((KvType)kvType) && pageTokens < kMinChannelKeyPageTokens)
    return std::string("the CUDA attention kernels read ") + kvTypeName((KvType)kvType) + " pages of at least " +
           std::to_string(kMinChannelKeyPageTokens) + " tokens, not " + std::to_string(pageTokens);
  return "";
}

void launchAttention(const float* q, int n, const int32_t* positions, int maxVisible, const PagedKv& kv, int numHeads,
                     int numKvHeads, int headDim, bool strict, int window, float scale, bool prefill, void* outRows,
                     bool outBf16, float* workspace, int64_t workspaceFloats, cudaStream_t stream) {
  NvtxRange r("attention");
  const AttentionOut out{outRows, outBf16};
  if (n <= 0) return;
  const std::string problem = attentionProblem(numHeads, numKvHeads, headDim, kv.type);
  if (!problem.empty()) throw std::invalid_argument("attention: " + problem);
  if (kv.kvDim != numKvHeads * headDim || kv.kvHeads != numKvHeads)
    throw std::invalid_argument("attention: the cache's K/V heads differ from numKvHeads x headDim");
  withKvType(kv.type, [&](auto kvType) {
  constexpr KvType T = decltype(kvType)::value;
  withHeadDimClass(headDim, [&](auto headDimClass) {
    using Class = decltype(headDimClass);
    if constexpr (kvTypeChannelKeys(T)) {
      launchChannelKeyDecode<Class::kDecodeDimsPerLane>(q, n, positions, maxVisible, kv, numHeads, numKvHeads, headDim,
                                                        strict, window, scale, out, workspace, workspaceFloats, stream);
    } else {
      if (prefill) {
        if constexpr (T == KvType::F32)
          attention::launchPrefill<Class::kPrefillDim>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window,
                                                       scale, out, stream);
        else
          attention::launchPrefillBf16<Class::kPrefillDim, T>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict,
                                                              window, scale, out, stream);
        return;
      }
      int headsPerBlock = 0, headChunks = 0;
      attention::decodeHeadBlocks(numHeads / numKvHeads, headsPerBlock, headChunks);
      const int64_t blocks = (int64_t)n * numKvHeads * headChunks;
      if constexpr (T != KvType::F32) {
        if (attention::decodeUsesMma(T, headDim, kv)) {
          withMmaHeadDim(headDim, [&](auto dim) {
            constexpr int kDim = decltype(dim)::value;
            int splits = attention::decodeMmaSplits<kDim, T>(blocks, maxVisible);
            if (splits > 1 && (int64_t)n * numHeads * splits * (headDim + 2) > workspaceFloats) splits = 1;
            attention::launchDecodeMma<kDim, T>(q, n, positions, kv, numHeads, numKvHeads, strict, window, scale,
                                                headChunks, headsPerBlock, splits, out, workspace, stream,
                                                DecodeSpan{DecodeKeys::All, 0, 0, splits});
            LCKV_LAUNCH_CHECK("attention_decode_mma");
            if (splits > 1) attention::launchDecodeMerge(workspace, n, numHeads, headDim, splits, out, stream);
          });
          return;
        }
      }
      // maxVisible only sets the number of splits: each block finds its own keys on the device.
      int splits = attention::decodeSplits<Class::kDecodeDimsPerLane, T>(blocks, headDim, maxVisible);
      if (splits > 1 && (int64_t)n * numHeads * splits * (headDim + 2) > workspaceFloats) splits = 1;
      attention::launchDecode<Class::kDecodeDimsPerLane, T>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict,
                                                            window, scale, headChunks, headsPerBlock, splits, out,
                                                            workspace, stream, DecodeSpan{DecodeKeys::All, 0, 0, splits});
      LCKV_LAUNCH_CHECK("attention");
      if (splits > 1) attention::launchDecodeMerge(workspace, n, numHeads, headDim, splits, out, stream);
    }
  });
  });
}

std::vector<AttentionPart> attentionParts(const int32_t* rowSeq, int n, int kvType) {
  std::vector<AttentionPart> parts;
  if (n <= 0) return parts;
  if (kvType >= 0 && kvType < kKvTypeCount && kvTypeChannelKeys((KvType)kvType)) return {{0, n, false}};
  int decodeFrom = 0;  // the first row not in a part yet
  for (int r = 0; r < n;) {
    int end = r + 1;
    while (end < n && rowSeq[end] == rowSeq[r]) ++end;
    if (end - r >= kPrefillMinQueries) {
      if (decodeFrom < r) parts.push_back({decodeFrom, r - decodeFrom, false});
      parts.push_back({r, end - r, true});
      decodeFrom = end;
    }
    r = end;
  }
  if (decodeFrom < n) parts.push_back({decodeFrom, n - decodeFrom, false});
  return parts;
}

// The same number of splits as the launcher chooses for these arguments.
int64_t attentionWorkspaceFloats(int n, int numHeads, int numKvHeads, int headDim, int maxVisible, int kvType) {
  if (n <= 0 || numHeads <= 0 || numKvHeads <= 0 || numHeads % numKvHeads || headDim <= 0 || headDim > kMaxHeadDim)
    return 0;  // the launcher refuses these
  int headsPerBlock = 0, headChunks = 0;
  attention::decodeHeadBlocks(numHeads / numKvHeads, headsPerBlock, headChunks);
  // The larger of the two decode kernels' choices: which one runs also depends on the pool's
  // alignment (decodeUsesMma), and the workspace must hold either. int4's (of its pages) gains
  // the residual's split.
  int splits = 0;
  const int64_t blocks = (int64_t)n * numKvHeads * headChunks;
  withKvType(kvType, [&](auto kvTypeConstant) {
    constexpr KvType T = decltype(kvTypeConstant)::value;
    withHeadDimClass(headDim, [&](auto headDimClass) {
      splits = attention::decodeSplits<decltype(headDimClass)::kDecodeDimsPerLane, T>(blocks, headDim, maxVisible);
    });
    if constexpr (T != KvType::F32) {
      if (headDim == 32 || headDim == 64 || headDim == 128)
        withMmaHeadDim(headDim, [&](auto dim) {
          splits = std::max(splits, attention::decodeMmaSplits<decltype(dim)::value, T>(blocks, maxVisible));
        });
    }
    if constexpr (kvTypeChannelKeys(T)) splits = channelKeyOutSplits(splits);
  });
  return splits > 1 ? (int64_t)n * numHeads * splits * (headDim + 2) : 0;
}

}  // namespace lckv::cuda
