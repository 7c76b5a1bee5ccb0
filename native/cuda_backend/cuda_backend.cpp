// The CUDA backend: the Backend interface over the kernels in cuda/ and cuBLASLt.
// Activations and the KV cache are f32 on the device; weights are bf16 (default), f16 or f32.
// Small batches (n <= 16 rows) take the hand-written GEMV; larger ones take cuBLASLt (bf16
// inputs, f32 accumulation and output). Decode steps are recorded as CUDA graphs and replayed
// (LCKV_CUDA_GRAPHS=0 turns that off; LCKV_PROFILE=1 does too, to time each op).
// This file holds the ops; the class is in cuda_backend.h, the parts it owns in files of their
// own (device_memory, cublaslt_plans, sampling_slots, step_graphs, profiler); token choice is in
// sampling.cpp.
#include "cuda_backend.h"

#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstring>

#include "../engine/errors.h"
#include "../engine/weights.h"
#include "cuda_check.h"

namespace lckv {

namespace {

int weightType(DType t) { return t == DType::F32 ? 0 : t == DType::BF16 ? 1 : 2; }

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

}  // namespace

CudaBackend::CudaBackend(int device, DType weights, bool graphs)
    : weights_(weights), steps_(graphs, profiler_.enabled()) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw EngineError(kErrDeviceUnavailable, "no usable CUDA device (driver missing or no GPU)");
  }
  if (device < 0 || device >= count) throw EngineError(kErrInvalidArgument, "CUDA device index out of range");
  device_ = device;
  cudaOk(cudaSetDevice(device_), "cudaSetDevice");
  cudaOk(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  cublasLt_.open();
  // Programmatic dependent launch needs sm_90 and kernels built for it; LCKV_PDL=0 turns it
  // off (to measure it, or to rule it out). One setting for the process (see kernels.h).
  const char* pdl = std::getenv("LCKV_PDL");
  lckv::cuda::enableProgrammaticLaunch(lckv::cuda::programmaticLaunchSupported() && (pdl == nullptr || std::string(pdl) != "0"));
}

CudaBackend::~CudaBackend() {
  profiler_.report();
  abortStepCapture(false);
  cudaStreamSynchronize(stream_);  // a step run ahead may still be copying into pinned buffers
  steps_.release();
  sampled_.release();
  cublasLt_.close();
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaBackend::pushRange(const char* name) { nvtxRangePushA(name); }
void CudaBackend::memoryInfo(size_t& freeBytes, size_t& totalBytes) {
  ctx();
  cudaOk(cudaMemGetInfo(&freeBytes, &totalBytes), "cudaMemGetInfo");
}
void CudaBackend::popRange() { nvtxRangePop(); }

Tensor CudaBackend::alloc(int64_t rows, int64_t cols) {
  ctx();
  Tensor t;
  t.storage = block(sizeof(float) * (size_t)(rows * cols));
  t.data = t.storage.get();
  t.rows = rows;
  t.cols = cols;
  return t;
}

Tensor CudaBackend::upload(const float* host, int64_t rows, int64_t cols) {
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

void CudaBackend::download(const Tensor& t, int64_t rowStart, int64_t rowCount, float* host) {
  ctx();
  Timed timed(*this, "download_logits");
  const size_t count = (size_t)(rowCount * t.cols);
  if (t.dtype == DType::BF16) {
    std::vector<uint16_t> raw(count);
    cudaOk(cudaMemcpyAsync(raw.data(), (const uint16_t*)t.data + rowStart * t.cols, 2 * count, cudaMemcpyDeviceToHost, stream_),
           "download");
    cudaOk(cudaStreamSynchronize(stream_), "download sync");
    for (size_t i = 0; i < count; ++i) host[i] = bf16ToF32(raw[i]);
    return;
  }
  if (t.dtype != DType::F32) throw EngineError(kErrInvalidArgument, "download: an activation is f32 or bf16");
  cudaOk(cudaMemcpyAsync(host, (const float*)t.data + rowStart * t.cols, sizeof(float) * count, cudaMemcpyDeviceToHost, stream_),
         "download");
  cudaOk(cudaStreamSynchronize(stream_), "download sync");
}

void CudaBackend::writeRows(Tensor& t, int64_t rowStart, int64_t rowCount, const float* host) {
  ctx();
  const size_t count = (size_t)(rowCount * t.cols);
  if (t.dtype == DType::BF16) {
    std::vector<uint16_t> raw(count);
    for (size_t i = 0; i < count; ++i) raw[i] = f32ToBf16(host[i]);
    cudaOk(cudaMemcpyAsync((uint16_t*)t.data + rowStart * t.cols, raw.data(), 2 * count, cudaMemcpyHostToDevice, stream_),
           "writeRows");
    cudaOk(cudaStreamSynchronize(stream_), "writeRows sync");
    return;
  }
  if (t.dtype != DType::F32) throw EngineError(kErrInvalidArgument, "writeRows: an activation is f32 or bf16");
  cudaOk(cudaMemcpyAsync((float*)t.data + rowStart * t.cols, host, sizeof(float) * count, cudaMemcpyHostToDevice, stream_),
         "writeRows");
  cudaOk(cudaStreamSynchronize(stream_), "writeRows sync");
}
void CudaBackend::poison(Tensor& t) {
  ctx();
  // All-ones bits are NaN in f32, bf16 and f16 alike; the op checks poison bf16 outputs too.
  cudaOk(cudaMemsetAsync(t.data, 0xff, dtypeSize(t.dtype) * (size_t)t.numel(), stream_), "poison");
}
void CudaBackend::embed(const int32_t* tokens, const int32_t* positions, int n, const Tensor& table, const Tensor* posTable,
                        Tensor& out) {
  ctx();
  Timed timed(*this, "embed");
  const int32_t* dTok = stage(Staging::Tokens, tokens, n);
  const int32_t* dPos = stage(Staging::Positions, positions, n);
  cuda::launchEmbed(dTok, dPos, n, table.data, posTable ? posTable->data : nullptr, weightType(table.dtype),
                    (int)table.cols, f32(out, "embed", "out"), stream_);
}

void CudaBackend::norm(NormKind kind, const Tensor& x, int n, const Tensor& weight, const Tensor* bias, float eps,
                       Tensor& out) {
  ctx();
  Timed timed(*this, "norm");
  cuda::launchNorm(kind == NormKind::Rms, f32(x, "norm", "x"), n, (int)x.cols, weight.data, bias ? bias->data : nullptr,
                   weightType(weight.dtype), eps, out.data, out.dtype == DType::BF16, stream_);
}

void CudaBackend::addNorm(NormKind kind, Tensor& h, const Tensor& delta, int n, const Tensor& weight, const Tensor* bias,
                          float eps, Tensor& out) {
  ctx();
  Timed timed(*this, "add_norm");
  cuda::launchAddNorm(kind == NormKind::Rms, f32(h, "addNorm", "h"), f32(delta, "addNorm", "delta"), n, (int)h.cols, weight.data,
                      bias ? bias->data : nullptr, weightType(weight.dtype), eps, out.data, out.dtype == DType::BF16, stream_);
}

void CudaBackend::linear(const Tensor& x, int n, const Tensor& w, const Tensor* bias, Tensor& out) {
  const LinearTarget t{&w, bias, &out};
  linears(x, n, &t, 1);
}

void CudaBackend::linears(const Tensor& x, int n, const LinearTarget* targets, int count) {
  if (count > 1) {
    bool sameType = true;
    for (int i = 1; i < count; ++i) sameType = sameType && targets[i].w->dtype == targets[0].w->dtype;
    if (!sameType || count > cuda::kGemvMaxTargets) {  // one launch reads one weight type
      for (int i = 0; i < count; ++i) linears(x, n, &targets[i], 1);
      return;
    }
  }
  ctx();
  for (int i = 0; i < count; ++i) {
    if (x.cols != targets[i].w->cols || targets[i].out->cols != targets[i].w->rows)
      throw EngineError(kErrInvalidArgument, "linear: shape mismatch");
    f32(*targets[i].out, "linear", "out");  // both paths write f32 products
  }
  const int I = (int)x.cols;
  if (useGemv(n, targets, count)) {
    if (x.dtype != DType::F32)
      throw EngineError(kErrInvalidArgument, "linear: a bf16 input needs the cuBLASLt path (linearInputType)");
    Timed timed(*this, "gemv");
    cuda::GemvTarget g[cuda::kGemvMaxTargets];
    for (int i = 0; i < count; ++i)
      g[i] = {targets[i].w->data, targets[i].bias ? targets[i].bias->data : nullptr, (int)targets[i].w->rows,
              (float*)targets[i].out->data};  // f32, checked above
    cuda::launchGemv((const float*)x.data, n, I, g, count, weightType(targets[0].w->dtype), stream_);
    return;
  }
  // cuBLASLt: out^T[O, n] = W[O, I] . x^T[I, n] in column-major terms; x converted once.
  Timed timed(*this, "gemm_cublaslt");
  std::shared_ptr<void> xHold, allHold;
  const void* xb = bf16Input(x, n, xHold);
  // Weights packed back to back (packWeights) run as one product, whose output is then split
  // into the targets: at decode batches a small GEMM costs about as much as a large one.
  bool packed = count > 1;
  int64_t rows = targets[0].w->rows;
  for (int i = 1; i < count && packed; ++i) {
    const Tensor& prev = *targets[i - 1].w;
    packed = targets[i].w->data == (const char*)prev.data + prev.numel() * dtypeSize(prev.dtype);
    rows += targets[i].w->rows;
  }
  if (packed) {
    allHold = scratchF32((size_t)n * rows);
    float* all = (float*)allHold.get();
    cublasLt_.matmulBf16(targets[0].w->data, xb, all, (int)rows, n, I, stream_);
    cuda::SplitColumnsTarget parts[cuda::kGemvMaxTargets];
    for (int i = 0; i < count; ++i) parts[i] = {(float*)targets[i].out->data, (int)targets[i].w->rows};
    cuda::launchSplitColumns(all, n, (int)rows, parts, count, stream_);
  }
  for (int i = 0; i < count; ++i) {
    const Tensor& w = *targets[i].w;
    if (!packed) cublasLt_.matmulBf16(w.data, xb, (float*)targets[i].out->data, (int)w.rows, n, I, stream_);
    if (targets[i].bias)
      cuda::launchAddBias((float*)targets[i].out->data, n, (int)w.rows, targets[i].bias->data,
                          weightType(targets[i].bias->dtype), stream_);
  }
}

void CudaBackend::linearSwiglu(const Tensor& x, int n, const Tensor& gate, const Tensor* gateB, const Tensor& up,
                               const Tensor* upB, Tensor& out) {
  ctx();
  if (x.cols != gate.cols || x.cols != up.cols || gate.rows != up.rows || out.cols != gate.rows)
    throw EngineError(kErrInvalidArgument, "linearSwiglu: shape mismatch");
  if (gate.dtype != up.dtype) throw EngineError(kErrInvalidArgument, "linearSwiglu: gate and up weights of different dtypes");
  if (gateB && upB && gateB->dtype != upB->dtype) throw EngineError(kErrInvalidArgument, "linearSwiglu: bias dtypes differ");
  const int I = (int)gate.rows;
  const LinearTarget t[2] = {{&gate, gateB, &out}, {&up, upB, nullptr}};  // useGemv reads the weights only
  if (useGemv(n, t, 2)) {
    if (x.dtype != DType::F32 || out.dtype != DType::F32)
      throw EngineError(kErrInvalidArgument, "linearSwiglu: a bf16 input or output needs the cuBLASLt path (linearInputType)");
    Timed timed(*this, "gemv_swiglu");
    cuda::launchGemvSwiglu((const float*)x.data, n, (int)x.cols, {gate.data, gateB ? gateB->data : nullptr, I, (float*)out.data},
                           {up.data, upB ? upB->data : nullptr, I, nullptr}, weightType(gate.dtype), stream_);
    return;
  }
  // cuBLASLt: gate and up packed back to back (packWeights) run as one product of height 2I, whose
  // rows hold the gate half then the up half; apart, as two products. One pass then adds the
  // biases, applies the activation and writes out in its dtype (bf16 for the down product).
  Timed timed(*this, "gemm_swiglu");
  std::shared_ptr<void> xHold;
  const void* xb = bf16Input(x, n, xHold);
  const std::shared_ptr<void> productsHold = scratchF32((size_t)n * 2 * I);
  float* products = (float*)productsHold.get();
  const bool packed = up.data == (const char*)gate.data + gate.numel() * dtypeSize(gate.dtype);
  if (packed) {
    cublasLt_.matmulBf16(gate.data, xb, products, 2 * I, n, (int)x.cols, stream_);
  } else {
    cublasLt_.matmulBf16(gate.data, xb, products, I, n, (int)x.cols, stream_);
    cublasLt_.matmulBf16(up.data, xb, products + (size_t)n * I, I, n, (int)x.cols, stream_);
  }
  const Tensor* anyBias = gateB ? gateB : upB;
  cuda::launchSwigluRows(products, packed ? products + I : products + (size_t)n * I, packed ? 2 * I : I, n, I,
                         gateB ? gateB->data : nullptr, upB ? upB->data : nullptr,
                         weightType(anyBias ? anyBias->dtype : DType::F32), out.data, out.dtype == DType::BF16, stream_);
}

void CudaBackend::addInPlace(Tensor& x, const Tensor& y, int n) {
  ctx();
  Timed timed(*this, "residual_add");
  cuda::launchAdd(f32(x, "addInPlace", "x"), f32(y, "addInPlace", "y"), (int64_t)n * x.cols, stream_);
}

void CudaBackend::uploadRopeFrequencies(const std::vector<float>& invFreq) {
  ctx();
  deviceInvFreq(invFreq);
}

void CudaBackend::rope(Tensor& x, int n, int heads, int headDim, const int32_t* positions, const std::vector<float>& invFreq,
                       float attentionScale) {
  ctx();
  Timed timed(*this, "rope");
  const int32_t* dPos = stage(Staging::Positions, positions, n);
  cuda::launchRope(f32(x, "rope", "x"), n, heads, headDim, dPos, deviceInvFreq(invFreq), attentionScale, stream_);
}

void CudaBackend::ropeKvWrite(Tensor& q, int numHeads, Tensor* k, const Tensor* v, int numKvHeads, int headDim, int n,
                              const int32_t* positions, const std::vector<float>& invFreq, float attentionScale,
                              const KvView* kv, int slot) {
  ctx();
  Timed timed(*this, "rope_kv_write");
  cuda::PagedKv p{};
  if (k) p = paged(*kv, slot, n, positions);
  const int32_t* dPos = stage(Staging::Positions, positions, n);
  cuda::launchRopeKvWrite(f32(q, "ropeKvWrite", "q"), numHeads, k ? f32(*k, "ropeKvWrite", "k") : nullptr,
                          v ? f32(*v, "ropeKvWrite", "v") : nullptr,
                          numKvHeads, headDim, n, dPos, deviceInvFreq(invFreq), attentionScale, k ? &p : nullptr, stream_);
}

// ---- decode-step graphs (Backend::replayStep and friends; the recordings are step_graphs.h's) ----

bool CudaBackend::replayStepFromSampled(uint64_t key, const StepInputs& in, int slot, Tensor& logits) {
  if (!SamplingSlots::queuedSlot(slot) || sampled_[slot].rows != in.n) return false;
  return replay(key, in, slot, logits);
}

bool CudaBackend::replay(uint64_t key, const StepInputs& in, int slot, Tensor& logits) {
  StepGraph* g = steps_.find(key, in);
  if (!g) return false;
  ctx();
  steps_.replay(*g, in, slot >= 0 ? &sampled_[slot] : nullptr, stream_);
  logits = g->logits;
  return true;
}

void CudaBackend::finishQueued() {
  ctx();
  cudaOk(cudaStreamSynchronize(stream_), "finishQueued");
}

bool CudaBackend::beginStepCapture(uint64_t key, const StepInputs& in) {
  if (!steps_.shouldRecord(key)) return false;
  ctx();
  steps_.begin(key, in, stream_);
  return true;
}

// log2 of a power of two.
static int log2Exact(int x) {
  int shift = 0;
  while ((1 << shift) < x) ++shift;
  return shift;
}

cuda::PagedKv CudaBackend::paged(const KvView& kv, int slot, int n, const int32_t* positions, const AttentionSpec* reads) {
  for (int r = 0; r < n; ++r) kv.pageAt(kv.rowSeq[r], positions[r]);
  if (slot < 0 || slot >= kv.layout.slots) throw EngineError(kErrInvalidArgument, "K/V slot out of range");
  const bool channelKeys = kvTypeChannelKeys(kv.layout.type);
  if (channelKeys) {
    for (int r = 0; r < n; ++r) {
      if (reads) kv.queryResidual(kv.rowSeq[r], reads->strict ? positions[r] - 1 : positions[r]);
      else kv.residualOf(kv.rowSeq[r], positions[r]);
    }
    if (!kv.residuals) throw EngineError(kErrInvalidArgument, "K/V access without the sequences' residuals");
  }
  const int shift = log2Exact(kv.layout.pageTokens);
  cuda::PagedKv p;
  p.pool = (uint8_t*)kv.pool->data;
  p.tables = stage(Staging::PageTables, kv.tables, kv.numSeqs * kv.stride);
  p.rowSeq = stage(Staging::RowToSequence, kv.rowSeq, n);
  p.stride = kv.stride;
  p.pageShift = shift;
  p.pageBytes = kv.layout.pageBytes();
  p.slotOffset = (int64_t)slot * kv.layout.slotBytes();
  p.rowBytes = (int)kv.layout.rowBytes();
  p.kvDim = kv.layout.kvDim;
  p.kvHeads = kv.layout.kvHeads;
  p.type = (int)kv.layout.type;
  p.residuals = channelKeys ? stage(Staging::Residuals, kv.residuals, kv.numSeqs * kv.layout.residualParts()) : nullptr;
  p.residualShift = channelKeys ? log2Exact(kv.layout.residualTokensPerPart()) : 0;
  return p;
}

void CudaBackend::kvWrite(const KvView& kv, int slot, const Tensor& k, const Tensor& v, int n, const int32_t* positions) {
  ctx();
  Timed timed(*this, "kv_write");
  const cuda::PagedKv p = paged(kv, slot, n, positions);
  const int32_t* dPos = stage(Staging::Positions, positions, n);
  cuda::launchKvWrite(f32(k, "kvWrite", "k"), f32(v, "kvWrite", "v"), n, dPos, p, stream_);
}

void CudaBackend::kvZero(const KvView& kv, int seq, int slot, int start, int n) {
  ctx();
  Timed timed(*this, "kv_zero");
  uint8_t* pool = (uint8_t*)kv.pool->data;
  const KvLayout& L = kv.layout;
  if (slot < 0 || slot >= L.slots) throw EngineError(kErrInvalidArgument, "K/V slot out of range");
  // The byte ranges to zero (offset, length), all zeroed by one launch: a memset per page
  // costs a launch each (256 for a 2048-token prompt), which the GPU waits for.
  std::vector<int64_t> runs;
  if (kvTypeChannelKeys(L.type)) {
    // The rows are zeroed in the residual, which must hold their page (checked for every row
    // before any is zeroed); its bf16 zeros read back as zeros.
    std::vector<const int32_t*> parts((size_t)n);
    for (int p = start; p < start + n; ++p) {
      kv.pageAt(seq, p);
      parts[(size_t)(p - start)] = kv.residualOf(seq, p);
    }
    for (int p = start; p < start + n; ++p)
      for (int v = 0; v < 2; ++v)
        runs.insert(runs.end(), {(int64_t)L.residualOffset(parts[(size_t)(p - start)], slot, v, p % L.pageTokens), (int64_t)L.kvDim * 2});
  } else {
    // Zero codes and zero scales read back as zeros in every type; a run's rows and scale words
    // are contiguous within its page.
    forEachPageRun(kv, seq, start, n, [&](int32_t page, int p, int len) {
      const int off = p % L.pageTokens;
      for (int v = 0; v < 2; ++v) runs.insert(runs.end(), {(int64_t)L.codeOffset(page, slot, v, off), (int64_t)len * L.rowBytes()});
      if (kvTypeScaled(L.type)) runs.insert(runs.end(), {(int64_t)L.scaleOffset(page, slot, off, 0), (int64_t)len * L.kvHeads * 4});
    });
  }
  if (runs.empty()) return;
  std::shared_ptr<void> dRuns = blocks_.get(sizeof(int64_t) * runs.size());
  cudaOk(cudaMemcpyAsync(dRuns.get(), runs.data(), sizeof(int64_t) * runs.size(), cudaMemcpyHostToDevice, stream_), "kvZero");
  cuda::launchZeroRanges(pool, static_cast<const int64_t*>(dRuns.get()), (int)(runs.size() / 2), stream_);
}

void CudaBackend::kvRead(const KvView& kv, int seq, int slot, int start, int n, std::vector<float>& host) {
  ctx();
  Timed timed(*this, "kv_read");
  const uint8_t* pool = (const uint8_t*)kv.pool->data;
  const KvLayout& L = kv.layout;
  const size_t d = (size_t)L.kvDim;
  if (slot < 0 || slot >= L.slots) throw EngineError(kErrInvalidArgument, "K/V slot out of range");
  host.resize(2 * (size_t)n * d);
  // The slot's bytes of each page the range touches, then decoded here as the CPU backend does.
  // A channel-key type's page that the residual holds is read from the residual (kvRead's
  // rule): each part's slot block goes to the host at the place it would have in a pool of the
  // residual's parts alone (parts 0 .. R - 1), where kvDecodeResidualRow reads it.
  const int R = L.residualParts();
  std::vector<int32_t> localParts((size_t)R);
  for (int j = 0; j < R; ++j) localParts[(size_t)j] = j;
  const int64_t partSlotBytes = 2 * (int64_t)L.residualTokensPerPart() * L.kvDim * 2;
  struct Run {
    int p, len;
    size_t at;
    const int32_t* residual;  // the residual's parts when the run's page is read from it
  };
  std::vector<Run> runs;
  size_t bytes = 0;
  forEachPageRun(kv, seq, start, n, [&](int32_t, int p, int len) {
    const int32_t* residual = kv.inResidual(seq, p) ? kv.residualOf(seq, p) : nullptr;
    runs.push_back({p, len, bytes, residual});
    bytes += residual ? (size_t)R * (size_t)L.pageBytes() : (size_t)L.slotBytes();
  });
  // The blocks are gathered on the device and cross to the host in one copy: a copy to pageable
  // memory returns only once it is done, so a copy per page would wait once per page (128 times
  // for a 2048-token range).
  std::shared_ptr<void> gathered = blocks_.get(std::max<size_t>(bytes, 16));
  uint8_t* dst = static_cast<uint8_t*>(gathered.get());
  size_t i = 0;
  forEachPageRun(kv, seq, start, n, [&](int32_t page, int, int) {
    const Run& r = runs[i++];
    if (r.residual) {
      for (int j = 0; j < R; ++j)
        cudaOk(cudaMemcpyAsync(dst + r.at + (size_t)L.codeOffset(j, slot, 0, 0), pool + L.codeOffset(r.residual[j], slot, 0, 0),
                               (size_t)partSlotBytes, cudaMemcpyDeviceToDevice, stream_),
               "kvRead");
      return;
    }
    cudaOk(cudaMemcpyAsync(dst + r.at, pool + L.codeOffset(page, slot, 0, 0), (size_t)L.slotBytes(), cudaMemcpyDeviceToDevice,
                           stream_),
           "kvRead");
  });
  std::vector<uint8_t> blocks(bytes);
  cudaOk(cudaMemcpyAsync(blocks.data(), dst, bytes, cudaMemcpyDeviceToHost, stream_), "kvRead");
  cudaOk(cudaStreamSynchronize(stream_), "kvRead sync");
  for (const Run& r : runs)
    for (int v = 0; v < 2; ++v)
      for (int t = 0; t < r.len; ++t) {
        float* out = host.data() + ((size_t)v * n + (size_t)(r.p + t - start)) * d;
        const int off = (r.p + t) % L.pageTokens;
        if (r.residual) kvDecodeResidualRow(L, blocks.data() + r.at, localParts.data(), slot, v, off, out);
        else kvDecodeRow(L, blocks.data() + r.at, v, off, out);
      }
}

Backend::KvMotion CudaBackend::kvMotion(const KvView& kv, int seq, int slot, int start, int n, std::shared_ptr<void>& snapshot) {
  ctx();
  Timed timed(*this, "kv_motion");
  const KvLayout& L = kv.layout;
  KvMotion m;
  const size_t values = 2 * (size_t)std::max(n, 0) * (size_t)L.kvDim;
  // The snapshot: its value count, then on the device [2n, kvDim] floats and the kernel's result.
  struct Snapshot {
    size_t values;
    std::shared_ptr<void> device;
  };
  if (snapshot && static_cast<Snapshot*>(snapshot.get())->values != values)
    throw EngineError(kErrInvalidArgument, "kvMotion: the snapshot holds another number of values than this range");
  if (n <= 0) {
    m.same = snapshot != nullptr;
    if (!snapshot) snapshot = std::make_shared<Snapshot>(Snapshot{values, nullptr});
    return m;
  }
  if (slot < 0 || slot >= L.slots) throw EngineError(kErrInvalidArgument, "K/V slot out of range");
  // Token t's slot block in the pool (its page's codes for `slot`), or -1 where the residual
  // holds its page, which the kernel reads through the residual's parts (kvRead's rule).
  std::vector<int64_t> rowBlock((size_t)n);
  const int32_t* parts = nullptr;
  forEachPageRun(kv, seq, start, n, [&](int32_t page, int p, int len) {
    const bool inResidual = kv.inResidual(seq, p);
    if (inResidual) parts = kv.residualOf(seq, p);
    for (int t = 0; t < len; ++t) rowBlock[(size_t)(p + t - start)] = inResidual ? -1 : L.codeOffset(page, slot, 0, 0);
  });
  const size_t R = parts ? (size_t)L.residualParts() : 0;
  std::shared_ptr<void> tables = blocks_.get(sizeof(int64_t) * (size_t)n + sizeof(int32_t) * R + 16);
  int64_t* dRowBlock = static_cast<int64_t*>(tables.get());
  int32_t* dParts = reinterpret_cast<int32_t*>(dRowBlock + n);
  cudaOk(cudaMemcpyAsync(dRowBlock, rowBlock.data(), sizeof(int64_t) * (size_t)n, cudaMemcpyHostToDevice, stream_), "kv_motion");
  if (R > 0) cudaOk(cudaMemcpyAsync(dParts, parts, sizeof(int32_t) * R, cudaMemcpyHostToDevice, stream_), "kv_motion");
  const bool first = !snapshot;
  // 8 n kvDim bytes of floats: the result's 64-bit words after them are aligned.
  std::shared_ptr<void> device =
      first ? blocks_.get(sizeof(float) * values + sizeof(cuda::KvMotionResult)) : static_cast<Snapshot*>(snapshot.get())->device;
  float* snap = static_cast<float*>(device.get());
  auto* result = reinterpret_cast<cuda::KvMotionResult*>(snap + values);
  // A first call decodes straight into the snapshot; later ones decode beside it and compare.
  std::shared_ptr<void> scratch = first ? device : blocks_.get(sizeof(float) * values);
  cuda::launchKvMotion(L, slot, static_cast<const uint8_t*>(kv.pool->data), dRowBlock, dParts, start, n,
                       static_cast<float*>(scratch.get()), snap, first, result, stream_);
  if (first) {
    snapshot = std::make_shared<Snapshot>(Snapshot{values, device});  // only once it holds the values
    return m;
  }
  cuda::KvMotionResult host{};
  cudaOk(cudaMemcpyAsync(&host, result, sizeof(host), cudaMemcpyDeviceToHost, stream_), "kv_motion");
  cudaOk(cudaStreamSynchronize(stream_), "kv_motion sync");
  double moved = 0, largest = 0;
  std::memcpy(&moved, &host.movedBits, sizeof(double));
  std::memcpy(&largest, &host.largestBits, sizeof(double));
  m.same = host.differ == 0;
  m.moved = moved;
  m.largest = largest;
  return m;
}

std::string CudaBackend::kvPageProblem(KvType kvType, int pageTokens) const {
  return cuda::kvPageProblem((int)kvType, pageTokens);
}

std::string CudaBackend::attentionProblem(const AttentionSpec& spec, KvType kvType) const {
  return cuda::attentionProblem(spec.numHeads, spec.numKvHeads, spec.headDim, (int)kvType);
}

void CudaBackend::attention(const Tensor& q, int n, const int32_t* positions, const KvView& kv, int slot,
                            const AttentionSpec& sp, Tensor& out) {
  ctx();
  Timed timed(*this, "attention");
  const cuda::PagedKv p = paged(kv, slot, n, positions, &sp);
  const int32_t* dPos = stage(Staging::Positions, positions, n);
  // Each part of the rows takes its own kernel (cuda::attentionParts): a prompt's chunk the
  // prefill kernel, the rows of one per sequence the split-K decode kernel (an int4 cache's rows
  // all one decode part, which its two decode launches need a workspace for).
  const std::vector<cuda::AttentionPart> parts = cuda::attentionParts(kv.rowSeq, n, p.type);
  // A decode part's split-K plan follows the longest visible range of its rows, taken at the
  // end of the furthest query's context bucket (kStepContextBucket positions; at most the
  // window): every step of a bucket gets the same plan, so a replayed recording (Model::
  // decodeBatch keys them by that bucket) and the same step run op by op add the same partial
  // sums in the same order.
  auto maxVisibleOf = [&](const cuda::AttentionPart& part) {
    int maxPos = 0;
    for (int r = part.first; r < part.first + part.rows; ++r) maxPos = std::max(maxPos, positions[r]);
    const int visible = (maxPos / kStepContextBucket + 1) * kStepContextBucket;
    return sp.window > 0 ? std::min(visible, sp.window) : visible;
  };
  int64_t wsFloats = 0;  // one workspace for the decode parts, which run one after another
  for (const cuda::AttentionPart& part : parts)
    if (!part.prefill)
      wsFloats = std::max(wsFloats, cuda::attentionWorkspaceFloats(part.rows, sp.numHeads, sp.numKvHeads, sp.headDim,
                                                                   maxVisibleOf(part), p.type));
  std::shared_ptr<void> ws;
  StepGraph* recording = steps_.recording();
  if (wsFloats > 0 && recording) {
    // One split-K workspace per recording, shared by its layers (they run one after another).
    if (recording->attentionWorkspaceFloats < wsFloats) {
      recording->attentionWorkspace = block((size_t)wsFloats * sizeof(float));
      recording->attentionWorkspaceFloats = wsFloats;
    }
    ws = recording->attentionWorkspace;
  } else if (wsFloats > 0) {
    ws = blocks_.get((size_t)wsFloats * sizeof(float));
  }
  const float* dq = f32(q, "attention", "q");
  const bool outBf16 = out.dtype == DType::BF16;
  const int64_t rowValues = (int64_t)sp.numHeads * sp.headDim;  // q's and out's row
  for (const cuda::AttentionPart& part : parts) {
    cuda::PagedKv partKv = p;
    partKv.rowSeq += part.first;
    cuda::launchAttention(dq + part.first * rowValues, part.rows, dPos + part.first, maxVisibleOf(part), partKv,
                          sp.numHeads, sp.numKvHeads, sp.headDim, sp.strict, sp.window, sp.scale, part.prefill,
                          (char*)out.data + part.first * rowValues * (int64_t)dtypeSize(out.dtype), outBf16,
                          (float*)ws.get(), wsFloats, stream_);
  }
}

void CudaBackend::swiglu(const Tensor& gate, const Tensor& up, int n, Tensor& out) {
  ctx();
  Timed timed(*this, "swiglu");
  cuda::launchSwiglu(f32(gate, "swiglu", "gate"), f32(up, "swiglu", "up"), (int64_t)n * gate.cols, f32(out, "swiglu", "out"),
                     stream_);
}

void CudaBackend::geluTanh(Tensor& x, int n) {
  ctx();
  Timed timed(*this, "gelu");
  cuda::launchGeluTanh(f32(x, "geluTanh", "x"), (int64_t)n * x.cols, stream_);
}

void CudaBackend::copyRows(const Tensor& src, int srcRow, Tensor& dst, int dstRow, int n) {
  ctx();
  Timed timed(*this, "copy_rows");
  cudaOk(cudaMemcpyAsync(f32(dst, "copyRows", "dst") + (int64_t)dstRow * dst.cols,
                         f32(src, "copyRows", "src") + (int64_t)srcRow * src.cols,
                         sizeof(float) * (size_t)(n * src.cols), cudaMemcpyDeviceToDevice, stream_),
         "copyRows");
}

std::shared_ptr<void> CudaBackend::block(size_t bytes) {
  std::shared_ptr<void> b = blocks_.get(bytes);
  if (StepGraph* recording = steps_.recording()) recording->holds.push_back(b);
  return b;
}

const int32_t* CudaBackend::stage(Staging which, const int32_t* host, int n) {
  if (const StepGraph* recording = steps_.recording()) return recording->recordedInput(which, host, n);
  return staging_.upload(which, host, n, stream_);
}

std::shared_ptr<void> CudaBackend::scratch(std::shared_ptr<void>& buf, size_t& capBytes, size_t bytes) {
  if (StepGraph* recording = steps_.recording()) {
    // No synchronising while recording; and the recording keeps the buffer it bakes in, which
    // a later, larger prefill would otherwise free.
    if (capBytes < bytes) return block(bytes);
    recording->holds.push_back(buf);
    return buf;
  }
  // Back in the cache when the caller lets go; stream order puts its next use after this op.
  if (bytes > kScratchKeepBytes) return blocks_.get(bytes);
  if (capBytes < bytes) {
    cudaOk(cudaStreamSynchronize(stream_), "scratch sync");
    // The old buffer goes first, so its room counts towards the new one; should the allocation
    // still fail, the scratch is left empty (and regrown by the next call), not half-updated.
    buf.reset();
    capBytes = 0;
    buf = blocks_.uncached(bytes);
    capBytes = bytes;
  }
  return buf;
}

const void* CudaBackend::bf16Input(const Tensor& x, int n, std::shared_ptr<void>& hold) {
  if (x.dtype == DType::BF16) return x.data;
  if (x.dtype != DType::F32) throw EngineError(kErrInvalidArgument, "linear: an input is f32 or bf16");
  hold = scratchBf16((size_t)n * x.cols);
  void* xb = hold.get();
  cuda::launchToBf16((const float*)x.data, (int64_t)n * x.cols, xb, stream_);
  return xb;
}

DType CudaBackend::linearInputType(int n) const {
  // Every matrix of a model is kept in weights_ (uploadWeight), so useGemv decides by n alone.
  return weights_ == DType::BF16 && n > kGemvMaxRows ? DType::BF16 : DType::F32;
}

std::shared_ptr<void> CudaBackend::scratchBf16(size_t count) { return scratch(bf16Scratch_, bf16Cap_, count * 2); }
std::shared_ptr<void> CudaBackend::scratchF32(size_t count) { return scratch(f32Scratch_, f32Cap_, count * sizeof(float)); }

void CudaBackend::packWeights(Tensor* parts, int count) {
  if (count < 2) return;
  const size_t elt = dtypeSize(parts[0].dtype);
  size_t total = 0;
  for (int i = 0; i < count; ++i) {
    if (parts[i].empty() || parts[i].dtype != parts[0].dtype || parts[i].cols != parts[0].cols) return;
    total += (size_t)parts[i].numel() * elt;
  }
  ctx();
  std::shared_ptr<void> packed;
  try {
    packed = deviceAlloc(total);
  } catch (const std::bad_alloc&) {
    return;  // no room for the copy: the parts stay apart, and each runs as its own product
  }
  size_t at = 0;
  for (int i = 0; i < count; ++i) {
    const size_t bytes = (size_t)parts[i].numel() * elt;
    cudaOk(cudaMemcpyAsync((char*)packed.get() + at, parts[i].data, bytes, cudaMemcpyDeviceToDevice, stream_), "pack weights");
    at += bytes;
  }
  cudaOk(cudaStreamSynchronize(stream_), "pack weights");
  at = 0;
  for (int i = 0; i < count; ++i) {
    parts[i].storage = packed;
    parts[i].data = (char*)packed.get() + at;
    at += (size_t)parts[i].numel() * elt;
  }
}

bool CudaBackend::useGemv(int n, const LinearTarget* t, int count) const {
  for (int i = 1; i < count; ++i)
    if (t[i].w->dtype != t[0].w->dtype) return false;
  return count <= cuda::kGemvMaxTargets && (n <= kGemvMaxRows || t[0].w->dtype != DType::BF16);
}

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
