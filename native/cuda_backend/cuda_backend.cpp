// The CUDA backend: the Backend interface over the kernels in cuda/ and cuBLASLt.
// Activations and the KV cache are f32 on the device; weights are bf16 (default), f16 or f32.
// Small batches (n <= 16 rows) take the hand-written GEMV; larger ones take cuBLASLt (bf16
// inputs, f32 accumulation and output). Decode steps are recorded as CUDA graphs and replayed
// (LCKV_CUDA_GRAPHS=0 turns that off; LCKV_PROFILE=1 does too, to time each op).
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <vector>

#include "../../cuda/kernels.h"
#include "../engine/backend.h"
#include "../engine/errors.h"
#include "../engine/weights.h"

namespace lckv {

namespace {

void cudaOk(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky-free error so the process keeps working
  if (e == cudaErrorMemoryAllocation) throw std::bad_alloc();
  throw EngineError("LCKV_CUDA", std::string(what) + ": " + cudaGetErrorString(e));
}

void cublasOk(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  if (s == CUBLAS_STATUS_ALLOC_FAILED) throw std::bad_alloc();
  throw EngineError("LCKV_CUDA", std::string(what) + ": cuBLAS status " + std::to_string((int)s));
}

std::shared_ptr<void> deviceAlloc(size_t bytes) {
  void* p = nullptr;
  cudaOk(cudaMalloc(&p, bytes > 0 ? bytes : 16), "cudaMalloc");
  return std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
}

// Activations are allocated per forward; cudaMalloc/cudaFree per call would synchronise the
// device each time. Freed blocks go back to a per-size free list instead. All work runs on the
// backend's one stream, so a block freed by the host is reused only by work queued after the
// work that last used it.
class BlockCache {
 public:
  std::shared_ptr<void> get(size_t bytes) {
    bytes = (bytes + 255) & ~size_t(255);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lk(state_->mu);
      auto& list = state_->free[bytes];
      if (!list.empty()) {
        p = list.back();
        list.pop_back();
      }
    }
    if (!p) {
      cudaError_t e = cudaMalloc(&p, bytes);
      if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        release();  // give cached blocks back and try once more
        e = cudaMalloc(&p, bytes);
      }
      cudaOk(e, "cudaMalloc");
    }
    auto st = state_;
    return std::shared_ptr<void>(p, [st, bytes](void* q) {
      std::lock_guard<std::mutex> lk(st->mu);
      st->free[bytes].push_back(q);
    });
  }
  void release() {
    std::lock_guard<std::mutex> lk(state_->mu);
    for (auto& kv : state_->free)
      for (void* q : kv.second) cudaFree(q);
    state_->free.clear();
  }
  ~BlockCache() { release(); }

 private:
  struct State {
    std::mutex mu;
    std::map<size_t, std::vector<void*>> free;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

int weightType(DType t) { return t == DType::F32 ? 0 : t == DType::BF16 ? 1 : 2; }

// LCKV_PROFILE=1: every op is bracketed by CUDA events; times are gathered at the next host
// synchronisation and a per-op summary is printed to stderr when the backend is destroyed
// (model.dispose() or process exit). Nsight Systems shows the same ops as NVTX ranges.
class OpProfiler {
 public:
  OpProfiler() {
    const char* e = std::getenv("LCKV_PROFILE");
    enabled_ = e && *e && std::string(e) != "0";
  }
  bool enabled() const { return enabled_; }
  void begin(const char* name, cudaStream_t s) {
    Pending p{name, event(), event()};
    cudaEventRecord(p.start, s);
    open_.push_back(p);
  }
  void end(cudaStream_t s) {
    Pending p = open_.back();
    open_.pop_back();
    cudaEventRecord(p.stop, s);
    pending_.push_back(p);
    if (pending_.size() > 4096) collect();
  }
  void collect() {
    for (auto& p : pending_) {
      cudaEventSynchronize(p.stop);
      float ms = 0;
      cudaEventElapsedTime(&ms, p.start, p.stop);
      auto& st = stats_[p.name];
      st.calls++;
      st.ms += ms;
      free_.push_back(p.start);
      free_.push_back(p.stop);
    }
    pending_.clear();
  }
  void report() {
    if (!enabled_) return;
    collect();
    double total = 0;
    for (auto& kv : stats_) total += kv.second.ms;
    std::vector<std::pair<std::string, Stat>> rows(stats_.begin(), stats_.end());
    std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.ms > b.second.ms; });
    std::fprintf(stderr, "lckv profile (CUDA events, GPU time per op)\n%-16s %10s %12s %12s %7s\n", "op", "calls", "total ms",
                 "mean us", "share");
    for (auto& r : rows)
      std::fprintf(stderr, "%-16s %10lld %12.3f %12.2f %6.1f%%\n", r.first.c_str(), (long long)r.second.calls, r.second.ms,
                   1e3 * r.second.ms / (double)r.second.calls, total > 0 ? 100.0 * r.second.ms / total : 0.0);
    std::fprintf(stderr, "%-16s %10s %12.3f\n", "total", "", total);
  }
  ~OpProfiler() {
    for (auto e : free_) cudaEventDestroy(e);
  }

 private:
  struct Pending {
    const char* name;
    cudaEvent_t start, stop;
  };
  struct Stat {
    long long calls = 0;
    double ms = 0;
  };
  cudaEvent_t event() {
    if (!free_.empty()) {
      cudaEvent_t e = free_.back();
      free_.pop_back();
      return e;
    }
    cudaEvent_t e;
    cudaEventCreate(&e);
    return e;
  }
  bool enabled_ = false;
  std::vector<Pending> open_, pending_;
  std::vector<cudaEvent_t> free_;
  std::map<std::string, Stat> stats_;
};

class CudaBackend : public Backend {
 public:
  CudaBackend(int device, DType weights, bool graphs) : weights_(weights), graphsAsked_(graphs) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();
      throw EngineError("LCKV_DEVICE_UNAVAILABLE", "no usable CUDA device (driver missing or no GPU)");
    }
    if (device < 0 || device >= count) throw EngineError(kErrInvalidArgument, "CUDA device index out of range");
    device_ = device;
    cudaOk(cudaSetDevice(device_), "cudaSetDevice");
    cudaOk(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cublasOk(cublasLtCreate(&lt_), "cublasLtCreate");
    workspace_ = deviceAlloc(kWorkspace);
    // Programmatic dependent launch needs sm_90 and kernels built for it; LCKV_PDL=0 turns it
    // off (to measure it, or to rule it out). One setting for the process (see kernels.h).
    const char* pdl = std::getenv("LCKV_PDL");
    lckv::cuda::enableProgrammaticLaunch(lckv::cuda::programmaticLaunchSupported() && (pdl == nullptr || std::string(pdl) != "0"));
  }
  ~CudaBackend() override {
    profiler_.report();
    abortStepCapture(false);
    cudaStreamSynchronize(stream_);  // a step run ahead may still be copying into pinned buffers
    graphs_.clear();
    if (pinnedInputs_) cudaFreeHost(pinnedInputs_);
    if (inputsCopied_) cudaEventDestroy(inputsCopied_);
    for (SampledSlot& q : sampled_) {
      if (q.pinned) cudaFreeHost(q.pinned);
      if (q.ready) cudaEventDestroy(q.ready);
    }
    if (lt_) cublasLtDestroy(lt_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  std::string name() const override { return "cuda"; }

  void pushRange(const char* name) override { nvtxRangePushA(name); }
  void memoryInfo(size_t& freeBytes, size_t& totalBytes) override {
    ctx();
    cudaOk(cudaMemGetInfo(&freeBytes, &totalBytes), "cudaMemGetInfo");
  }
  void popRange() override { nvtxRangePop(); }

  Tensor alloc(int64_t rows, int64_t cols) override {
    ctx();
    Tensor t;
    t.storage = block(sizeof(float) * (size_t)(rows * cols));
    t.data = t.storage.get();
    t.rows = rows;
    t.cols = cols;
    return t;
  }

  Tensor upload(const float* host, int64_t rows, int64_t cols) override {
    ctx();
    const size_t count = (size_t)(rows * cols);
    Tensor t;
    t.dtype = weights_;
    t.rows = rows;
    t.cols = cols;
    t.storage = deviceAlloc(count * dtypeSize(weights_));
    t.data = t.storage.get();
    if (weights_ == DType::F32) {
      cudaOk(cudaMemcpyAsync(t.data, host, count * 4, cudaMemcpyHostToDevice, stream_), "upload");
    } else {
      std::vector<uint16_t> h(count);
      for (size_t i = 0; i < count; ++i) h[i] = weights_ == DType::BF16 ? f32ToBf16(host[i]) : f32ToF16(host[i]);
      cudaOk(cudaMemcpyAsync(t.data, h.data(), count * 2, cudaMemcpyHostToDevice, stream_), "upload");
    }
    // Pageable sources: the copy has left host memory when cudaMemcpyAsync returns, and being on
    // the stream it lands before any kernel queued after it.
    return t;
  }

  void download(const Tensor& t, int64_t rowStart, int64_t rowCount, float* host) override {
    ctx();
    Timed timed(*this, "download_logits");
    cudaOk(cudaMemcpyAsync(host, (const float*)t.data + rowStart * t.cols, sizeof(float) * (size_t)(rowCount * t.cols),
                           cudaMemcpyDeviceToHost, stream_),
           "download");
    cudaOk(cudaStreamSynchronize(stream_), "download sync");
  }

  void writeRows(Tensor& t, int64_t rowStart, int64_t rowCount, const float* host) override {
    ctx();
    cudaOk(cudaMemcpyAsync((float*)t.data + rowStart * t.cols, host, sizeof(float) * (size_t)(rowCount * t.cols),
                           cudaMemcpyHostToDevice, stream_),
           "writeRows");
    cudaOk(cudaStreamSynchronize(stream_), "writeRows sync");
  }
  void poison(Tensor& t) override {
    ctx();
    cudaOk(cudaMemsetAsync(t.data, 0xff, sizeof(float) * (size_t)t.numel(), stream_), "poison");  // all-ones bits: NaN
  }
  void embed(const int32_t* tokens, const int32_t* positions, int n, const Tensor& table, const Tensor* posTable,
             Tensor& out) override {
    ctx();
    Timed timed(*this, "embed");
    const int32_t* dTok = stage(0, tokens, n);
    const int32_t* dPos = stage(1, positions, n);
    cuda::launchEmbed(dTok, dPos, n, table.data, posTable ? posTable->data : nullptr, weightType(table.dtype),
                      (int)table.cols, (float*)out.data, stream_);
  }

  void norm(NormKind kind, const Tensor& x, int n, const Tensor& weight, const Tensor* bias, float eps,
            Tensor& out) override {
    ctx();
    Timed timed(*this, "norm");
    cuda::launchNorm(kind == NormKind::Rms, (const float*)x.data, n, (int)x.cols, weight.data, bias ? bias->data : nullptr,
                     weightType(weight.dtype), eps, (float*)out.data, stream_);
  }

  // Token choice on the device (greedy, or sampling with temperature > 0): only the chosen ids
  // cross to the host. LCKV_DEVICE_SAMPLING=0 makes the host reference sample instead (for
  // bisecting a disagreement between the two).
  int32_t sample(const Tensor& logitsRow, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                 uint64_t position) override {
    if (p.temperature > 0.0f && !deviceSampling_) return Backend::sample(logitsRow, vocab, p, history, position);
    int32_t token = 0;
    sampleRows(logitsRow, 1, vocab, &p, &history, &position, &token);
    return token;
  }

  // Every row's choice is queued before one copy and one synchronisation; rows that are all
  // plain greedy (no penalty) take one launch, a block per row.
  void sampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                  const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* out) override {
    for (int r = 0; r < rows; ++r)
      if (params[r].temperature > 0.0f && !deviceSampling_) return Backend::sampleRows(logits, rows, vocab, params, histories, positions, out);
    ctx();
    Timed timed(*this, "sample");
    // Its own slot: the two run-ahead slots may hold a queued step's tokens.
    SampledSlot& q = sampledSlot(kWaitedSlot, rows);
    queueChoices(logits, rows, vocab, params, histories, positions, (int32_t*)q.device.get());
    cudaOk(cudaMemcpyAsync(q.pinned, q.device.get(), sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost, stream_), "token copy");
    cudaOk(cudaStreamSynchronize(stream_), "sample sync");
    std::memcpy(out, q.pinned, sizeof(int32_t) * (size_t)rows);
  }

  bool canQueueSampling(const SamplingParams* params, int rows) const override {
    for (int r = 0; r < rows; ++r)
      if (params[r].repetitionPenalty != 1.0f || (params[r].temperature > 0.0f && !deviceSampling_)) return false;
    return graphsEnabled_;
  }

  void queueSampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params, const uint64_t* positions,
                       int slot) override {
    if (!queuedSlot(slot)) throw EngineError("LCKV_CUDA", "queueSampleRows: slot must be 0 or 1");
    ctx();
    Timed timed(*this, "sample");
    SampledSlot& q = sampledSlot(slot, rows);
    if (!q.ready) cudaOk(cudaEventCreateWithFlags(&q.ready, cudaEventDisableTiming), "cudaEventCreate");
    q.rows = 0;
    queueChoices(logits, rows, vocab, params, nullptr, positions, (int32_t*)q.device.get());
    cudaOk(cudaMemcpyAsync(q.pinned, q.device.get(), sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost, stream_), "token copy");
    cudaOk(cudaEventRecord(q.ready, stream_), "cudaEventRecord");
    q.rows = rows;
  }

  void takeSampled(int slot, int rows, int32_t* out) override {
    ctx();
    if (!queuedSlot(slot)) throw EngineError("LCKV_CUDA", "takeSampled: slot must be 0 or 1");
    SampledSlot& q = sampled_[slot];
    if (!q.ready || q.rows != rows) throw EngineError("LCKV_CUDA", "takeSampled: these rows were not queued into this slot");
    cudaOk(cudaEventSynchronize(q.ready), "sample sync");
    std::memcpy(out, q.pinned, sizeof(int32_t) * (size_t)rows);
  }

  // Token choices on the device into d[0, rows). histories: null, or read for rows with a penalty.
  void queueChoices(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                    const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* d) {
    bool plainGreedy = true;
    for (int r = 0; r < rows; ++r)
      if (params[r].temperature > 0.0f || params[r].repetitionPenalty != 1.0f) plainGreedy = false;
    const float* base = (const float*)logits.data;
    if (plainGreedy) {
      cuda::launchGreedyRows(base, rows, vocab, logits.cols, d, stream_);
      return;
    }
    std::shared_ptr<void> scratch, ws;  // one each, reused row after row (stream-ordered)
    for (int r = 0; r < rows; ++r) {
      const SamplingParams& p = params[r];
      const float* row = base + (int64_t)r * logits.cols;
      std::vector<int32_t> distinct;
      if (p.repetitionPenalty != 1.0f && histories) {
        distinct = histories[r];
        std::sort(distinct.begin(), distinct.end());
        distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
      }
      // One staging buffer for every row: each copy is queued after the previous row's kernel.
      const int32_t* dPen = distinct.empty() ? nullptr : stage(2, distinct.data(), (int)distinct.size());
      if (p.temperature <= 0.0f) {
        if (!scratch) scratch = blocks_.get(sizeof(float) * (size_t)vocab);
        cuda::launchGreedy(row, vocab, (float*)scratch.get(), dPen, (int)distinct.size(), p.repetitionPenalty, d + r, stream_);
      } else {
        if (!ws) ws = blocks_.get(cuda::sampleWorkspaceBytes(vocab));
        cuda::launchSample(row, vocab, dPen, (int)distinct.size(), p.repetitionPenalty, p.temperature, p.topK, p.topP,
                           p.minP, p.seed, positions[r], ws.get(), d + r, stream_);
      }
    }
  }

  void addNorm(NormKind kind, Tensor& h, const Tensor& delta, int n, const Tensor& weight, const Tensor* bias, float eps,
               Tensor& out) override {
    ctx();
    Timed timed(*this, "add_norm");
    cuda::launchAddNorm(kind == NormKind::Rms, (float*)h.data, (const float*)delta.data, n, (int)h.cols, weight.data,
                        bias ? bias->data : nullptr, weightType(weight.dtype), eps, (float*)out.data, stream_);
  }

  void linear(const Tensor& x, int n, const Tensor& w, const Tensor* bias, Tensor& out) override {
    const LinearTarget t{&w, bias, &out};
    linears(x, n, &t, 1);
  }

  void linears(const Tensor& x, int n, const LinearTarget* targets, int count) override {
    if (count > 1) {
      bool sameType = true;
      for (int i = 1; i < count; ++i) sameType = sameType && targets[i].w->dtype == targets[0].w->dtype;
      if (!sameType || count > cuda::kGemvMaxTargets) {  // one launch reads one weight type
        for (int i = 0; i < count; ++i) linears(x, n, &targets[i], 1);
        return;
      }
    }
    ctx();
    for (int i = 0; i < count; ++i)
      if (x.cols != targets[i].w->cols || targets[i].out->cols != targets[i].w->rows)
        throw EngineError(kErrInvalidArgument, "linear: shape mismatch");
    const int I = (int)x.cols;
    if (useGemv(n, targets, count)) {
      Timed timed(*this, "gemv");
      cuda::GemvTarget g[cuda::kGemvMaxTargets];
      for (int i = 0; i < count; ++i)
        g[i] = {targets[i].w->data, targets[i].bias ? targets[i].bias->data : nullptr, (int)targets[i].w->rows,
                (float*)targets[i].out->data};
      cuda::launchGemv((const float*)x.data, n, I, g, count, weightType(targets[0].w->dtype), stream_);
      return;
    }
    // cuBLASLt: out^T[O, n] = W[O, I] . x^T[I, n] in column-major terms; x converted once.
    Timed timed(*this, "gemm_cublaslt");
    void* xb = scratchBf16((size_t)n * I);
    cuda::launchToBf16((const float*)x.data, (int64_t)n * I, xb, stream_);
    for (int i = 0; i < count; ++i) {
      const Tensor& w = *targets[i].w;
      matmulBf16(w.data, xb, (float*)targets[i].out->data, (int)w.rows, n, I);
      if (targets[i].bias)
        cuda::launchAddBias((float*)targets[i].out->data, n, (int)w.rows, targets[i].bias->data,
                            weightType(targets[i].bias->dtype), stream_);
    }
  }

  void linearSwiglu(const Tensor& x, int n, const Tensor& gate, const Tensor* gateB, const Tensor& up, const Tensor* upB,
                    Tensor& upScratch, Tensor& out) override {
    const LinearTarget t[2] = {{&gate, gateB, &out}, {&up, upB, &upScratch}};
    if (!useGemv(n, t, 2) || gate.rows != up.rows) return Backend::linearSwiglu(x, n, gate, gateB, up, upB, upScratch, out);
    ctx();
    if (x.cols != gate.cols || x.cols != up.cols || out.cols != gate.rows)
      throw EngineError(kErrInvalidArgument, "linearSwiglu: shape mismatch");
    Timed timed(*this, "gemv_swiglu");
    cuda::launchGemvSwiglu((const float*)x.data, n, (int)x.cols, {gate.data, gateB ? gateB->data : nullptr, (int)gate.rows, (float*)out.data},
                           {up.data, upB ? upB->data : nullptr, (int)up.rows, nullptr}, weightType(gate.dtype), stream_);
  }

  void addInPlace(Tensor& x, const Tensor& y, int n) override {
    ctx();
    Timed timed(*this, "residual_add");
    cuda::launchAdd((float*)x.data, (const float*)y.data, (int64_t)n * x.cols, stream_);
  }

  void rope(Tensor& x, int n, int heads, int headDim, const int32_t* positions, const std::vector<float>& invFreq,
            float attentionScale) override {
    ctx();
    Timed timed(*this, "rope");
    const int32_t* dPos = stage(1, positions, n);
    cuda::launchRope((float*)x.data, n, heads, headDim, dPos, deviceInvFreq(invFreq), attentionScale, stream_);
  }

  void ropeKvWrite(Tensor& q, int numHeads, Tensor* k, const Tensor* v, int numKvHeads, int headDim, int n,
                   const int32_t* positions, const std::vector<float>& invFreq, float attentionScale, const KvView* kv,
                   int slot) override {
    ctx();
    Timed timed(*this, "rope_kv_write");
    cuda::PagedKv p{};
    if (k) p = paged(*kv, slot, n, positions);
    const int32_t* dPos = stage(1, positions, n);
    cuda::launchRopeKvWrite((float*)q.data, numHeads, k ? (const float*)k->data : nullptr, v ? (const float*)v->data : nullptr,
                            numKvHeads, headDim, n, dPos, deviceInvFreq(invFreq), attentionScale, k ? &p : nullptr, stream_);
  }

  // ---- decode-step graphs (Backend::replayStep and friends) ----

  bool replayStep(uint64_t key, const StepInputs& in, Tensor& logits) override { return replay(key, in, -1, logits); }

  bool replayStepFromSampled(uint64_t key, const StepInputs& in, int slot, Tensor& logits) override {
    if (!queuedSlot(slot) || sampled_[slot].rows != in.n) return false;
    return replay(key, in, slot, logits);
  }

  // replayStep(), with the token ids taken from a queued choice's slot when slot >= 0.
  bool replay(uint64_t key, const StepInputs& in, int slot, Tensor& logits) {
    if (!graphsEnabled_) return false;
    auto it = graphs_.find(key);
    if (it == graphs_.end()) return false;
    StepGraph& g = *it->second;
    if (g.n != in.n || g.tableInts != in.tableInts) return false;
    ctx();
    uploadInputs(g, in);
    if (slot >= 0)  // over the uploaded ids, stream-ordered after the choice that writes them
      cudaOk(cudaMemcpyAsync(g.inputs.get(), sampled_[slot].device.get(), sizeof(int32_t) * (size_t)in.n, cudaMemcpyDeviceToDevice, stream_),
             "step tokens");
    cudaOk(cudaGraphLaunch(g.exec, stream_), "cudaGraphLaunch");
    g.lastUse = ++useClock_;
    replays_.fetch_add(1, std::memory_order_relaxed);
    logits = g.logits;
    return true;
  }

  void finishQueued() override {
    ctx();
    cudaOk(cudaStreamSynchronize(stream_), "finishQueued");
  }

  // Read from the JavaScript thread while a step may run: the counts are atomics.
  void stepGraphStats(int64_t& recorded, int64_t& replayed) override {
    recorded = graphCount_.load(std::memory_order_relaxed);
    replayed = replays_.load(std::memory_order_relaxed);
  }

  bool beginStepCapture(uint64_t key, const StepInputs& in) override {
    if (!graphsEnabled_ || recording_ || unrecordable_.count(key)) return false;
    ctx();
    auto g = std::make_unique<StepGraph>();
    g->n = in.n;
    g->tableInts = in.tableInts;
    g->inputs = deviceAlloc(sizeof(int32_t) * g->inputInts());
    uploadInputs(*g, in);  // before the recording starts: this copy runs now
    g->hostInputs.assign(pinnedInputs_, pinnedInputs_ + g->inputInts());
    cudaOk(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    recording_ = std::move(g);
    recordingKey_ = key;
    return true;
  }

  void endStepCapture(const Tensor& logits) override {
    std::unique_ptr<StepGraph> g = std::move(recording_);
    if (!g) throw EngineError("LCKV_CUDA", "endStepCapture without a recording");
    cudaGraph_t graph = nullptr;
    cudaError_t e = cudaStreamEndCapture(stream_, &graph);
    if (e == cudaSuccess) e = cudaGraphInstantiate(&g->exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
      cudaGetLastError();
      unrecordable_.insert(recordingKey_);
      throw EngineError("LCKV_CUDA", std::string("recording a decode step: ") + cudaGetErrorString(e));
    }
    g->logits = logits;
    if (graphs_.size() >= kMaxGraphs) {  // the least recently used recording goes
      auto lru = graphs_.begin();
      for (auto it = graphs_.begin(); it != graphs_.end(); ++it)
        if (it->second->lastUse < lru->second->lastUse) lru = it;
      graphs_.erase(lru);
    }
    g->lastUse = ++useClock_;
    cudaOk(cudaGraphLaunch(g->exec, stream_), "cudaGraphLaunch");
    graphs_[recordingKey_] = std::move(g);
    graphCount_.store((int64_t)graphs_.size(), std::memory_order_relaxed);
  }

  void abortStepCapture(bool retryLater) override {
    if (!recording_) return;
    recording_.reset();
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
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

  // The page tables and row-to-sequence map on the device, checked on the host: the pages
  // of each row's position must exist (tables have no holes, so the last page is enough).
  cuda::PagedKv paged(const KvView& kv, int slot, int n, const int32_t* positions) {
    for (int r = 0; r < n; ++r) kv.pageAt(kv.rowSeq[r], positions[r]);
    if (slot < 0 || slot >= kv.layout.slots) throw EngineError(kErrInvalidArgument, "K/V slot out of range");
    int shift = 0;
    while ((1 << shift) < kv.layout.pageTokens) ++shift;
    cuda::PagedKv p;
    p.pool = (float*)kv.pool->data;
    p.tables = stage(3, kv.tables, kv.numSeqs * kv.stride);
    p.rowSeq = stage(4, kv.rowSeq, n);
    p.stride = kv.stride;
    p.pageShift = shift;
    p.pageFloats = kv.layout.pageFloats();
    p.slot = slot;
    p.kvDim = kv.layout.kvDim;
    return p;
  }

  void kvWrite(const KvView& kv, int slot, const Tensor& k, const Tensor& v, int n, const int32_t* positions) override {
    ctx();
    Timed timed(*this, "kv_write");
    const cuda::PagedKv p = paged(kv, slot, n, positions);
    const int32_t* dPos = stage(1, positions, n);
    cuda::launchKvWrite((const float*)k.data, (const float*)v.data, n, dPos, p, stream_);
  }

  // Positions [start, start + n) of one sequence, as runs that stay inside one page.
  template <typename F>
  void forEachPageRun(const KvView& kv, int seq, int start, int n, F f) {
    const int P = kv.layout.pageTokens;
    for (int p = start; p < start + n;) {
      const int32_t page = kv.pageAt(seq, p);
      const int len = std::min(start + n - p, P - p % P);
      f(page, p, len);
      p += len;
    }
  }

  void kvZero(const KvView& kv, int seq, int slot, int start, int n) override {
    ctx();
    Timed timed(*this, "kv_zero");
    float* pool = (float*)kv.pool->data;
    const size_t d = (size_t)kv.layout.kvDim;
    forEachPageRun(kv, seq, start, n, [&](int32_t page, int p, int len) {
      for (int v = 0; v < 2; ++v)
        cudaOk(cudaMemsetAsync(pool + kv.layout.offset(page, slot, v, p % kv.layout.pageTokens), 0, len * d * sizeof(float), stream_), "kvZero");
    });
  }

  void kvRead(const KvView& kv, int seq, int slot, int start, int n, std::vector<float>& host) override {
    ctx();
    Timed timed(*this, "kv_read");
    const float* pool = (const float*)kv.pool->data;
    const size_t d = (size_t)kv.layout.kvDim;
    host.resize(2 * (size_t)n * d);
    forEachPageRun(kv, seq, start, n, [&](int32_t page, int p, int len) {
      for (int v = 0; v < 2; ++v)
        cudaOk(cudaMemcpyAsync(host.data() + ((size_t)v * n + (size_t)(p - start)) * d,
                               pool + kv.layout.offset(page, slot, v, p % kv.layout.pageTokens), len * d * sizeof(float),
                               cudaMemcpyDeviceToHost, stream_),
               "kvRead");
    });
    cudaOk(cudaStreamSynchronize(stream_), "kvRead sync");
  }

  void attention(const Tensor& q, int n, const int32_t* positions, const KvView& kv, int slot, const AttentionSpec& sp,
                 Tensor& out) override {
    ctx();
    Timed timed(*this, "attention");
    // The split-K plan follows the longest visible range, taken at the end of the furthest
    // query's context bucket (kStepContextBucket positions; at most the window): every step of a bucket gets the same
    // plan, so a replayed recording (Model::decodeBatch keys them by that bucket) and the same
    // step run op by op add the same partial sums in the same order.
    int maxPos = 0;
    for (int r = 0; r < n; ++r) maxPos = std::max(maxPos, positions[r]);
    int maxVisible = (maxPos / kStepContextBucket + 1) * kStepContextBucket;
    if (sp.window > 0) maxVisible = std::min(maxVisible, sp.window);
    const cuda::PagedKv p = paged(kv, slot, n, positions);
    const int32_t* dPos = stage(1, positions, n);
    const int64_t wsFloats = cuda::attentionWorkspaceFloats(n, sp.numHeads, sp.numKvHeads, sp.headDim, maxVisible);
    std::shared_ptr<void> ws;
    if (wsFloats > 0 && recording_) {
      // One split-K workspace per recording, shared by its layers (they run one after another).
      if (recording_->attentionWorkspaceFloats < wsFloats) {
        recording_->attentionWorkspace = block((size_t)wsFloats * sizeof(float));
        recording_->attentionWorkspaceFloats = wsFloats;
      }
      ws = recording_->attentionWorkspace;
    } else if (wsFloats > 0) {
      ws = blocks_.get((size_t)wsFloats * sizeof(float));
    }
    bool oneSequence = true;
    for (int r = 1; r < n && oneSequence; ++r) oneSequence = kv.rowSeq[r] == kv.rowSeq[0];
    cuda::launchAttention((const float*)q.data, n, dPos, maxVisible, p, sp.numHeads, sp.numKvHeads,
                          sp.headDim, sp.strict, sp.window, sp.scale, oneSequence, (float*)out.data, (float*)ws.get(),
                          wsFloats, stream_);
  }

  void swiglu(const Tensor& gate, const Tensor& up, int n, Tensor& out) override {
    ctx();
    Timed timed(*this, "swiglu");
    cuda::launchSwiglu((const float*)gate.data, (const float*)up.data, (int64_t)n * gate.cols, (float*)out.data, stream_);
  }

  void geluTanh(Tensor& x, int n) override {
    ctx();
    Timed timed(*this, "gelu");
    cuda::launchGeluTanh((float*)x.data, (int64_t)n * x.cols, stream_);
  }

  void copyRows(const Tensor& src, int srcRow, Tensor& dst, int dstRow, int n) override {
    ctx();
    Timed timed(*this, "copy_rows");
    cudaOk(cudaMemcpyAsync((float*)dst.data + (int64_t)dstRow * dst.cols, (const float*)src.data + (int64_t)srcRow * src.cols,
                           sizeof(float) * (size_t)(n * src.cols), cudaMemcpyDeviceToDevice, stream_),
           "copyRows");
  }


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
  // One recorded decode step. Its inputs live in its own device buffer, packed as token ids |
  // positions | page tables | row-to-sequence map; every block its ops use is held here, so
  // the addresses the recording baked in stay valid (and unshared) while it lives.
  struct StepGraph {
    cudaGraphExec_t exec = nullptr;
    int n = 0, tableInts = 0;
    std::shared_ptr<void> inputs;
    std::vector<int32_t> hostInputs;  // what the recording was given, to match the ops' host arrays
    std::vector<std::shared_ptr<void>> holds;
    std::shared_ptr<void> attentionWorkspace;
    int64_t attentionWorkspaceFloats = 0;
    Tensor logits;
    uint64_t lastUse = 0;
    size_t inputInts() const { return 3 * (size_t)n + (size_t)tableInts; }
    ~StepGraph() {
      if (exec) cudaGraphExecDestroy(exec);
    }
  };
  static constexpr size_t kMaxGraphs = 32;

  // Copies a step's inputs through a pinned buffer into g.inputs (stream-ordered; the pinned
  // buffer is rewritten only after the previous copy has read it).
  void uploadInputs(StepGraph& g, const StepInputs& in) {
    const size_t ints = g.inputInts();
    if (pinnedInputsCap_ < ints) {
      if (pinnedInputs_) {
        cudaOk(cudaStreamSynchronize(stream_), "inputs sync");
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
    cudaOk(cudaMemcpyAsync(g.inputs.get(), h, sizeof(int32_t) * ints, cudaMemcpyHostToDevice, stream_), "step inputs");
    if (!inputsCopied_) cudaOk(cudaEventCreateWithFlags(&inputsCopied_, cudaEventDisableTiming), "cudaEventCreate");
    cudaOk(cudaEventRecord(inputsCopied_, stream_), "cudaEventRecord");
  }

  // Device memory for an op; while a step is recorded, the recording keeps it.
  std::shared_ptr<void> block(size_t bytes) {
    std::shared_ptr<void> b = blocks_.get(bytes);
    if (recording_) recording_->holds.push_back(b);
    return b;
  }

  // While recording, a staged array must be one of the step's inputs: the recorded op then
  // reads it from the recording's input buffer, which each replay refills.
  const int32_t* recordedInput(int which, const int32_t* host, int n) {
    const StepGraph& g = *recording_;
    size_t off = 0, len = 0;
    switch (which) {
      case 0: off = 0; len = (size_t)g.n; break;
      case 1: off = (size_t)g.n; len = (size_t)g.n; break;
      case 3: off = 2 * (size_t)g.n; len = (size_t)g.tableInts; break;
      case 4: off = 2 * (size_t)g.n + (size_t)g.tableInts; len = (size_t)g.n; break;
      default: break;
    }
    if (len == 0 || (size_t)n != len || std::memcmp(host, g.hostInputs.data() + off, sizeof(int32_t) * len) != 0)
      throw EngineError("LCKV_CUDA", "a recorded decode step reads a host array that is not one of its inputs");
    return (const int32_t*)g.inputs.get() + off;
  }

  // The hand-written GEMV for small batches and for weights cuBLASLt is not set up for here.
  bool useGemv(int n, const LinearTarget* t, int count) const {
    for (int i = 1; i < count; ++i)
      if (t[i].w->dtype != t[0].w->dtype) return false;
    return count <= cuda::kGemvMaxTargets && (n <= kGemvMaxRows || t[0].w->dtype != DType::BF16);
  }

  // Up to this many rows (decode batches) the GEMV runs, whose result for a row does not depend on
  // the other rows: a sequence decodes the same alone or in a batch. Larger chunks use cuBLASLt.
  static constexpr int kGemvMaxRows = 16;
  static constexpr size_t kWorkspace = 32 << 20;

  void ctx() { cudaSetDevice(device_); }

  // Copies a small host array (token ids, positions) to a device staging buffer, skipping the
  // copy when the buffer already holds the same values (positions repeat across a forward's
  // layers). The copy is stream-ordered after earlier readers of the buffer, and a copy from
  // pageable memory returns once the host data is taken, so no synchronisation is needed.
  const int32_t* stage(int which, const int32_t* host, int n) {
    if (recording_) return recordedInput(which, host, n);
    auto& buf = staging_[which];
    if ((int)buf.cap < n) {
      buf.mem = deviceAlloc(sizeof(int32_t) * (size_t)std::max(n, 256));
      buf.cap = std::max(n, 256);
      buf.shadow.clear();
    }
    if ((int)buf.shadow.size() != n || std::memcmp(buf.shadow.data(), host, sizeof(int32_t) * (size_t)n) != 0) {
      cudaOk(cudaMemcpyAsync(buf.mem.get(), host, sizeof(int32_t) * (size_t)n, cudaMemcpyHostToDevice, stream_), "stage");
      buf.shadow.assign(host, host + n);
    }
    return (const int32_t*)buf.mem.get();
  }

  // The frequencies on the device, uploaded once per host array (a model's config holds its
  // own for the model's life); the host copy kept beside them catches a different array that
  // reuses a freed one's address.
  const float* deviceInvFreq(const std::vector<float>& f) {
    auto it = invFreq_.find(f.data());
    if (it != invFreq_.end() && it->second.host == f) return (const float*)it->second.device.get();
    if (recording_) throw EngineError("LCKV_CUDA", "RoPE frequencies first uploaded inside a recorded step");
    auto mem = deviceAlloc(f.size() * sizeof(float));
    cudaOk(cudaMemcpyAsync(mem.get(), f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice, stream_), "invFreq");
    // (A replaced upload stays allocated: a recorded step may have baked its address in.)
    if (it != invFreq_.end()) retiredInvFreq_.push_back(it->second.device);
    invFreq_[f.data()] = {f, mem};  // the copy above is stream-ordered before any reader
    return (const float*)mem.get();
  }

  void* scratchBf16(size_t count) {
    if (recording_) {
      // No synchronising while recording; and the recording keeps the buffer it bakes in, which
      // a later, larger prefill would otherwise free.
      if (bf16Cap_ < count) return block(count * 2).get();
      recording_->holds.push_back(bf16Scratch_);
      return bf16Scratch_.get();
    }
    if (bf16Cap_ < count) {
      cudaOk(cudaStreamSynchronize(stream_), "scratch sync");
      bf16Scratch_ = deviceAlloc(count * 2);
      bf16Cap_ = count;
    }
    return bf16Scratch_.get();
  }

  // A cuBLASLt matmul set up for one shape: descriptors and the heuristic's algorithm. Setting
  // one up costs tens of microseconds of host time, as much as the GEMM itself at prefill
  // chunk sizes, so plans are kept per shape (a prefill reuses a handful of shapes).
  struct MatmulPlan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    MatmulPlan() = default;
    MatmulPlan(const MatmulPlan&) = delete;
    MatmulPlan& operator=(const MatmulPlan&) = delete;
    ~MatmulPlan() {
      if (a) cublasLtMatrixLayoutDestroy(a);
      if (b) cublasLtMatrixLayoutDestroy(b);
      if (c) cublasLtMatrixLayoutDestroy(c);
      if (op) cublasLtMatmulDescDestroy(op);
    }
  };
  static constexpr size_t kMaxMatmulPlans = 256;  // prompts of many lengths: start over past this

  const MatmulPlan& matmulPlan(int O, int n, int I) {
    const std::array<int, 3> key{O, n, I};
    auto it = matmulPlans_.find(key);
    if (it != matmulPlans_.end()) return *it->second;
    if (matmulPlans_.size() >= kMaxMatmulPlans) matmulPlans_.clear();
    auto plan = std::make_unique<MatmulPlan>();
    cublasOk(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmulDesc");
    const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA));
    cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB));
    cublasOk(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, I, O, I), "layout A");  // W as col-major [I, O]
    cublasOk(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, I, n, I), "layout B");  // X as col-major [I, n]
    cublasOk(cublasLtMatrixLayoutCreate(&plan->c, CUDA_R_32F, O, n, O), "layout C");   // C as col-major [O, n]
    cublasLtMatmulPreference_t pref = nullptr;
    cublasOk(cublasLtMatmulPreferenceCreate(&pref), "preference");
    size_t ws = kWorkspace;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(lt_, plan->op, plan->a, plan->b, plan->c, plan->c, pref, 1, &heur, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (hs != CUBLAS_STATUS_SUCCESS || found == 0)
      throw EngineError("LCKV_CUDA", "cuBLASLt found no algorithm for a bf16 matmul of " + std::to_string(n) + " x " +
                                         std::to_string(I) + " by " + std::to_string(I) + " x " + std::to_string(O));
    plan->algo = heur.algo;
    return *matmulPlans_.emplace(key, std::move(plan)).first->second;
  }

  // C[n, O] (row-major f32) = X[n, I] (bf16) . W[O, I]^T (bf16)
  void matmulBf16(const void* W, const void* X, float* C, int O, int n, int I) {
    nvtxRangePushA("gemm_cublaslt");
    struct Pop { ~Pop() { nvtxRangePop(); } } pop;
    const MatmulPlan& p = matmulPlan(O, n, I);
    const float alpha = 1.0f, beta = 0.0f;
    cublasOk(cublasLtMatmul(lt_, p.op, &alpha, W, p.a, X, p.b, &beta, C, p.c, C, p.c, &p.algo, workspace_.get(), kWorkspace, stream_),
             "cublasLtMatmul");
  }

  struct Staging {
    std::shared_ptr<void> mem;
    size_t cap = 0;
    std::vector<int32_t> shadow;  // what the device buffer holds
  };
  int device_ = 0;
  DType weights_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  std::map<std::array<int, 3>, std::unique_ptr<MatmulPlan>> matmulPlans_;  // by (O, n, I)
  std::shared_ptr<void> workspace_;
  Staging staging_[5];  // token ids, positions, penalised tokens, K/V page tables, row-to-sequence map
  // Chosen token ids: on the device (what replayStepFromSampled reads), their copy on the host,
  // and the event after that copy. Slots 0 and 1 are queueSampleRows()'s, kWaitedSlot is
  // sampleRows()'s, which waits for its copy.
  struct SampledSlot {
    std::shared_ptr<void> device;
    int32_t* pinned = nullptr;
    size_t capacity = 0;
    int rows = 0;  // queued by the last queueSampleRows()
    cudaEvent_t ready = nullptr;
  };
  static constexpr int kWaitedSlot = 2;
  static bool queuedSlot(int slot) { return slot == 0 || slot == 1; }
  SampledSlot sampled_[3];
  // Slot `slot` with room for `rows` ids (its rows and event untouched).
  SampledSlot& sampledSlot(int slot, int rows) {
    SampledSlot& q = sampled_[slot];
    if (q.capacity < (size_t)rows) {
      // A copy still queued into the old buffers must land before they go.
      cudaOk(cudaStreamSynchronize(stream_), "sample slot sync");
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
  const bool deviceSampling_ = [] {
    const char* e = std::getenv("LCKV_DEVICE_SAMPLING");
    return e == nullptr || std::string(e) != "0";
  }();
  struct Frequencies {
    std::vector<float> host;
    std::shared_ptr<void> device;
  };
  std::map<const float*, Frequencies> invFreq_;
  std::vector<std::shared_ptr<void>> retiredInvFreq_;
  std::shared_ptr<void> bf16Scratch_;
  BlockCache blocks_;
  OpProfiler profiler_;
  const bool graphsAsked_;
  const bool graphsEnabled_ = [this] {
    const char* e = std::getenv("LCKV_CUDA_GRAPHS");
    return graphsAsked_ && (e == nullptr || std::string(e) != "0") && !profiler_.enabled();
  }();
  std::map<uint64_t, std::unique_ptr<StepGraph>> graphs_;
  std::set<uint64_t> unrecordable_;  // keys whose recording failed: they run unrecorded
  std::unique_ptr<StepGraph> recording_;
  uint64_t recordingKey_ = 0, useClock_ = 0;
  std::atomic<int64_t> replays_{0}, graphCount_{0};
  int32_t* pinnedInputs_ = nullptr;
  size_t pinnedInputsCap_ = 0;
  cudaEvent_t inputsCopied_ = nullptr;
  size_t bf16Cap_ = 0;
};

}  // namespace

std::unique_ptr<Backend> createCudaBackend(int device, DType weights, bool graphs) {
  return std::make_unique<CudaBackend>(device, weights, graphs);
}

std::string cudaDeviceProblem() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA driver or device: ") + cudaGetErrorString(e);
  }
  if (count == 0) return "no CUDA device found";
  return "";
}

}  // namespace lckv
