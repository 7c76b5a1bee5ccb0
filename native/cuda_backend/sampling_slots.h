// Where the CUDA backend's token choices land: per slot, the chosen ids on the device, their
// copy in pinned host memory, and the event after that copy. Slots 0 and 1 hold the run-ahead
// choices (queueSampleRows, read by replayStepFromSampled and takeSampled); kWaitedSlot is
// sampleRows()'s own, which waits for its copy.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace lckv {

// Chosen token ids: on the device (what replayStepFromSampled reads), their copy on the host,
// and the event after that copy.
struct SampledSlot {
  std::shared_ptr<void> device;
  int32_t* pinned = nullptr;
  size_t capacity = 0;
  int rows = 0;  // queued by the last queueSampleRows()
  cudaEvent_t ready = nullptr;
};

class SamplingSlots {
 public:
  static constexpr int kWaitedSlot = 2;
  static bool queuedSlot(int slot) { return slot == 0 || slot == 1; }

  SamplingSlots() = default;
  SamplingSlots(const SamplingSlots&) = delete;
  SamplingSlots& operator=(const SamplingSlots&) = delete;
  ~SamplingSlots() { release(); }

  SampledSlot& operator[](int slot) { return slots_[slot]; }
  // Slot `slot` with room for `rows` ids (its rows and event untouched).
  SampledSlot& withRoom(int slot, int rows, cudaStream_t stream);
  // Frees the pinned buffers and events (once the stream has finished with them).
  void release();

 private:
  SampledSlot slots_[3];
};

}  // namespace lckv
