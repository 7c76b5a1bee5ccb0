// Launcher of the bf16 tensor-core prefill kernel (attention_prefill_bf16.cuh), one instance per
// padded head size and compact K/V type.
#include "attention_prefill_bf16.cuh"

namespace lckv::cuda::attention {

template <int kDim, KvType T, bool kOutBf16>
void launchPrefillBf16Parts(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                            int headDim, bool strict, int window, float scale, AttentionOut out, cudaStream_t stream) {
  // Head size 64 keeps 64 KB of queries and tiles (46 KB with a bf16 output), 128 keeps 120 KB
  // (86 KB): the larger ones are above the 48 KB a launch gets without asking.
  constexpr size_t kSmem = prefillBf16SmemBytes(kDim, kOutBf16);
  static const cudaError_t raised = cudaFuncSetAttribute(attentionPrefillBf16Kernel<kDim, T, kOutBf16>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSmem);
  LCKV_CUDA_CHECK(raised);
  const bool vec16 = kvRowsLoadAs16Bytes(kv, headDim);
  launchKernel(attentionPrefillBf16Kernel<kDim, T, kOutBf16>, dim3((n + kPrefillBf16Queries - 1) / kPrefillBf16Queries, numHeads),
               kPrefillBf16Warps * 32, kSmem, stream, q, positions, kv, n, numHeads, numKvHeads, headDim, strict, window,
               scale, vec16, out);
  LCKV_LAUNCH_CHECK("attention_prefill_bf16");
}

template <int kDim, KvType T>
void launchPrefillBf16(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                       int headDim, bool strict, int window, float scale, AttentionOut out, cudaStream_t stream) {
  if (out.bf16)
    launchPrefillBf16Parts<kDim, T, true>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, out, stream);
  else
    launchPrefillBf16Parts<kDim, T, false>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, out, stream);
}

#define LCKV_PREFILL_BF16_INSTANCE(D, T)                                                                              \
  template void launchPrefillBf16<D, KvType::T>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, \
                                                int, float, AttentionOut, cudaStream_t);
#define LCKV_PREFILL_BF16_INSTANCES(D) \
  LCKV_PREFILL_BF16_INSTANCE(D, BF16)  \
  LCKV_PREFILL_BF16_INSTANCE(D, FP8)   \
  LCKV_PREFILL_BF16_INSTANCE(D, INT8)
LCKV_PREFILL_BF16_INSTANCES(16)
LCKV_PREFILL_BF16_INSTANCES(32)
LCKV_PREFILL_BF16_INSTANCES(64)
LCKV_PREFILL_BF16_INSTANCES(128)
static_assert(kKvTypeCount == 5, "instantiate the bf16 prefill kernel for every compact K/V type of per-key scales");

}  // namespace lckv::cuda::attention
