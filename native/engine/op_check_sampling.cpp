// The op checks' token-choice cases (op_check.cpp lists them among its groups): the test
// backend's sampler against the CPU reference's, which must pick the same ids.
#include <cmath>

#include "op_check_runner.h"
#include "sampling.h"

namespace lckv::op_check {

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
}

// token choice for a whole decode batch: all rows plain greedy (one launch on the GPU), then
// a mix of greedy, penalised and sampled rows; every row must pick the CPU's id (the dtype's
// tolerance is below one row in 7).
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
}

}  // namespace lckv::op_check
