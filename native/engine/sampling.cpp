#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>
#include <unordered_set>

#include "rng.h"

namespace lckv {

double uniformFor(uint64_t seed, uint64_t position) { return uniformDraw(seed, position); }

bool needsHostSampling(const SamplingParams& p) {
  if (p.logprobs > kDeviceTopLogprobs) return true;
  if (p.logitBias.size() < 2) return false;
  std::unordered_set<int32_t> seen;
  for (const auto& b : p.logitBias)
    if (!seen.insert(b.first).second) return true;
  return false;
}

bool readsHistory(const SamplingParams& p) {
  return p.repetitionPenalty != 1.0f || p.presencePenalty != 0.0f || p.frequencyPenalty != 0.0f;
}

bool choiceCanBeQueued(const SamplingParams& p) { return !readsHistory(p) && p.logitBias.empty() && p.logprobs < 0; }

// Log-probabilities of x[vocab] (log-softmax in double) for the chosen token and the k most
// likely tokens.
static void computeLogprobs(const std::vector<float>& x, int vocab, int k, int32_t chosen, TokenLogprobs& out) {
  double top = -INFINITY;
  for (float v : x) top = std::max(top, (double)v);
  double sum = 0;
  if (top > -INFINITY)
    for (float v : x) sum += std::exp((double)v - top);
  const double lse = top + std::log(sum);  // -inf when every logit is -inf
  auto logprob = [&](int32_t t) { return top > -INFINITY ? (double)x[(size_t)t] - lse : -INFINITY; };
  out.logprob = logprob(chosen);
  out.topTokens.clear();
  out.topLogprobs.clear();
  k = std::min(k, vocab);
  if (k <= 0) return;
  std::vector<int32_t> idx((size_t)vocab);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int32_t a, int32_t b) { return x[(size_t)a] > x[(size_t)b] || (x[(size_t)a] == x[(size_t)b] && a < b); });
  for (int i = 0; i < k; ++i) {
    out.topTokens.push_back(idx[(size_t)i]);
    out.topLogprobs.push_back(logprob(idx[(size_t)i]));
  }
}

// Greedy, or temperature, top-k, top-p and min-p over the processed logits x.
static int32_t chooseToken(const std::vector<float>& x, int vocab, const SamplingParams& p, uint64_t position) {
  if (p.temperature <= 0.0f) {
    int best = 0;
    for (int i = 1; i < vocab; ++i)
      if (x[i] > x[best]) best = i;
    return best;
  }
  // Candidates sorted by logit (descending), ties by id, so the draw is deterministic.
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return x[a] > x[b]; });
  size_t keep = idx.size();
  if (p.topK > 0 && (size_t)p.topK < keep) {
    keep = (size_t)p.topK;
    // Tokens tied with the k-th stay (as transformers' top-k keeps every logit >= the k-th).
    while (keep < idx.size() && x[idx[keep]] == x[idx[keep - 1]]) ++keep;
  }

  // Softmax of the scaled logits over the kept candidates, in double.
  const double invT = 1.0 / (double)p.temperature;
  const double top = (double)x[idx[0]] * invT;
  std::vector<double> prob(keep);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += prob[i] = std::exp((double)x[idx[i]] * invT - top);
  for (double& v : prob) v /= sum;

  if (p.topP < 1.0f) {  // smallest prefix whose mass reaches topP (at least one token)
    double cum = 0;
    size_t k = 0;
    while (k < keep) {
      cum += prob[k++];
      if (cum >= (double)p.topP) break;
    }
    keep = std::max<size_t>(k, 1);
  }
  if (p.minP > 0.0f) {  // drop tokens below minP times the most likely one
    const double floor = (double)p.minP * prob[0];
    size_t k = 1;
    while (k < keep && prob[k] >= floor) ++k;
    keep = k;
  }
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += prob[i];
  const double u = uniformFor(p.seed, position) * mass;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += prob[i];
    if (u < cum) return idx[i];
  }
  return idx[keep - 1];
}

int32_t sampleToken(const float* logits, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                    uint64_t position, TokenLogprobs* logprobs) {
  std::vector<float> x(logits, logits + vocab);
  for (float& v : x)
    if (std::isnan(v)) v = -INFINITY;  // a NaN logit is never chosen (and keeps the sort well defined)
  if (p.repetitionPenalty != 1.0f) {
    std::unordered_set<int32_t> seen(history.begin(), history.end());
    for (int32_t t : seen) {
      if (t < 0 || t >= vocab) continue;
      x[t] = x[t] > 0 ? x[t] / p.repetitionPenalty : x[t] * p.repetitionPenalty;
    }
  }
  if (p.presencePenalty != 0.0f || p.frequencyPenalty != 0.0f) {
    // Counted per call over the generated tokens only (a request's few hundred, not its prompt).
    std::unordered_map<int32_t, int> count;
    for (size_t i = (size_t)std::max(0, p.penaltyFrom); i < history.size(); ++i) ++count[history[i]];
    for (const auto& [t, c] : count) {
      if (t < 0 || t >= vocab) continue;
      x[(size_t)t] -= p.presencePenalty + p.frequencyPenalty * (float)c;
    }
  }
  for (const auto& [t, bias] : p.logitBias)
    if (t >= 0 && t < vocab) x[(size_t)t] += bias;
  const int32_t token = chooseToken(x, vocab, p, position);
  if (logprobs && p.logprobs >= 0) computeLogprobs(x, vocab, p.logprobs, token, *logprobs);
  return token;
}

}  // namespace lckv
