// The CUDA backend's token choice (CudaBackend::sample and friends): greedy and sampled choices
// on the device (cuda/sampling.cu) with the penalties, the logit bias and the
// log-probabilities, the run-ahead slots they land in, and the host reference for what the
// device does not do.
#include <algorithm>
#include <cstring>
#include <map>

#include "../engine/errors.h"
#include "cuda_backend.h"
#include "cuda_check.h"

namespace lckv {

static_assert(cuda::kMaxTopLogprobs == kDeviceTopLogprobs, "the device's top log-probabilities are those needsHostSampling() allows");

namespace {

// Whether a row asks for the presence/frequency penalties, a logit bias or log-probabilities:
// work on the device beyond the plain choice (extra kernels, and its log-probabilities copied).
bool asksExtras(const SamplingParams& p) {
  return p.presencePenalty != 0.0f || p.frequencyPenalty != 0.0f || !p.logitBias.empty() || p.logprobs >= 0;
}

// The presence/frequency penalties and logit bias of one row as cuda::RowExtras takes them: for
// each distinct token in the vocabulary, what to subtract, then what to add. The subtrahend is
// the reference's own expression (sampleToken), so the device's logit is the same float.
// Laid out as one int32 array for a staging buffer: tokens, then the subtrahends' bits, then
// the addends' bits.
std::vector<int32_t> logitAdjustments(const SamplingParams& p, const std::vector<int32_t>* history, int vocab) {
  std::map<int32_t, std::pair<float, float>> adj;  // ordered: the same row stages the same bytes
  if ((p.presencePenalty != 0.0f || p.frequencyPenalty != 0.0f) && history) {
    std::map<int32_t, int> count;
    for (size_t i = (size_t)std::max(0, p.penaltyFrom); i < history->size(); ++i) ++count[(*history)[i]];
    for (const auto& [t, c] : count)
      if (t >= 0 && t < vocab) adj[t].first = p.presencePenalty + p.frequencyPenalty * (float)c;
  }
  for (const auto& [t, bias] : p.logitBias)  // one per token (needsHostSampling() takes the rest)
    if (t >= 0 && t < vocab) adj[t].second = bias;
  const size_t n = adj.size();
  std::vector<int32_t> staged(3 * n);
  size_t i = 0;
  for (const auto& [t, v] : adj) {
    staged[i] = t;
    std::memcpy(&staged[n + i], &v.first, sizeof(float));
    std::memcpy(&staged[2 * n + i], &v.second, sizeof(float));
    ++i;
  }
  return staged;
}

}  // namespace

// Whether row p takes the host reference: what the device does not do (needsHostSampling), and
// with LCKV_DEVICE_SAMPLING=0 every row but greedy ones without the extras.
bool CudaBackend::hostSamples(const SamplingParams& p) const {
  return needsHostSampling(p) || (!deviceSampling_ && (p.temperature > 0.0f || asksExtras(p)));
}

// Token choice on the device (greedy, or sampling with temperature > 0, with the penalties, the
// logit bias and the log-probabilities): only the chosen ids (and log-probabilities asked for)
// cross to the host. LCKV_DEVICE_SAMPLING=0 makes the host reference sample instead (for
// bisecting a disagreement between the two). Rows that ask for what only the host reference
// does (needsHostSampling) take the host path too: the row is copied to the host and
// sampleToken() runs there.
int32_t CudaBackend::sample(const Tensor& logitsRow, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                            uint64_t position, TokenLogprobs* logprobs) {
  if (hostSamples(p)) return Backend::sample(logitsRow, vocab, p, history, position, logprobs);
  int32_t token = 0;
  sampleRows(logitsRow, 1, vocab, &p, &history, &position, &token, logprobs);
  return token;
}

// Every row's choice is queued before one copy and one synchronisation; rows that are all
// plain greedy (no penalty) take one launch, a block per row.
void CudaBackend::sampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                             const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* out,
                             TokenLogprobs* logprobs) {
  bool wantLogprobs = false;
  for (int r = 0; r < rows; ++r) {
    if (hostSamples(params[r])) return Backend::sampleRows(logits, rows, vocab, params, histories, positions, out, logprobs);
    wantLogprobs = wantLogprobs || (logprobs && params[r].logprobs >= 0);
  }
  ctx();
  Timed timed(*this, "sample");
  // Its own slot: the two run-ahead slots may hold a queued step's tokens.
  SampledSlot& q = sampled_.withRoom(SamplingSlots::kWaitedSlot, rows, stream_);
  // Log-probabilities only where a row asks: otherwise nothing more is allocated or copied.
  std::shared_ptr<void> dLogprobs;
  std::vector<cuda::RowLogprobs> hostLogprobs;
  if (wantLogprobs) dLogprobs = blocks_.get(sizeof(cuda::RowLogprobs) * (size_t)rows);
  queueChoices(logits, rows, vocab, params, histories, positions, (int32_t*)q.device.get(),
               (cuda::RowLogprobs*)dLogprobs.get());
  cudaOk(cudaMemcpyAsync(q.pinned, q.device.get(), sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost, stream_), "token copy");
  if (wantLogprobs) {
    hostLogprobs.resize((size_t)rows);
    cudaOk(cudaMemcpyAsync(hostLogprobs.data(), dLogprobs.get(), sizeof(cuda::RowLogprobs) * (size_t)rows,
                           cudaMemcpyDeviceToHost, stream_),
           "logprobs copy");
  }
  cudaOk(cudaStreamSynchronize(stream_), "sample sync");
  std::memcpy(out, q.pinned, sizeof(int32_t) * (size_t)rows);
  if (!wantLogprobs) return;
  for (int r = 0; r < rows; ++r) {
    if (params[r].logprobs < 0) continue;
    const cuda::RowLogprobs& d = hostLogprobs[(size_t)r];
    TokenLogprobs& lp = logprobs[r];
    const int k = std::min(params[r].logprobs, vocab);
    lp.logprob = d.chosen;
    lp.topTokens.assign(d.topTokens, d.topTokens + k);
    lp.topLogprobs.assign(d.top, d.top + k);
  }
}

bool CudaBackend::canQueueSampling(const SamplingParams* params, int rows) const {
  for (int r = 0; r < rows; ++r)
    if (!choiceCanBeQueued(params[r]) || hostSamples(params[r])) return false;
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
  queueChoices(logits, rows, vocab, params, nullptr, positions, (int32_t*)q.device.get(), nullptr);
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
                               const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* d,
                               cuda::RowLogprobs* dLogprobs) {
  bool plainGreedy = true;
  for (int r = 0; r < rows; ++r)
    if (params[r].temperature > 0.0f || params[r].repetitionPenalty != 1.0f || asksExtras(params[r])) plainGreedy = false;
  const float* base = f32(logits, "sample", "logits");
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
    cuda::RowExtras extras;  // none, unless the row asks (then its own kernels after the penalty)
    if (asksExtras(p)) {
      const std::vector<int32_t> adj = logitAdjustments(p, histories ? &histories[r] : nullptr, vocab);
      const int n = (int)adj.size() / 3;
      if (n > 0) {
        const int32_t* dAdj = stage(Staging::LogitAdjustments, adj.data(), (int)adj.size());
        extras.tokens = dAdj;
        extras.subtract = reinterpret_cast<const float*>(dAdj + n);
        extras.add = reinterpret_cast<const float*>(dAdj + 2 * n);
        extras.count = n;
      }
      if (p.logprobs >= 0 && dLogprobs) {
        extras.logprobs = p.logprobs;
        extras.logprobsOut = dLogprobs + r;
      }
    }
    if (p.temperature <= 0.0f) {
      if (!scratch) scratch = blocks_.get(sizeof(float) * (size_t)vocab);
      cuda::launchGreedy(row, vocab, (float*)scratch.get(), dPen, (int)distinct.size(), p.repetitionPenalty, extras, d + r,
                         stream_);
    } else {
      if (!ws) ws = blocks_.get(cuda::sampleWorkspaceBytes(vocab));
      cuda::launchSample(row, vocab, dPen, (int)distinct.size(), p.repetitionPenalty, p.temperature, p.topK, p.topP,
                         p.minP, p.seed, positions[r], extras, ws.get(), d + r, stream_);
    }
  }
}

}  // namespace lckv
