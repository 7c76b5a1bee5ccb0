// Where the CUDA backend's token choices land (sampling_slots.h).
#include "sampling_slots.h"

#include "cuda_check.h"
#include "device_memory.h"

namespace lckv {

SampledSlot& SamplingSlots::withRoom(int slot, int rows, cudaStream_t stream) {
  SampledSlot& q = slots_[slot];
  if (q.capacity < (size_t)rows) {
    // A copy still queued into the old buffers must land before they go.
    cudaOk(cudaStreamSynchronize(stream), "sample slot sync");
    if (q.pinned) cudaFreeHost(q.pinned);
    q.pinned = nullptr;
    q.device.reset();
    q.capacity = 0;
    q.device = deviceAlloc(sizeof(int32_t) * (size_t)rows);
    cudaOk(cudaMallocHost(&q.pinned, sizeof(int32_t) * (size_t)rows), "cudaMallocHost");
    q.capacity = (size_t)rows;
  }
  return q;
}

void SamplingSlots::release() {
  for (SampledSlot& q : slots_) {
    if (q.pinned) cudaFreeHost(q.pinned);
    if (q.ready) cudaEventDestroy(q.ready);
    q.pinned = nullptr;
    q.ready = nullptr;
    q.capacity = 0;
    q.rows = 0;
  }
}

}  // namespace lckv
