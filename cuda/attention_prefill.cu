// Launcher of the f32-cache prefill attention kernel (attention_prefill.cuh), one instance per
// padded head size. Compact types take the bf16 kernel (attention_prefill_bf16.cu).
#include "attention_prefill.cuh"

namespace lckv::cuda::attention {

template <int kDim>
void launchPrefill(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                   int headDim, bool strict, int window, float scale, AttentionOut out, cudaStream_t stream) {
  // Head size 64 needs 52 KB and 128 needs 101 KB, above the 48 KB a launch gets without asking.
  static const cudaError_t raised = cudaFuncSetAttribute(attentionPrefillKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         (int)prefillSmemBytes(kDim));
  LCKV_CUDA_CHECK(raised);
  const bool vec16 = kvRowsLoadAs16Bytes(kv, headDim);
  launchKernel(attentionPrefillKernel<kDim>, dim3((n + kPrefillQueries - 1) / kPrefillQueries, numHeads), kPrefillWarps * 32,
               prefillSmemBytes(kDim), stream, q, positions, kv, n, numHeads, numKvHeads, headDim, strict, window, scale, vec16, out);
  LCKV_LAUNCH_CHECK("attention_prefill");
}

#define LCKV_PREFILL_INSTANCE(D)                                                                                    \
  template void launchPrefill<D>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, float, \
                                 AttentionOut, cudaStream_t);
LCKV_PREFILL_INSTANCE(16)
LCKV_PREFILL_INSTANCE(32)
LCKV_PREFILL_INSTANCE(64)
LCKV_PREFILL_INSTANCE(128)

}  // namespace lckv::cuda::attention
