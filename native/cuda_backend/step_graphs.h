// Decode steps recorded as CUDA graphs and replayed (Backend::replayStep and friends): the
// recordings, their inputs on the device, and the recording in progress. LCKV_CUDA_GRAPHS=0
// turns recording off; so does the per-op profiler, which must see every op run.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "../engine/backend.h"
#include "device_memory.h"
#include "sampling_slots.h"

namespace lckv {

// One recorded decode step. Its inputs live in its own device buffer, packed as token ids |
// positions | page tables | row-to-sequence map | residual parts (a channel-key K/V type's;
// none for the other types); every block its ops use is held here, so
// the addresses the recording baked in stay valid (and unshared) while it lives.
struct StepGraph {
  cudaGraphExec_t exec = nullptr;
  int n = 0, tableInts = 0, residualInts = 0;
  std::shared_ptr<void> inputs;
  std::vector<int32_t> hostInputs;  // what the recording was given, to match the ops' host arrays
  std::vector<std::shared_ptr<void>> holds;
  std::shared_ptr<void> attentionWorkspace;
  int64_t attentionWorkspaceFloats = 0;
  Tensor logits;
  uint64_t lastUse = 0;
  size_t inputInts() const { return 3 * (size_t)n + (size_t)tableInts + (size_t)residualInts; }
  // While recording, a staged array must be one of the step's inputs: the recorded op then
  // reads it from the recording's input buffer, which each replay refills.
  const int32_t* recordedInput(Staging which, const int32_t* host, int count) const;
  ~StepGraph() {
    if (exec) cudaGraphExecDestroy(exec);
  }
};

class StepGraphs {
 public:
  // asked: the backend was created to record steps (the environment and the profiler may still
  // turn recording off).
  StepGraphs(bool asked, bool profiling);
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;
  ~StepGraphs() { release(); }

  bool enabled() const { return enabled_; }
  // The recording in progress (ops called now are recorded, not run), or null.
  StepGraph* recording() const { return recording_.get(); }

  // The recording under key, when there is one for inputs of this shape.
  StepGraph* find(uint64_t key, const Backend::StepInputs& in) {
    if (!enabled_) return nullptr;
    auto it = graphs_.find(key);
    if (it == graphs_.end()) return nullptr;
    StepGraph& g = *it->second;
    if (g.n != in.n || g.tableInts != in.tableInts || g.residualInts != in.residualInts) return nullptr;
    return &g;
  }
  // Runs g with these inputs; given a slot of queued choices, with the token ids of that slot
  // (on the device) instead of in.tokens.
  void replay(StepGraph& g, const Backend::StepInputs& in, const SampledSlot* sampled, cudaStream_t stream);

  // Whether a step under key, which has no recording, is to be recorded now. A key is recorded at
  // its second sighting, not its first: a key seen once (the batch sizes a generation passes
  // through as its requests end one by one, a step or two each) would cost a recording (capture
  // and instantiation, several times an op-by-op step) that is never replayed.
  bool shouldRecord(uint64_t key);
  // Backend::beginStepCapture once shouldRecord(key) holds; endStepCapture; abortStepCapture.
  void begin(uint64_t key, const Backend::StepInputs& in, cudaStream_t stream);
  void end(const Tensor& logits, cudaStream_t stream);
  void abort(bool retryLater, cudaStream_t stream);

  // Read from the JavaScript thread while a step may run: the counts are atomics. kept: the
  // recordings held now; replayed and recordings: since the backend was made.
  void stats(int64_t& kept, int64_t& replayed, int64_t& recordings) const {
    kept = graphCount_.load(std::memory_order_relaxed);
    replayed = replays_.load(std::memory_order_relaxed);
    recordings = recordings_.load(std::memory_order_relaxed);
  }

  // Drops the recordings and frees the pinned input buffer and its event (once the stream has
  // finished with them).
  void release();

 private:
  static constexpr size_t kMaxGraphs = 32;
  static constexpr size_t kMaxSighted = 4096;  // keys remembered as seen once; forgotten all at once past this

  void uploadInputs(StepGraph& g, const Backend::StepInputs& in, cudaStream_t stream);

  const bool enabled_;
  std::map<uint64_t, std::unique_ptr<StepGraph>> graphs_;
  std::set<uint64_t> unrecordable_;  // keys whose recording failed: they run unrecorded
  std::set<uint64_t> sighted_;       // keys seen unrecorded once (shouldRecord)
  std::unique_ptr<StepGraph> recording_;
  uint64_t recordingKey_ = 0, useClock_ = 0;
  std::atomic<int64_t> replays_{0}, graphCount_{0}, recordings_{0};
  int32_t* pinnedInputs_ = nullptr;
  size_t pinnedInputsCap_ = 0;
  cudaEvent_t inputsCopied_ = nullptr;
};

}  // namespace lckv
