// How a backend runs the model's steps, apart from its ops: decode steps recorded and replayed
// (graphs), run-ahead (token choices queued on the device and the next step fed from them),
// waiting for queued work, the device's memory, and named ranges for profilers. Backend
// (backend.h) derives from StepExecution; every method has a default for a backend that runs
// each op as it is called and records nothing (the CPU), so a backend overrides only what it does.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "sampling.h"

namespace lckv {

struct Tensor;  // backend.h

class StepExecution {
 public:
  virtual ~StepExecution() = default;

  // Decode-step graphs (CUDA graphs on the GPU). A decode step launches a few hundred small
  // kernels; a backend that can record them once and replay the recording saves launching each.
  // Between replays of one recording only these inputs change, so the recorded ops must read
  // them from where the backend keeps them: the step's token ids, positions, page tables (as
  // KvView::tables), row-to-sequence map and, for a channel-key K/V type, the sequences' residual
  // parts (as KvView::residuals; none for the other types), exactly the host arrays the ops will
  // be given.
  // Recordings are made per this many positions of context (Model::decodeBatch's key); the
  // attention plans its split-K for the end of the bucket, so each recording's plan holds for
  // every step it replays.
  static constexpr int kStepContextBucket = 256;
  struct StepInputs {
    const int32_t* tokens;
    const int32_t* positions;
    int n;
    const int32_t* tables;
    int tableInts;
    const int32_t* rowSeq;
    const int32_t* residuals;
    int residualInts;
  };
  // Runs the step recorded under `key` with these inputs and points `logits` at its output;
  // false when nothing is recorded under key (or the backend does not record).
  virtual bool replayStep(uint64_t key, const StepInputs& in, Tensor& logits) { return false; }
  // Starts recording the step `key`: the ops called until endStepCapture() are recorded, not run.
  // False when the backend does not record now (then the ops run as usual).
  virtual bool beginStepCapture(uint64_t key, const StepInputs& in) { return false; }
  // Ends the recording, keeps it under its key and runs it once; `logits` is the step's output.
  // Throws when the recording failed; nothing ran then.
  virtual void endStepCapture(const Tensor& logits) {}
  // Abandons a recording after an error in an op (nothing ran). retryLater: the error was
  // passing (out of memory), so the same step may be recorded again; otherwise it runs op by op
  // from now on.
  virtual void abortStepCapture(bool retryLater) {}
  // Recordings kept now, and replays and recordings made so far (for tests and profiling).
  virtual void stepGraphStats(int64_t& kept, int64_t& replayed, int64_t& recordings) { kept = replayed = recordings = 0; }
  // Makes the model's RoPE frequencies resident on the device before any step is recorded: a
  // recording cannot upload them, and a failed recording leaves its step unrecorded for good.
  virtual void uploadRopeFrequencies(const std::vector<float>& invFreq) {}

  // Run-ahead decoding (Model::decodeBatch): a backend whose work runs behind the host queues a
  // step's token choice without waiting for it, and queues the next step fed with those tokens
  // on the device, so the device has the next step before the host has read this one's tokens.
  // Two slots (0, 1) each hold one queued choice. A backend that cannot does none of it.
  //
  // Whether queueSampleRows() takes rows with these settings: at least choiceCanBeQueued() of
  // every row (sampling.h), and what the backend's own sampling needs besides.
  virtual bool canQueueSampling(const SamplingParams* params, int rows) const { return false; }
  // Queues Backend::sampleRows() into `slot`, its tokens kept on the device and copied to the
  // host as they are ready. Only for rows canQueueSampling() takes.
  virtual void queueSampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                               const uint64_t* positions, int slot) {
    throw std::logic_error("queueSampleRows: this backend does not run ahead");
  }
  // Waits for the tokens queued into `slot` and copies `rows` of them to out.
  virtual void takeSampled(int slot, int rows, int32_t* out) { throw std::logic_error("takeSampled: this backend does not run ahead"); }
  // replayStep() whose token ids are the ones queued into `slot` (in.tokens is not read); false,
  // with nothing queued, when nothing is recorded under key.
  virtual bool replayStepFromSampled(uint64_t key, const StepInputs& in, int slot, Tensor& logits) { return false; }

  // Returns once every op queued so far (a step run ahead included) has finished; a model
  // calls it before it frees the buffers those ops use. The CPU runs each op as it is called.
  virtual void finishQueued() {}

  // Free and total bytes of the device's memory (0, 0 where that means nothing: the CPU).
  virtual void memoryInfo(size_t& freeBytes, size_t& totalBytes) { freeBytes = totalBytes = 0; }

  // Named regions (a layer, a prefill pass, a decode step) for profilers: NVTX on the GPU.
  virtual void pushRange(const char* name) {}
  virtual void popRange() {}
};

// Opens a backend range for the lifetime of the object.
struct BackendRange {
  StepExecution& be;
  BackendRange(StepExecution& b, const char* name) : be(b) { be.pushRange(name); }
  ~BackendRange() { be.popRange(); }
};

}  // namespace lckv
