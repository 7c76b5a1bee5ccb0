// Launcher of the tensor-core decode kernel (attention_decode_mma.cuh), one instance per head
// size (32, 64, 128) and compact K/V type: its shared memory and the number of splits that
// fills the GPU in one wave. The splits are merged by the CUDA-core kernel's merge.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention_decode_mma.cuh"

namespace lckv::cuda::attention {

namespace {

template <int kDim, KvType T>
const void* preparedDecodeMmaKernel() {
  // bf16 at head size 128 keeps 70 KB of tiles, above the 48 KB a launch gets without asking.
  static const cudaError_t raised = cudaFuncSetAttribute(
      attentionDecodeMmaKernel<kDim, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mmaDecodeSmemBytes(T, kDim));
  LCKV_CUDA_CHECK(raised);
  return reinterpret_cast<const void*>(attentionDecodeMmaKernel<kDim, T>);
}

// Blocks the GPU runs at once (shared memory sets it).
template <int kDim, KvType T>
int decodeMmaResidentBlocks() {
  static std::atomic<int> known{0};
  int blocks = known.load(std::memory_order_relaxed);
  if (blocks == 0) {
    int perSm = 0, dev = 0, sms = 0;
    LCKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, preparedDecodeMmaKernel<kDim, T>(),
                                                                  kMmaWarps * 32, mmaDecodeSmemBytes(T, kDim)));
    LCKV_CUDA_CHECK(cudaGetDevice(&dev));
    LCKV_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    blocks = std::max(1, perSm) * std::max(1, sms);
    known.store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

}  // namespace

// A channel-key type (int4) also needs 16-byte aligned K scales of each page (rows, pages and
// the pool aligned, and a head's kDim f16 a multiple of 16 bytes: so they are).
bool decodeUsesMma(KvType type, int headDim, const PagedKv& kv) {
  // A channel-key type needs pages of 16 keys or more (a warp's 16 keys in one page); smaller
  // pages take the CUDA-core kernel.
  return type != KvType::F32 && mmaDecodeHeadDim(headDim) && kvRowsLoadAs16Bytes(kv, headDim) &&
         (!kvTypeChannelKeys(type) || kv.pageShift >= 4);
}

// As decodeSplits: one wave, at least one 64-key tile per split, at most kMaxDecodeSplits.
template <int kDim, KvType T>
int decodeMmaSplits(int64_t blocks, int maxVisible) {
  const int64_t wave = decodeMmaResidentBlocks<kDim, T>() / blocks;
  const int64_t most = ((int64_t)maxVisible + kMmaTileKeys - 1) / kMmaTileKeys;
  return (int)std::max<int64_t>(1, std::min<int64_t>({wave, most, kMaxDecodeSplits}));
}

template <int kDim, KvType T>
void launchDecodeMma(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                     bool strict, int window, float scale, int headChunks, int headsPerBlock, int splits, AttentionOut out,
                     float* partial, cudaStream_t stream, const DecodeSpan& span) {
  if (kvTypeChannelKeys(T) && (kv.pageShift < 4 || span.keys != DecodeKeys::CompletePages))  // a warp's 16 keys in one page
    throw std::invalid_argument("attention: the tensor-core decode kernel takes a channel-key K/V type's complete pages of 16 tokens or more");
  if (span.outSplits != 1 && (span.outSplits < span.splitBase + splits || !partial))
    throw std::invalid_argument("attention: the decode launch's splits lie outside the split-K workspace");
  preparedDecodeMmaKernel<kDim, T>();
  launchKernel(attentionDecodeMmaKernel<kDim, T>, dim3(n, numKvHeads * headChunks, splits), kMmaWarps * 32,
               mmaDecodeSmemBytes(T, kDim), stream, q, positions, kv, numHeads, numKvHeads, kDim, strict, window, scale,
               headChunks, headsPerBlock, span, out, partial);
}

#define LCKV_DECODE_MMA_INSTANCES(D, T)                                                                     \
  template int decodeMmaSplits<D, T>(int64_t, int);                                                       \
  template void launchDecodeMma<D, T>(const float*, int, const int32_t*, const PagedKv&, int, int, bool, int, float, \
                                      int, int, int, AttentionOut, float*, cudaStream_t, const DecodeSpan&);
#define LCKV_DECODE_MMA_INSTANCES_ALL_TYPES(D)  \
  LCKV_DECODE_MMA_INSTANCES(D, KvType::BF16)    \
  LCKV_DECODE_MMA_INSTANCES(D, KvType::FP8)     \
  LCKV_DECODE_MMA_INSTANCES(D, KvType::INT8)    \
  LCKV_DECODE_MMA_INSTANCES(D, KvType::INT4)
LCKV_DECODE_MMA_INSTANCES_ALL_TYPES(32)
LCKV_DECODE_MMA_INSTANCES_ALL_TYPES(64)
LCKV_DECODE_MMA_INSTANCES_ALL_TYPES(128)
static_assert(kKvTypeCount == 5, "instantiate the tensor-core decode kernel for every compact K/V type");

}  // namespace lckv::cuda::attention
