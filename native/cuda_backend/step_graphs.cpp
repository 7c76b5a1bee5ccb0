// Decode steps recorded as CUDA graphs and replayed (step_graphs.h).
#include "step_graphs.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda_check.h"

namespace lckv {

const int32_t* StepGraph::recordedInput(Staging which, const int32_t* host, int count) const {
  size_t off = 0, len = 0;
  switch (which) {
    case Staging::Tokens: off = 0; len = (size_t)n; break;
    case Staging::Positions: off = (size_t)n; len = (size_t)n; break;
    case Staging::PageTables: off = 2 * (size_t)n; len = (size_t)tableInts; break;
    case Staging::RowToSequence: off = 2 * (size_t)n + (size_t)tableInts; len = (size_t)n; break;
    case Staging::Residuals: off = 3 * (size_t)n + (size_t)tableInts; len = (size_t)residualInts; break;
    default: break;
  }
  if (len == 0 || (size_t)count != len || std::memcmp(host, hostInputs.data() + off, sizeof(int32_t) * len) != 0)
    throw EngineError(kErrCuda, "a recorded decode step reads a host array that is not one of its inputs");
  return (const int32_t*)inputs.get() + off;
}

StepGraphs::StepGraphs(bool asked, bool profiling)
    : enabled_([&] {
        const char* e = std::getenv("LCKV_CUDA_GRAPHS");
        return asked && (e == nullptr || std::string(e) != "0") && !profiling;
      }()) {}

// Copies a step's inputs through a pinned buffer into g.inputs (stream-ordered; the pinned
// buffer is rewritten only after the previous copy has read it).
void StepGraphs::uploadInputs(StepGraph& g, const Backend::StepInputs& in, cudaStream_t stream) {
  const size_t ints = g.inputInts();
  if (pinnedInputsCap_ < ints) {
    if (pinnedInputs_) {
      cudaOk(cudaStreamSynchronize(stream), "inputs sync");
      cudaFreeHost(pinnedInputs_);
      pinnedInputs_ = nullptr;
      pinnedInputsCap_ = 0;  // nothing held if the allocation below fails
    }
    cudaOk(cudaMallocHost(&pinnedInputs_, sizeof(int32_t) * ints), "cudaMallocHost");
    pinnedInputsCap_ = ints;
  } else if (inputsCopied_) {
    cudaOk(cudaEventSynchronize(inputsCopied_), "inputs event");
  }
  int32_t* h = pinnedInputs_;
  if (in.tokens) std::memcpy(h, in.tokens, sizeof(int32_t) * (size_t)in.n);
  else std::memset(h, 0, sizeof(int32_t) * (size_t)in.n);  // replaced on the device (replayStepFromSampled)
  std::memcpy(h + in.n, in.positions, sizeof(int32_t) * (size_t)in.n);
  std::memcpy(h + 2 * in.n, in.tables, sizeof(int32_t) * (size_t)in.tableInts);
  std::memcpy(h + 2 * in.n + in.tableInts, in.rowSeq, sizeof(int32_t) * (size_t)in.n);
  if (in.residualInts > 0) std::memcpy(h + 3 * in.n + in.tableInts, in.residuals, sizeof(int32_t) * (size_t)in.residualInts);
  cudaOk(cudaMemcpyAsync(g.inputs.get(), h, sizeof(int32_t) * ints, cudaMemcpyHostToDevice, stream), "step inputs");
  if (!inputsCopied_) cudaOk(cudaEventCreateWithFlags(&inputsCopied_, cudaEventDisableTiming), "cudaEventCreate");
  cudaOk(cudaEventRecord(inputsCopied_, stream), "cudaEventRecord");
}

void StepGraphs::replay(StepGraph& g, const Backend::StepInputs& in, const SampledSlot* sampled, cudaStream_t stream) {
  uploadInputs(g, in, stream);
  if (sampled)  // over the uploaded ids, stream-ordered after the choice that writes them
    cudaOk(cudaMemcpyAsync(g.inputs.get(), sampled->device.get(), sizeof(int32_t) * (size_t)in.n, cudaMemcpyDeviceToDevice, stream),
           "step tokens");
  cudaOk(cudaGraphLaunch(g.exec, stream), "cudaGraphLaunch");
  g.lastUse = ++useClock_;
  replays_.fetch_add(1, std::memory_order_relaxed);
}

bool StepGraphs::shouldRecord(uint64_t key) {
  if (!enabled_ || recording_ || unrecordable_.count(key)) return false;
  if (sighted_.count(key)) return true;
  if (sighted_.size() >= kMaxSighted) sighted_.clear();
  sighted_.insert(key);
  return false;
}

void StepGraphs::begin(uint64_t key, const Backend::StepInputs& in, cudaStream_t stream) {
  auto g = std::make_unique<StepGraph>();
  g->n = in.n;
  g->tableInts = in.tableInts;
  g->residualInts = in.residualInts;
  g->inputs = deviceAlloc(sizeof(int32_t) * g->inputInts());
  uploadInputs(*g, in, stream);  // before the recording starts: this copy runs now
  g->hostInputs.assign(pinnedInputs_, pinnedInputs_ + g->inputInts());
  cudaOk(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
  recording_ = std::move(g);
  recordingKey_ = key;
}

void StepGraphs::end(const Tensor& logits, cudaStream_t stream) {
  std::unique_ptr<StepGraph> g = std::move(recording_);
  if (!g) throw EngineError(kErrCuda, "endStepCapture without a recording");
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamEndCapture(stream, &graph);
  if (e == cudaSuccess) e = cudaGraphInstantiate(&g->exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (e != cudaSuccess) {
    cudaGetLastError();
    unrecordable_.insert(recordingKey_);
    throw EngineError(kErrCuda, std::string("recording a decode step: ") + cudaGetErrorString(e));
  }
  g->logits = logits;
  // A key recorded again (its inputs' shape changed) replaces its old recording; only a new key
  // past kMaxGraphs makes another key's recording go.
  graphs_.erase(recordingKey_);
  if (graphs_.size() >= kMaxGraphs) {  // the least recently used recording goes
    auto lru = graphs_.begin();
    for (auto it = graphs_.begin(); it != graphs_.end(); ++it)
      if (it->second->lastUse < lru->second->lastUse) lru = it;
    graphs_.erase(lru);
  }
  g->lastUse = ++useClock_;
  cudaOk(cudaGraphLaunch(g->exec, stream), "cudaGraphLaunch");
  graphs_[recordingKey_] = std::move(g);
  graphCount_.store((int64_t)graphs_.size(), std::memory_order_relaxed);
  recordings_.fetch_add(1, std::memory_order_relaxed);
}

void StepGraphs::abort(bool retryLater, cudaStream_t stream) {
  if (!recording_) return;
  recording_.reset();
  cudaGraph_t graph = nullptr;
  cudaStreamEndCapture(stream, &graph);
  if (graph) cudaGraphDestroy(graph);
  cudaGetLastError();
  if (!retryLater) {
    unrecordable_.insert(recordingKey_);
  } else {
    // Out of memory: the other recordings' scratch goes back too (to the block cache, which
    // frees its idle blocks when an allocation fails), so the step run op by op next has it.
    // Stream order keeps a replay still running safe: the blocks are reused after it.
    graphs_.clear();
    graphCount_.store(0, std::memory_order_relaxed);
  }
}

void StepGraphs::release() {
  graphs_.clear();
  if (pinnedInputs_) cudaFreeHost(pinnedInputs_);
  if (inputsCopied_) cudaEventDestroy(inputsCopied_);
  pinnedInputs_ = nullptr;
  pinnedInputsCap_ = 0;
  inputsCopied_ = nullptr;
}

}  // namespace lckv
