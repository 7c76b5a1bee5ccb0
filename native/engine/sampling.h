// Logits processing and sampling: the reference a GPU sampler is tested against.
// Order as in Hugging Face generate(): repetition penalty, then temperature, top-k, top-p, min-p.
#pragma once
#include <cstdint>
#include <vector>

namespace lckv {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int topK = 0;              // 0 = off
  float topP = 1.0f;         // 1 = off
  float minP = 0.0f;         // 0 = off
  float repetitionPenalty = 1.0f;  // 1 = off; applies to every token already in the sequence
  uint64_t seed = 0;
};

// A uniform draw in [0, 1) that depends only on (seed, position): reproducible, and the same
// whether a sequence runs alone or inside a batch.
double uniformFor(uint64_t seed, uint64_t position);

// Picks the next token from logits[vocab]. `history` is the sequence so far (for the penalty);
// `position` is the position the new token will take. Ties go to the lowest token id.
int32_t sampleToken(const float* logits, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                    uint64_t position);

}  // namespace lckv
