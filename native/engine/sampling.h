// Logits processing and sampling: the reference a GPU sampler is tested against.
// Order: repetition penalty (as in Hugging Face generate()), then the presence and frequency
// penalties and the logit bias (as OpenAI and vLLM define them), then log-probabilities when
// asked, then temperature, top-k, top-p, min-p.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace lckv {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int topK = 0;              // 0 = off
  float topP = 1.0f;         // 1 = off
  float minP = 0.0f;         // 0 = off
  float repetitionPenalty = 1.0f;  // 1 = off; applies to every token already in the sequence
  uint64_t seed = 0;
  // OpenAI's penalties over the tokens generated so far, history[penaltyFrom..] (the request's
  // own tokens, not its prompt): logit[t] -= presencePenalty * (count[t] > 0) +
  // frequencyPenalty * count[t]. 0 = off.
  float presencePenalty = 0.0f;
  float frequencyPenalty = 0.0f;
  int32_t penaltyFrom = 0;
  // Added to the logits of these token ids (ids outside the vocabulary are skipped).
  std::vector<std::pair<int32_t, float>> logitBias;
  // -1 = none; 0 = the chosen token's log-probability; k > 0 = also the k most likely tokens'.
  int logprobs = -1;
};

// The most top log-probabilities a GPU backend computes itself (OpenAI's limit, as lib's).
constexpr int kDeviceTopLogprobs = 20;

// Whether p asks for anything only the host reference does: a GPU backend hands such rows to
// Backend's host path. That is more than kDeviceTopLogprobs top log-probabilities, or a logit
// bias that names a token twice (its biases add one after the other, each rounded; the device
// adds one bias per token). Penalties, bias and log-probabilities otherwise run on the device.
bool needsHostSampling(const SamplingParams& p);
// Whether sampling reads the sequence's tokens (history) at all.
bool readsHistory(const SamplingParams& p);
// Whether a row's choice can be queued for a step run ahead (StepExecution::canQueueSampling), on
// any backend that queues: it reads no history (the latest tokens would still be on the device)
// and asks for no logit bias or log-probabilities.
bool choiceCanBeQueued(const SamplingParams& p);

// The log-probabilities of one choice, from the log-softmax of the processed logits (after
// penalties and bias, before temperature and the filters).
struct TokenLogprobs {
  double logprob = 0;               // the chosen token's
  std::vector<int32_t> topTokens;   // the k most likely, most likely first (ties: lower id first)
  std::vector<double> topLogprobs;
};

// A uniform draw in [0, 1) that depends only on (seed, position): reproducible, and the same
// whether a sequence runs alone or inside a batch.
double uniformFor(uint64_t seed, uint64_t position);

// Picks the next token from logits[vocab]. `history` is the sequence so far (for the
// penalties; read only when readsHistory(p)); `position` is the position the new token will
// take. Ties go to the lowest token id. `logprobs` (when p.logprobs >= 0 and not null)
// receives the choice's log-probabilities.
int32_t sampleToken(const float* logits, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                    uint64_t position, TokenLogprobs* logprobs = nullptr);

}  // namespace lckv
