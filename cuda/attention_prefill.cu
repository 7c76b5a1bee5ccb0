// Launcher of the prefill attention kernel (attention_prefill.cuh), one instance per padded head
// size.
#include "attention_prefill.cuh"

namespace lckv::cuda::attention {

template <int kDim>
void launchPrefill(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                   int headDim, bool strict, int window, float scale, float* out, cudaStream_t stream) {
  // Head size 64 needs 52 KB and 128 needs 101 KB, above the 48 KB a launch gets without asking.
  static const cudaError_t raised = cudaFuncSetAttribute(attentionPrefillKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         (int)prefillSmemBytes(kDim));
  LCKV_CUDA_CHECK(raised);
  const bool vec4 = kvRowsLoadAsFloat4(kv, headDim);
  launchKernel(attentionPrefillKernel<kDim>, dim3((n + kPrefillQueries - 1) / kPrefillQueries, numHeads), kPrefillWarps * 32,
               prefillSmemBytes(kDim), stream, q, positions, kv, n, numHeads, numKvHeads, headDim, strict, window, scale, vec4, out);
  LCKV_LAUNCH_CHECK("attention_prefill");
}

template void launchPrefill<16>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, float, float*,
                                cudaStream_t);
template void launchPrefill<32>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, float, float*,
                                cudaStream_t);
template void launchPrefill<64>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, float, float*,
                                cudaStream_t);
template void launchPrefill<128>(const float*, int, const int32_t*, const PagedKv&, int, int, int, bool, int, float,
                                 float*, cudaStream_t);

}  // namespace lckv::cuda::attention
