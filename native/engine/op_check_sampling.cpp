// The op checks' token-choice cases (op_check.cpp lists them among its groups): the test
// backend's sampler against the CPU reference's, which must pick the same ids.
#include <cmath>

#include "op_check_runner.h"
#include "sampling.h"

namespace lckv::op_check {

namespace {

// Log-probabilities may differ in rounding (the GPU sums the softmax in another order): this
// much, relative to 1 + the reference's magnitude. The logits are the same floats on both
// sides, so a larger difference is a wrong rule, not rounding.
constexpr double kLogprobTolerance = 1e-5;

// How far b's log-probabilities are from the reference's a, relative to 1 + |a| (0 when equal,
// infinities included): infinite when they list a different number of top tokens, or a
// different id where the two values are further apart than the tolerance (a near tie may
// swap).
double logprobsError(const TokenLogprobs& a, const TokenLogprobs& b) {
  auto err = [](double x, double y) { return x == y ? 0.0 : std::isfinite(x - y) ? std::fabs(x - y) / (1.0 + std::fabs(x)) : INFINITY; };
  double e = err(a.logprob, b.logprob);
  if (a.topTokens.size() != b.topTokens.size() || a.topLogprobs.size() != b.topLogprobs.size()) return INFINITY;
  for (size_t j = 0; j < a.topTokens.size(); ++j) {
    const double ej = err(a.topLogprobs[j], b.topLogprobs[j]);
    if (a.topTokens[j] != b.topTokens[j] && !(ej <= kLogprobTolerance)) return INFINITY;
    e = std::max(e, ej);
  }
  return e;
}

// The presence and frequency penalties over history[8..] (drawn from few ids, so tokens repeat),
// a logit bias of distinct ids (one out of the vocabulary, which both skip) and `logprobs`.
void addExtras(SamplingParams& sp, int V, int logprobs, std::mt19937_64& rng) {
  sp.presencePenalty = 0.6f;
  sp.frequencyPenalty = 0.35f;
  sp.penaltyFrom = 8;
  const int32_t t = (int32_t)(rng() % (uint64_t)V);
  sp.logitBias = {{t, 2.5f}, {(t + 1) % V, -100.0f}, {(t + 2) % V, 0.75f}, {V + 3, 5.0f}};
  sp.logprobs = logprobs;
}

std::vector<int32_t> repeatingHistory(int V, std::mt19937_64& rng) {
  std::vector<int32_t> h;
  for (int i = 0; i < 40; ++i) h.push_back((int32_t)(rng() % (uint64_t)std::min(V, 24)));
  return h;
}

}  // namespace

// token choice: greedy and sampled draws from the same logits must pick the same ids. The
// reported error is the fraction of draws that differ (0 expected: the draw depends only on
// (seed, position), and the two sums differ only in rounding far below a draw's resolution).
// The dtype's tolerance is below one draw in 32, so one differing draw fails the case.
void checkSample(Runner& r, Backend& ref, Backend& test) {
  struct SampleCase { int V; float temperature; int topK; float topP; float minP; float penalty; };
  for (const SampleCase& c : std::vector<SampleCase>{{301, 0, 0, 1, 0, 1}, {301, 0, 0, 1, 0, 1.3f},
                                                     {301, 1.3f, 0, 1, 0, 1}, {1000, 0.8f, 5, 1, 0, 1},
                                                     {257, 1.0f, 0, 0.7f, 0, 1}, {4096, 1.1f, 0, 1, 0.1f, 1.2f},
                                                     {32000, 0.9f, 20, 0.9f, 0.05f, 1}, {32000, 1.0f, 0, 1, 0, 1},
                                                     {500, 1.0f, 7, 1, 0, 1}}) {
    const int draws = 32;
    std::vector<float> logits = r.random((size_t)c.V, 2.0f);
    // The last case's logits are whole numbers: many ties, at the k-th value of top-k too.
    if (c.V == 500)
      for (float& v : logits) v = std::round(v * 2.0f);
    auto x = r.act(logits, 1, c.V);
    std::vector<int32_t> history;
    for (int i = 0; i < 24; ++i) history.push_back((int32_t)(r.rng() % (uint64_t)c.V));
    SamplingParams sp;
    sp.temperature = c.temperature;
    sp.topK = c.topK;
    sp.topP = c.topP;
    sp.minP = c.minP;
    sp.repetitionPenalty = c.penalty;
    int differ = 0;
    for (int d = 0; d < draws; ++d) {
      sp.seed = r.rng();
      const uint64_t position = r.rng() % 4096;
      if (ref.sample(x.first, c.V, sp, history, position) != test.sample(x.second, c.V, sp, history, position)) ++differ;
    }
    r.report(OpCheck{"sample",
                     dims({{"V", c.V}, {"temperature_x10", (int64_t)std::lround(c.temperature * 10)}, {"topK", c.topK},
                           {"topP_x100", (int64_t)std::lround(c.topP * 100)},
                           {"minP_x100", (int64_t)std::lround(c.minP * 100)},
                           {"penalty_x10", (int64_t)std::lround(c.penalty * 10)}}),
                     (double)differ / draws, true, r.tolerance});
  }
  // With the presence and frequency penalties, the logit bias and log-probabilities (k = -1:
  // none, 0: the chosen token's, up to 20; V = 7 has fewer tokens than k): the same ids, and
  // log-probabilities within kLogprobTolerance ("sample logprobs").
  struct ExtrasCase { int V; float temperature; int topK; float topP; float penalty; int logprobs; };
  for (const ExtrasCase& c : std::vector<ExtrasCase>{{301, 0, 0, 1, 1, -1}, {32000, 0, 0, 1, 1.2f, 5},
                                                     {32000, 0.9f, 20, 0.9f, 1, 20}, {4096, 1.1f, 0, 1, 1.3f, 0},
                                                     {500, 0, 0, 1, 1, 20}, {500, 1.0f, 7, 1, 1, 5}, {7, 0, 0, 1, 1, 20}}) {
    const int draws = 8;
    std::vector<float> logits = r.random((size_t)c.V, 2.0f);
    if (c.V == 500)  // whole numbers: ties among the top tokens, ordered by id
      for (float& v : logits) v = std::round(v * 2.0f);
    auto x = r.act(logits, 1, c.V);
    const std::vector<int32_t> history = repeatingHistory(c.V, r.rng);
    SamplingParams sp;
    sp.temperature = c.temperature;
    sp.topK = c.topK;
    sp.topP = c.topP;
    sp.repetitionPenalty = c.penalty;
    addExtras(sp, c.V, c.logprobs, r.rng);
    int differ = 0;
    double lpErr = 0;
    for (int d = 0; d < draws; ++d) {
      sp.seed = r.rng();
      const uint64_t position = r.rng() % 4096;
      TokenLogprobs la, lb;
      differ += ref.sample(x.first, c.V, sp, history, position, &la) != test.sample(x.second, c.V, sp, history, position, &lb);
      if (c.logprobs >= 0) lpErr = std::max(lpErr, logprobsError(la, lb));
    }
    const std::string shape = dims({{"V", c.V}, {"temperature_x10", (int64_t)std::lround(c.temperature * 10)}, {"topK", c.topK},
                                    {"penalty_x10", (int64_t)std::lround(c.penalty * 10)}, {"extras", 1},
                                    {"logprobs", c.logprobs}});
    r.report(OpCheck{"sample", shape, (double)differ / draws, true, r.tolerance});
    if (c.logprobs >= 0) r.report(OpCheck{"sample logprobs", shape, lpErr, true, kLogprobTolerance});
  }
}

// token choice for a whole decode batch: all rows plain greedy (one launch on the GPU), then
// a mix of greedy, penalised and sampled rows, then one with the extras; every row must pick
// the CPU's id (the dtype's tolerance is below one row in 8).
void checkSampleRows(Runner& r, Backend& ref, Backend& test) {
  for (bool mixed : {false, true}) {
    const int rows = 7, V = 32000;
    auto x = r.act(r.random((size_t)rows * V, 2.0f), rows, V);
    std::vector<SamplingParams> ps((size_t)rows);
    std::vector<std::vector<int32_t>> hist((size_t)rows);
    std::vector<uint64_t> at((size_t)rows);
    for (int i = 0; i < rows; ++i) {
      SamplingParams& sp = ps[(size_t)i];
      if (mixed) {
        sp.temperature = i % 3 == 0 ? 0.0f : 0.7f + 0.1f * (float)i;
        sp.topK = i % 2 ? 40 : 0;
        sp.repetitionPenalty = i % 4 == 1 ? 1.3f : 1.0f;
        sp.seed = r.rng();
      }
      for (int k = 0; k < 16; ++k) hist[(size_t)i].push_back((int32_t)(r.rng() % (uint64_t)V));
      at[(size_t)i] = r.rng() % 4096;
    }
    std::vector<int32_t> a((size_t)rows), b((size_t)rows);
    ref.sampleRows(x.first, rows, V, ps.data(), hist.data(), at.data(), a.data());
    test.sampleRows(x.second, rows, V, ps.data(), hist.data(), at.data(), b.data());
    int differ = 0;
    for (int i = 0; i < rows; ++i) differ += a[(size_t)i] != b[(size_t)i];
    r.report(OpCheck{"sample_rows", dims({{"rows", rows}, {"V", V}, {"mixed", mixed}}), (double)differ / rows, true, r.tolerance});
  }
  {
    // A batch with the penalties, the logit bias and log-probabilities in some rows (k = -1, 0,
    // 5, 20), beside plain greedy and repetition-penalised rows: the same ids, and
    // log-probabilities within kLogprobTolerance ("sample_rows logprobs").
    const int rows = 8, V = 32000;
    auto x = r.act(r.random((size_t)rows * V, 2.0f), rows, V);
    std::vector<SamplingParams> ps((size_t)rows);
    std::vector<std::vector<int32_t>> hist((size_t)rows);
    std::vector<uint64_t> at((size_t)rows);
    const int ks[4] = {-1, 0, 5, 20};
    for (int i = 0; i < rows; ++i) {
      SamplingParams& sp = ps[(size_t)i];
      sp.temperature = i % 2 == 0 ? 0.0f : 0.8f;
      sp.topK = i % 4 == 1 ? 40 : 0;
      sp.repetitionPenalty = i % 3 == 1 ? 1.3f : 1.0f;
      sp.seed = r.rng();
      hist[(size_t)i] = repeatingHistory(V, r.rng);
      if (i >= 2) addExtras(sp, V, ks[i % 4], r.rng);  // rows 0 and 1 ask for none of it
      at[(size_t)i] = r.rng() % 4096;
    }
    std::vector<int32_t> a((size_t)rows), b((size_t)rows);
    std::vector<TokenLogprobs> la((size_t)rows), lb((size_t)rows);
    ref.sampleRows(x.first, rows, V, ps.data(), hist.data(), at.data(), a.data(), la.data());
    test.sampleRows(x.second, rows, V, ps.data(), hist.data(), at.data(), b.data(), lb.data());
    int differ = 0;
    double lpErr = 0;
    for (int i = 0; i < rows; ++i) {
      differ += a[(size_t)i] != b[(size_t)i];
      if (ps[(size_t)i].logprobs >= 0) lpErr = std::max(lpErr, logprobsError(la[(size_t)i], lb[(size_t)i]));
    }
    const std::string shape = dims({{"rows", rows}, {"V", V}, {"mixed", 1}, {"extras", 1}});
    r.report(OpCheck{"sample_rows", shape, (double)differ / rows, true, r.tolerance});
    r.report(OpCheck{"sample_rows logprobs", shape, lpErr, true, kLogprobTolerance});
  }
}

}  // namespace lckv::op_check
