// The fixed-point prefill's convergence test on the device (Backend::kvMotion): the K/V rows of
// one slot, read from the pool where their pages lie, decoded with kv_format.h's kvDecodeRow and
// kvDecodeResidualRow (the host's kvRead decode, so the values are kvRead's bit for bit),
// compared with the snapshot of the pass before, which then takes them. Three numbers cross to
// the host instead of every value: whether any value differs, the largest |difference| (f64,
// +inf for a NaN) and the largest |value|, each a maximum, so any order of reduction gives the
// host loop's result exactly.
#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kMotionThreads = 128;

// A non-negative double's bits order as the double does: atomicMax on them is the max.
__device__ __forceinline__ unsigned long long maxBits(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// One thread per row (K rows 0..n-1, then V rows): decode into `scratch`'s row, compare with the
// snapshot's, keep the new one there. rowBlock[t]: byte offset in `pool` of token t's slot block,
// or -1 where the residual (its pool pages `residualParts`) holds the token's page.
__global__ void __launch_bounds__(kMotionThreads) kvMotionKernel(KvLayout L, int slot, const uint8_t* pool,
                                                                 const int64_t* rowBlock, const int32_t* residualParts,
                                                                 int start, int n, float* scratch, float* snapshot,
                                                                 bool first, KvMotionResult* result) {
  waitForPrecedingKernels();  // the pass's kernels wrote the rows it reads
  const int r = blockIdx.x * kMotionThreads + threadIdx.x;
  unsigned long long moved = 0, largest = 0;
  unsigned int differ = 0;
  if (r < 2 * n) {
    const int v = r / n, t = r % n;
    const int off = (start + t) % L.pageTokens;
    float* cur = scratch + (int64_t)r * L.kvDim;
    float* prev = snapshot + (int64_t)r * L.kvDim;
    const int64_t at = rowBlock[t];
    if (at < 0) kvDecodeResidualRow(L, pool, residualParts, slot, v, off, cur);
    else kvDecodeRow(L, pool + at, v, off, cur);
    for (int i = 0; i < L.kvDim; ++i) {
      const float c = cur[i];
      if (!first) {
        const float p = prev[i];
        differ |= !(c == p);
        const double d = fabs((double)c - (double)p);
        moved = maxBits(moved, (unsigned long long)__double_as_longlong(isnan(d) ? INFINITY : d));
        if (!isnan(c)) largest = maxBits(largest, (unsigned long long)__double_as_longlong(fabs((double)c)));
      }
      prev[i] = c;
    }
  }
  if (first) return;
  for (int o = 16; o > 0; o /= 2) {
    moved = maxBits(moved, __shfl_xor_sync(0xffffffffu, moved, o));
    largest = maxBits(largest, __shfl_xor_sync(0xffffffffu, largest, o));
    differ |= __shfl_xor_sync(0xffffffffu, differ, o);
  }
  if ((threadIdx.x & 31) == 0) {
    if (moved) atomicMax(&result->movedBits, moved);
    if (largest) atomicMax(&result->largestBits, largest);
    if (differ) atomicOr(&result->differ, 1u);
  }
}

}  // namespace

void launchKvMotion(const KvLayout& L, int slot, const uint8_t* pool, const int64_t* rowBlock, const int32_t* residualParts,
                    int start, int n, float* scratch, float* snapshot, bool first, KvMotionResult* result,
                    cudaStream_t stream) {
  NvtxRange range("kv_motion");
  if (n <= 0) return;
  if (slot < 0 || slot >= L.slots || L.kvDim <= 0 || L.kvHeads <= 0 || L.pageTokens <= 0)
    throw std::invalid_argument("kv_motion: the layout has no slot " + std::to_string(slot));
  if (!first) LCKV_CUDA_CHECK(cudaMemsetAsync(result, 0, sizeof(KvMotionResult), stream));
  const int blocksCount = (2 * n + kMotionThreads - 1) / kMotionThreads;
  launchKernel(kvMotionKernel, dim3(blocksCount), dim3(kMotionThreads), 0, stream, L, slot, pool, rowBlock, residualParts,
               start, n, scratch, snapshot, first, result);
  LCKV_LAUNCH_CHECK("kv_motion");
}

}  // namespace lckv::cuda
