// Launcher of the decode attention kernel (attention_decode.cuh), one instance per number of head
// dims per lane: its shared memory, the number of splits that fills the GPU in one wave, and the
// kernel that merges the splits.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "attention_decode.cuh"

namespace lckv::cuda {

namespace {

// Merges the chunks of each (query, head): out = sum_c exp(M_c - M) acc_c / sum_c exp(M_c - M) L_c.
// The first warp reads every chunk's max and sum (lane c takes chunks c, c + 32, ...), so the
// weights come from one or two rounds of loads; then the block's threads take the head's dims
// times kMergeThreads / headDim interleaved subsets of the chunks (4 at head size 64, 2 at 128),
// each reading its chunks' accumulators at once, and the parts are added in order. (Loops over
// the chunks, each load waiting for the last, made this kernel take as long as the attention
// itself at 16 sequences.)
constexpr int kMergeThreads = 256;
__global__ void __launch_bounds__(kMergeThreads) attentionMergeKernel(const float* __restrict__ partial, int numHeads,
                                                                      int headDim, int splits, AttentionOut out) {
  __shared__ float weight[kMaxDecodeSplits];
  __shared__ float sums[kMergeThreads];
  __shared__ float total;
  waitForPrecedingKernels();
  const int r = blockIdx.x, h = blockIdx.y;
  const float* base = partial + ((int64_t)r * numHeads + h) * splits * (headDim + 2);
  if (threadIdx.x < 32) {
    constexpr int kPerLane = (kMaxDecodeSplits + 31) / 32;
    float mc[kPerLane], lc[kPerLane], M = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = threadIdx.x + 32 * i;
      mc[i] = c < splits ? base[c * (headDim + 2)] : -INFINITY;  // -inf: an empty chunk, skipped
      lc[i] = c < splits ? base[c * (headDim + 2) + 1] : 0.0f;
      M = fmaxf(M, mc[i]);
    }
    M = warpMax(M);
    float L = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float wc = mc[i] == -INFINITY ? 0.0f : expf(mc[i] - M);
      L += lc[i] * wc;
      if (threadIdx.x + 32 * i < kMaxDecodeSplits) weight[threadIdx.x + 32 * i] = wc;
    }
    L = warpSum(L);
    if (threadIdx.x == 0) total = L;
  }
  __syncthreads();
  const int parts = max(1, (int)blockDim.x / headDim);
  const int d = threadIdx.x % headDim, part = threadIdx.x / headDim;
  float v = 0.0f;
  if (part < parts) {
#pragma unroll 8
    for (int c = part; c < splits; c += parts) v += base[c * (headDim + 2) + 2 + d] * weight[c];
  }
  sums[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x < headDim) {
    float acc = 0.0f;
    for (int p = 0; p < parts; ++p) acc += sums[p * headDim + threadIdx.x];
    const float L = total;
    out.store(((int64_t)r * numHeads + h) * headDim + threadIdx.x, L > 0.0f ? acc / L : 0.0f);
  }
}

int smCount() {
  static int count = [] {
    int dev = 0, c = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev);
    return c > 0 ? c : 100;
  }();
  return count;
}

template <int kDimsPerLane, KvType T>
const void* preparedDecodeKernel() {
  // Head size 128 needs ~71 KB in f32, above the 48 KB a launch gets without asking.
  static const cudaError_t raised =
      cudaFuncSetAttribute(attentionDecodeKernel<kDimsPerLane, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)decodeSmemBytes<T>(32 * kDimsPerLane));
  LCKV_CUDA_CHECK(raised);
  return reinterpret_cast<const void*>(attentionDecodeKernel<kDimsPerLane, T>);
}

// Decode blocks the GPU runs at once for this head size (shared memory sets it).
template <int kDimsPerLane, KvType T>
int decodeResidentBlocks(int headDim) {
  static std::atomic<int> known[32 * kMaxDimsPerLane + 1];
  int blocks = known[headDim].load(std::memory_order_relaxed);
  if (blocks == 0) {
    const void* kernel = preparedDecodeKernel<kDimsPerLane, T>();
    int perSm = 0;
    LCKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, kernel, kDecodeWarps * 32,
                                                                  decodeSmemBytes<T>(headDim)));
    blocks = std::max(1, perSm) * smCount();
    known[headDim].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

}  // namespace

namespace attention {

// Splits of the decode kernel for `blocks` blocks per split and the longest visible range: as
// many as fill the GPU in one wave (a second, partial wave would leave most of the GPU idle
// while it runs), within kMinSplitKeys and kMaxDecodeSplits.
template <int kDimsPerLane, KvType T>
int decodeSplits(int64_t blocks, int headDim, int maxVisible) {
  const int64_t wave = decodeResidentBlocks<kDimsPerLane, T>(headDim) / blocks;
  const int64_t most = ((int64_t)maxVisible + kMinSplitKeys - 1) / kMinSplitKeys;
  return (int)std::max<int64_t>(1, std::min<int64_t>({wave, most, kMaxDecodeSplits}));
}

// Query heads of one K/V head's group per block, and blocks per group: the group cut into
// equal parts of at most kGroupHeads.
void decodeHeadBlocks(int group, int& headsPerBlock, int& headChunks) {
  const int parts = (group + kGroupHeads - 1) / kGroupHeads;
  headsPerBlock = (group + parts - 1) / parts;
  headChunks = (group + headsPerBlock - 1) / headsPerBlock;
}

template <int kDimsPerLane, KvType T>
void launchDecode(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                  int headDim, bool strict, int window, float scale, int headChunks, int headsPerBlock, int splits,
                  AttentionOut out, float* partial, cudaStream_t stream, const DecodeSpan& span) {
  if (kvTypeChannelKeys(T) && (1 << kv.pageShift) < kMinChannelKeyPageTokens)  // the pool's creation refuses these first
    throw std::invalid_argument("attention: " + kvPageProblem((int)T, 1 << kv.pageShift));
  if (span.outSplits != 1 && (span.outSplits < span.splitBase + splits || !partial))
    throw std::invalid_argument("attention: the decode launch's splits lie outside the split-K workspace");
  preparedDecodeKernel<kDimsPerLane, T>();
  const bool vec16 = kvRowsLoadAs16Bytes(kv, headDim);
  launchKernel(attentionDecodeKernel<kDimsPerLane, T>, dim3(n, numKvHeads * headChunks, splits), kDecodeWarps * 32,
               decodeSmemBytes<T>(headDim), stream, q, positions, kv, numHeads, numKvHeads, headDim, strict, window,
               scale, headChunks, headsPerBlock, vec16, span, out, partial);
}

void launchDecodeMerge(const float* partial, int n, int numHeads, int headDim, int splits, AttentionOut out,
                       cudaStream_t stream) {
  if (splits < 1 || splits > kMaxDecodeSplits || headDim > kMergeThreads)  // the merge's weights, a thread per dim
    throw std::invalid_argument("attention_merge: " + std::to_string(splits) + " splits (1 to " +
                                std::to_string(kMaxDecodeSplits) + ") of head size " + std::to_string(headDim));
  launchKernel(attentionMergeKernel, dim3(n, numHeads), kMergeThreads, 0, stream, partial, numHeads, headDim, splits, out);
  LCKV_LAUNCH_CHECK("attention_merge");
}

#define LCKV_DECODE_INSTANCES(D, T)                                                                              \
  template int decodeSplits<D, T>(int64_t, int, int);                                                          \
  template void launchDecode<D, T>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, float, \
                                   int, int, int, AttentionOut, float*, cudaStream_t, const DecodeSpan&);
#define LCKV_DECODE_INSTANCES_ALL_TYPES(D)   \
  LCKV_DECODE_INSTANCES(D, KvType::F32)      \
  LCKV_DECODE_INSTANCES(D, KvType::BF16)     \
  LCKV_DECODE_INSTANCES(D, KvType::FP8)      \
  LCKV_DECODE_INSTANCES(D, KvType::INT8)     \
  LCKV_DECODE_INSTANCES(D, KvType::INT4)
LCKV_DECODE_INSTANCES_ALL_TYPES(1)
LCKV_DECODE_INSTANCES_ALL_TYPES(2)
LCKV_DECODE_INSTANCES_ALL_TYPES(3)
LCKV_DECODE_INSTANCES_ALL_TYPES(4)
static_assert(kKvTypeCount == 5, "instantiate the decode kernel for every K/V type");
static_assert(kMaxDimsPerLane == 4, "instantiate launchDecode and decodeSplits for every number of dims per lane");

}  // namespace attention

}  // namespace lckv::cuda
