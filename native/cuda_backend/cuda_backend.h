// The CUDA backend's class: the Backend interface over the kernels in cuda/ (cuda_backend.cpp
// has the ops), with the parts it owns: device memory, cuBLASLt plans, sampling slots, step
// graphs and the per-op profiler, each in a file of its own.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "../../cuda/kernels.h"
#include "../engine/backend.h"
#include "cublaslt_plans.h"
#include "device_memory.h"
#include "profiler.h"
#include "sampling_slots.h"
#include "step_graphs.h"

namespace lckv {

class CudaBackend : public Backend {
 public:
  CudaBackend(int device, DType weights, bool graphs);
  ~CudaBackend() override;
  std::string name() const override { return "cuda"; }

  void pushRange(const char* name) override;
  void memoryInfo(size_t& freeBytes, size_t& totalBytes) override;
  void popRange() override;

  Tensor alloc(int64_t rows, int64_t cols) override;
  DType linearInputType(int n) const override;
  Tensor upload(const float* host, int64_t rows, int64_t cols) override;
  DType keptWeightType(DType) const override { return weights_; }
  void download(const Tensor& t, int64_t rowStart, int64_t rowCount, float* host) override;
  void writeRows(Tensor& t, int64_t rowStart, int64_t rowCount, const float* host) override;
  void poison(Tensor& t) override;
  void embed(const int32_t* tokens, const int32_t* positions, int n, const Tensor& table, const Tensor* posTable,
             Tensor& out) override;
  void norm(NormKind kind, const Tensor& x, int n, const Tensor& weight, const Tensor* bias, float eps,
            Tensor& out) override;

  int32_t sample(const Tensor& logitsRow, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                 uint64_t position, TokenLogprobs* logprobs = nullptr) override;
  void sampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                  const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* out,
                  TokenLogprobs* logprobs = nullptr) override;
  bool canQueueSampling(const SamplingParams* params, int rows) const override;
  void queueSampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params, const uint64_t* positions,
                       int slot) override;
  void takeSampled(int slot, int rows, int32_t* out) override;

  void addNorm(NormKind kind, Tensor& h, const Tensor& delta, int n, const Tensor& weight, const Tensor* bias, float eps,
               Tensor& out) override;
  void linear(const Tensor& x, int n, const Tensor& w, const Tensor* bias, Tensor& out) override;
  void linears(const Tensor& x, int n, const LinearTarget* targets, int count) override;
  void packWeights(Tensor* parts, int count) override;
  void linearSwiglu(const Tensor& x, int n, const Tensor& gate, const Tensor* gateB, const Tensor& up, const Tensor* upB,
                    Tensor& out) override;
  void addInPlace(Tensor& x, const Tensor& y, int n) override;
  void rope(Tensor& x, int n, int heads, int headDim, const int32_t* positions, const std::vector<float>& invFreq,
            float attentionScale) override;
  void ropeKvWrite(Tensor& q, int numHeads, Tensor* k, const Tensor* v, int numKvHeads, int headDim, int n,
                   const int32_t* positions, const std::vector<float>& invFreq, float attentionScale, const KvView* kv,
                   int slot) override;

  // ---- decode-step graphs (Backend::replayStep and friends; step_graphs.h) ----
  bool replayStep(uint64_t key, const StepInputs& in, Tensor& logits) override { return replay(key, in, -1, logits); }
  bool replayStepFromSampled(uint64_t key, const StepInputs& in, int slot, Tensor& logits) override;
  void finishQueued() override;
  void uploadRopeFrequencies(const std::vector<float>& invFreq) override;
  void stepGraphStats(int64_t& kept, int64_t& replayed, int64_t& recordings) override { steps_.stats(kept, replayed, recordings); }
  bool beginStepCapture(uint64_t key, const StepInputs& in) override;
  void endStepCapture(const Tensor& logits) override { steps_.end(logits, stream_); }
  void abortStepCapture(bool retryLater) override { steps_.abort(retryLater, stream_); }

  void kvWrite(const KvView& kv, int slot, const Tensor& k, const Tensor& v, int n, const int32_t* positions) override;
  void kvZero(const KvView& kv, int seq, int slot, int start, int n) override;
  void kvRead(const KvView& kv, int seq, int slot, int start, int n, std::vector<float>& host) override;
  KvMotion kvMotion(const KvView& kv, int seq, int slot, int start, int n, std::shared_ptr<void>& snapshot) override;
  std::string attentionProblem(const AttentionSpec& spec, KvType kvType) const override;
  std::string kvPageProblem(KvType kvType, int pageTokens) const override;
  void attention(const Tensor& q, int n, const int32_t* positions, const KvView& kv, int slot, const AttentionSpec& sp,
                 Tensor& out) override;
  void swiglu(const Tensor& gate, const Tensor& up, int n, Tensor& out) override;
  void geluTanh(Tensor& x, int n) override;
  void copyRows(const Tensor& src, int srcRow, Tensor& dst, int dstRow, int n) override;

 private:
  struct Timed {
    CudaBackend& be;
    Timed(CudaBackend& b, const char* name) : be(b) {
      if (be.profiler_.enabled()) be.profiler_.begin(name, be.stream_);
    }
    ~Timed() {
      if (be.profiler_.enabled()) be.profiler_.end(be.stream_);
    }
  };

  // Token choices on the device into d[0, rows). histories: null, or read for rows with a penalty.
  // dLogprobs: null, or where rows that ask for log-probabilities write them (a row each).
  void queueChoices(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                    const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* d,
                    cuda::RowLogprobs* dLogprobs);
  // Whether row p is sampled by the host reference (Backend's path) rather than on the device.
  bool hostSamples(const SamplingParams& p) const;
  // replayStep(), with the token ids taken from a queued choice's slot when slot >= 0.
  bool replay(uint64_t key, const StepInputs& in, int slot, Tensor& logits);
  // The page tables and row-to-sequence map on the device, checked on the host: the pages
  // of each row's position must exist (tables have no holes, so the last page is enough). A
  // channel-key type's residuals go with them, checked by kv_format.h's rule as the CPU backend
  // checks it: for a write (reads null), each row's residual must hold the page of its position;
  // for an attention of `reads`, the page of its last visible key unless that page is complete.
  cuda::PagedKv paged(const KvView& kv, int slot, int n, const int32_t* positions, const AttentionSpec* reads = nullptr);

  // Device memory for an op; while a step is recorded, the recording keeps it.
  std::shared_ptr<void> block(size_t bytes);
  // A small host array on the device (StagingBuffers::upload); while a step is recorded, the
  // recording's own input (StepGraph::recordedInput).
  const int32_t* stage(Staging which, const int32_t* host, int n);
  // The RoPE frequencies on the device (RopeFrequencies::device).
  const float* deviceInvFreq(const std::vector<float>& f) { return invFreq_.device(f, steps_.recording() != nullptr, stream_); }
  // Device memory an op uses while it runs, held by the caller until its kernels are queued.
  std::shared_ptr<void> scratchBf16(size_t count);
  std::shared_ptr<void> scratchF32(size_t count);
  // At least `bytes`: the buffer kept in buf (grown, never shrunk) up to kScratchKeepBytes; a
  // larger request outside a recording gets a block from the cache for the op alone.
  std::shared_ptr<void> scratch(std::shared_ptr<void>& buf, size_t& capBytes, size_t bytes);

  // The hand-written GEMV for small batches and for weights cuBLASLt is not set up for here.
  bool useGemv(int n, const LinearTarget* t, int count) const;
  // x[n, cols] as the bf16 input of a cuBLASLt product: x itself when it is bf16, else a
  // conversion into the bf16 scratch, which `hold` keeps for the op.
  const void* bf16Input(const Tensor& x, int n, std::shared_ptr<void>& hold);

  // Up to this many rows (decode batches) the GEMV runs, whose result for a row does not depend on
  // the other rows: a sequence decodes the same alone or in a batch. Larger chunks use cuBLASLt.
  static constexpr int kGemvMaxRows = 16;
  // The most a scratch buffer keeps between ops. Decode batches (the steps recordings share the
  // buffers of) ask far less; a prefill chunk's SwiGLU products ask much more (n x 2I floats,
  // about 92 MB at 2048 rows of TinyLlama's shape), and kept they would stay taken for the
  // process's life. Taken from the block cache instead, they are reused by the next layer and
  // the next chunk of that size like any activation, and given back when memory runs out.
  static constexpr size_t kScratchKeepBytes = size_t(16) << 20;

  void ctx() { cudaSetDevice(device_); }

  int device_ = 0;
  DType weights_;
  cudaStream_t stream_ = nullptr;
  CublasLtPlans cublasLt_;
  StagingBuffers staging_;
  SamplingSlots sampled_;
  const bool deviceSampling_ = [] {
    const char* e = std::getenv("LCKV_DEVICE_SAMPLING");
    return e == nullptr || std::string(e) != "0";
  }();
  RopeFrequencies invFreq_;
  std::shared_ptr<void> bf16Scratch_;
  std::shared_ptr<void> f32Scratch_;  // a packed product's output before it is split
  BlockCache blocks_;
  OpProfiler profiler_;
  StepGraphs steps_;
  size_t bf16Cap_ = 0;  // bytes
  size_t f32Cap_ = 0;   // bytes
};

}  // namespace lckv
