// The page quantization of a channel-key K/V type (int4, kv_format.h): when a K/V write fills a
// page's last row, the page is quantized from the sequence's bf16 residual, keys with one scale
// per channel over the page's tokens and values with one per token and K/V head. The arithmetic is
// kv_format.h's (kvScaleOf, kvEncode, kvF16ToF32 on the residual's bf16 values), so the codes and
// scales are the CPU's kvQuantizePage's, bit for bit: a largest magnitude taken with fmaxf is the
// same in any order (fmaxf drops a NaN wherever it meets one).
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kQuantizeThreads = 256;
constexpr int kQuantizeWarps = kQuantizeThreads / 32;
constexpr int kCodesPerWord = 8;  // int4: a 32-bit word of codes holds 8 channels

// One block per row of the write: nothing unless the row's position ends a page. Then
//   keys: a thread per pair of channels (one byte of codes per token, one 32-bit word of two
//     scales), reading the pair's 16 bf16 values twice (largest magnitude, then codes);
//   values: a warp per (token, K/V head), each lane holding 8 channels (one word of codes), the
//     head's largest magnitude by a warp reduction.
// `residual` is residualView(kv).
template <KvType T>
__global__ void __launch_bounds__(kQuantizeThreads) kvQuantizePageKernel(const int32_t* positions, PagedKv kv,
                                                                         PagedKv residual) {
  static_assert(kvTypeChannelKeys(T) && kvTypeBits(T) == 4, "the page quantization of a channel-key type of 4 bits");
  waitForPrecedingKernels();  // the residual's rows were written by the preceding kernel
  const int r = blockIdx.x;
  const int pageTokens = 1 << kv.pageShift, p = positions[r];
  if ((p & (pageTokens - 1)) != pageTokens - 1) return;
  const int seq = kv.rowSeq[r];
  const int32_t* parts = residual.tables + (int64_t)seq * residual.stride;
  uint8_t* block = kv.pool + (int64_t)kv.tables[(int64_t)seq * kv.stride + (p >> kv.pageShift)] * kv.pageBytes + kv.slotOffset;
  // The slot's block: K codes [pageTokens][rowBytes] | V codes | K scales [kvDim] f16 | V scales [pageTokens][kvHeads] f16.
  uint32_t* keyScalePairs = reinterpret_cast<uint32_t*>(block + 2 * pageTokens * kv.rowBytes);
  uint16_t* valueScales = reinterpret_cast<uint16_t*>(block + 2 * pageTokens * kv.rowBytes) + kv.kvDim;
  const int headDim = kv.kvDim / kv.kvHeads;

  // Keys: channels 2c and 2c + 1 (the low and high nibble of byte c of each token's codes).
  for (int c = threadIdx.x; c < kv.kvDim / 2; c += blockDim.x) {
    float amax0 = 0.0f, amax1 = 0.0f;
    for (int t = 0; t < pageTokens; ++t) {
      const uint32_t pair = reinterpret_cast<const uint32_t*>(residual.pool + kvCodeOffset(residual, parts, t, 0))[c];
      amax0 = fmaxf(amax0, fabsf(kvBf16ToF32((uint16_t)pair)));
      amax1 = fmaxf(amax1, fabsf(kvBf16ToF32((uint16_t)(pair >> 16))));
    }
    const uint16_t scale0 = kvScaleOf(T, amax0), scale1 = kvScaleOf(T, amax1);
    keyScalePairs[c] = (uint32_t)scale0 | (uint32_t)scale1 << 16;
    const float s0 = kvF16ToF32(scale0), s1 = kvF16ToF32(scale1);
    for (int t = 0; t < pageTokens; ++t) {
      const uint32_t pair = reinterpret_cast<const uint32_t*>(residual.pool + kvCodeOffset(residual, parts, t, 0))[c];
      block[(int64_t)t * kv.rowBytes + c] =
          (uint8_t)(kvEncode(T, kvBf16ToF32((uint16_t)pair), s0) | kvEncode(T, kvBf16ToF32((uint16_t)(pair >> 16)), s1) << 4);
    }
  }

  // Values: lane w holds channels 8w .. 8w + 7 of the head (one 16-byte load of bf16).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int words = headDim / kCodesPerWord;  // at most kMaxHeadDim / 8 = 16 lanes (the launcher checks)
  for (int task = warp; task < pageTokens * kv.kvHeads; task += kQuantizeWarps) {
    const int t = task / kv.kvHeads, h = task - t * kv.kvHeads;
    float x[kCodesPerWord];
    float amax = 0.0f;
    if (lane < words) {
      const uint4 raw = *reinterpret_cast<const uint4*>(residual.pool + kvCodeOffset(residual, parts, t, 1) +
                                                         (int64_t)(h * headDim + lane * kCodesPerWord) * 2);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[2 * i] = kvBf16ToF32((uint16_t)w[i]);
        x[2 * i + 1] = kvBf16ToF32((uint16_t)(w[i] >> 16));
      }
#pragma unroll
      for (int i = 0; i < kCodesPerWord; ++i) amax = fmaxf(amax, fabsf(x[i]));
    }
    amax = warpMax(amax);
    const uint16_t scaleBits = kvScaleOf(T, amax);
    if (lane == 0) valueScales[t * kv.kvHeads + h] = scaleBits;
    if (lane < words) {
      const float s = kvF16ToF32(scaleBits);
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < kCodesPerWord; ++i) word |= kvEncode(T, x[i], s) << (4 * i);
      reinterpret_cast<uint32_t*>(block + (int64_t)(pageTokens + t) * kv.rowBytes + h * headDim / 2)[lane] = word;
    }
  }
}

}  // namespace

void launchKvQuantizePages(int n, const int32_t* positions, const PagedKv& kv, cudaStream_t stream) {
  NvtxRange range("kv_quantize_pages");
  if (n <= 0) return;
  if (!kvTypeChannelKeys((KvType)kv.type)) throw std::invalid_argument("kv_quantize_pages: the K/V type has no channel keys");
  if (!kv.residuals || kv.residualShift < 0 || kv.residualShift > kv.pageShift)
    throw std::invalid_argument("kv_quantize_pages: an int4 cache needs the sequences' residuals");
  const int headDim = kv.kvHeads > 0 ? kv.kvDim / kv.kvHeads : 0;
  // A lane holds one word of a head's value codes; the 16-byte loads need 8-channel heads, and
  // the pair and word stores 4-byte aligned rows (kvTypeHeadDimMultiple: int4 heads are multiples of 8).
  if (headDim <= 0 || headDim * kv.kvHeads != kv.kvDim || headDim % kCodesPerWord || headDim > kMaxHeadDim)
    throw std::invalid_argument("kv_quantize_pages: head size " + std::to_string(headDim) + " is not a multiple of " +
                                std::to_string(kCodesPerWord) + " up to " + std::to_string(kMaxHeadDim));
  if (kv.rowBytes != kv.kvDim / 2) throw std::invalid_argument("kv_quantize_pages: int4 rows are kvDim / 2 bytes");
  launchKernel(kvQuantizePageKernel<KvType::INT4>, n, kQuantizeThreads, 0, stream, positions, kv, residualView(kv));
  LCKV_LAUNCH_CHECK("kv_quantize_pages");
}

}  // namespace lckv::cuda
