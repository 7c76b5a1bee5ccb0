// Launcher of the prefill attention kernel (attention_prefill.cuh), one instance per padded head
// size.
#include "attention_prefill.cuh"

namespace lckv::cuda::attention {

template <int kDim, KvType T>
void launchPrefill(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                   int headDim, bool strict, int window, float scale, AttentionOut out, cudaStream_t stream) {
  // Head size 64 needs 52 KB and 128 needs 101 KB, above the 48 KB a launch gets without asking.
  static const cudaError_t raised = cudaFuncSetAttribute(attentionPrefillKernel<kDim, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         (int)prefillSmemBytes(kDim));
  LCKV_CUDA_CHECK(raised);
  const bool vec16 = kvRowsLoadAs16Bytes(kv, headDim);
  launchKernel(attentionPrefillKernel<kDim, T>, dim3((n + kPrefillQueries - 1) / kPrefillQueries, numHeads), kPrefillWarps * 32,
               prefillSmemBytes(kDim), stream, q, positions, kv, n, numHeads, numKvHeads, headDim, strict, window, scale, vec16, out);
  LCKV_LAUNCH_CHECK("attention_prefill");
}

#define LCKV_PREFILL_INSTANCES(D)                                                                                  \
  template void launchPrefill<D, KvType::F32>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, \
                                              float, AttentionOut, cudaStream_t);                                            \
  template void launchPrefill<D, KvType::BF16>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool,    \
                                               int, float, AttentionOut, cudaStream_t);                                      \
  template void launchPrefill<D, KvType::FP8>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, \
                                              float, AttentionOut, cudaStream_t);                                            \
  template void launchPrefill<D, KvType::INT8>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool,    \
                                               int, float, AttentionOut, cudaStream_t);                                      \
  template void launchPrefill<D, KvType::INT4>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool,    \
                                               int, float, AttentionOut, cudaStream_t);
LCKV_PREFILL_INSTANCES(16)
LCKV_PREFILL_INSTANCES(32)
LCKV_PREFILL_INSTANCES(64)
LCKV_PREFILL_INSTANCES(128)
static_assert(kKvTypeCount == 5, "instantiate the prefill kernel for every K/V type");

}  // namespace lckv::cuda::attention
