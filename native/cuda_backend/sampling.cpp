// The CUDA backend's token choice (CudaBackend::sample and friends): greedy and sampled choices
// on the device (cuda/sampling.cu), the run-ahead slots they land in, and the host reference
// for what the device does not do.
#include <algorithm>
#include <cstring>

#include "../engine/errors.h"
#include "cuda_backend.h"
#include "cuda_check.h"

namespace lckv {

// Token choice on the device (greedy, or sampling with temperature > 0): only the chosen ids
// cross to the host. LCKV_DEVICE_SAMPLING=0 makes the host reference sample instead (for
// bisecting a disagreement between the two). Rows that ask for what only the host reference
// does (presence/frequency penalties, logit bias, log-probabilities: needsHostSampling) take
// the host path too: the row is copied to the host and sampleToken() runs there.
int32_t CudaBackend::sample(const Tensor& logitsRow, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                            uint64_t position, TokenLogprobs* logprobs) {
  if (needsHostSampling(p) || (p.temperature > 0.0f && !deviceSampling_))
    return Backend::sample(logitsRow, vocab, p, history, position, logprobs);
  int32_t token = 0;
  sampleRows(logitsRow, 1, vocab, &p, &history, &position, &token);
  return token;
}

// Every row's choice is queued before one copy and one synchronisation; rows that are all
// plain greedy (no penalty) take one launch, a block per row.
void CudaBackend::sampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                             const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* out,
                             TokenLogprobs* logprobs) {
  for (int r = 0; r < rows; ++r)
    if (needsHostSampling(params[r]) || (params[r].temperature > 0.0f && !deviceSampling_))
      return Backend::sampleRows(logits, rows, vocab, params, histories, positions, out, logprobs);
  ctx();
  Timed timed(*this, "sample");
  // Its own slot: the two run-ahead slots may hold a queued step's tokens.
  SampledSlot& q = sampled_.withRoom(SamplingSlots::kWaitedSlot, rows, stream_);
  queueChoices(logits, rows, vocab, params, histories, positions, (int32_t*)q.device.get());
  cudaOk(cudaMemcpyAsync(q.pinned, q.device.get(), sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost, stream_), "token copy");
  cudaOk(cudaStreamSynchronize(stream_), "sample sync");
  std::memcpy(out, q.pinned, sizeof(int32_t) * (size_t)rows);
}

bool CudaBackend::canQueueSampling(const SamplingParams* params, int rows) const {
  for (int r = 0; r < rows; ++r)
    if (params[r].repetitionPenalty != 1.0f || needsHostSampling(params[r]) || (params[r].temperature > 0.0f && !deviceSampling_))
      return false;
  return steps_.enabled();
}

void CudaBackend::queueSampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                                  const uint64_t* positions, int slot) {
  if (!SamplingSlots::queuedSlot(slot)) throw EngineError(kErrCuda, "queueSampleRows: slot must be 0 or 1");
  ctx();
  Timed timed(*this, "sample");
  SampledSlot& q = sampled_.withRoom(slot, rows, stream_);
  if (!q.ready) cudaOk(cudaEventCreateWithFlags(&q.ready, cudaEventDisableTiming), "cudaEventCreate");
  q.rows = 0;
  queueChoices(logits, rows, vocab, params, nullptr, positions, (int32_t*)q.device.get());
  cudaOk(cudaMemcpyAsync(q.pinned, q.device.get(), sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost, stream_), "token copy");
  cudaOk(cudaEventRecord(q.ready, stream_), "cudaEventRecord");
  q.rows = rows;
}

void CudaBackend::takeSampled(int slot, int rows, int32_t* out) {
  ctx();
  if (!SamplingSlots::queuedSlot(slot)) throw EngineError(kErrCuda, "takeSampled: slot must be 0 or 1");
  SampledSlot& q = sampled_[slot];
  if (!q.ready || q.rows != rows) throw EngineError(kErrCuda, "takeSampled: these rows were not queued into this slot");
  cudaOk(cudaEventSynchronize(q.ready), "sample sync");
  std::memcpy(out, q.pinned, sizeof(int32_t) * (size_t)rows);
}

void CudaBackend::queueChoices(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
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
    const int32_t* dPen = distinct.empty() ? nullptr : stage(Staging::PenalisedTokens, distinct.data(), (int)distinct.size());
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

}  // namespace lckv
