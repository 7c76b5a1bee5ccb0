// The model description the engine runs: dimensions, block style and the KV plan.
// TypeScript parses config.json and builds this; the engine re-checks every field it
// indexes with (see validate()) so that a bad description is an error, never a crash.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace lckv {

// Block style of the decoder. Everything else (which KV a layer reads) is in the plan.
enum class BlockStyle { Llama, Gpt2 };

// The KV plan: for each layer, whose KV it reads and how it masks.
struct KvPlan {
  std::vector<int> target;       // target[i]: the layer whose K/V layer i's queries attend to
  std::vector<bool> strict;      // strict[i]: queries at p see keys < p (diagonal masked)
  std::vector<int> window;       // window[i]: sliding window in positions (counting p itself), 0 = none
  std::vector<int> kvLayers;     // sorted set of targets: the only layers that compute and cache K/V
  std::vector<int> kvSlot;       // kvSlot[layer] = index into kvLayers, or -1
  int cyclicLow = -1;            // first layer whose target lies above it, -1 if none
  int cyclicHigh = -1;           // highest target of such a layer

  bool hasCycle() const { return cyclicLow >= 0; }
};

struct ModelConfig {
  BlockStyle style = BlockStyle::Llama;
  int numLayers = 0;
  int hidden = 0;
  int numHeads = 0;
  int numKvHeads = 0;
  int headDim = 0;
  int intermediate = 0;
  int vocab = 0;
  int maxPositions = 0;          // hard limit for learned positions (GPT-2); 0 = none
  float normEps = 1e-5f;
  bool tiedEmbeddings = false;
  bool attentionBias = false;    // q/k/v/o carry biases (GPT-2 always)
  bool mlpBias = false;
  std::vector<float> ropeInvFreq; // headDim/2 entries (Llama); empty for GPT-2
  float ropeAttentionScale = 1.0f; // multiplies cos/sin (YaRN-style scaling); 1 for plain RoPE
  KvPlan plan;

  // Throws std::invalid_argument naming the first inconsistent field.
  void validate() const;
};

inline void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
  };
  need(numLayers > 0, "numLayers must be > 0");
  need(hidden > 0 && numHeads > 0 && numKvHeads > 0 && headDim > 0, "hidden, numHeads, numKvHeads and headDim must be > 0");
  need(numHeads % numKvHeads == 0, "numHeads must be a multiple of numKvHeads");
  need(intermediate > 0 && vocab > 0, "intermediate and vocab must be > 0");
  if (style == BlockStyle::Llama) {
    need(headDim % 2 == 0, "headDim must be even for RoPE");
    need((int)ropeInvFreq.size() == headDim / 2, "ropeInvFreq must have headDim/2 entries");
  }
  const size_t L = (size_t)numLayers;
  need(plan.target.size() == L && plan.strict.size() == L && plan.window.size() == L && plan.kvSlot.size() == L,
       "plan arrays must have numLayers entries");
  for (size_t i = 0; i < L; ++i) {
    int t = plan.target[i];
    need(t >= 0 && t < numLayers, "plan.target[" + std::to_string(i) + "] out of range");
    need(plan.target[t] == t, "plan.target[" + std::to_string(i) + "] points at a layer that does not compute its own KV");
    need(plan.kvSlot[t] >= 0 && plan.kvSlot[t] < (int)plan.kvLayers.size(), "plan.kvSlot for layer " + std::to_string(t) + " missing");
    need(plan.window[i] >= 0, "plan.window must be >= 0");
  }
  for (size_t s = 0; s < plan.kvLayers.size(); ++s) {
    int l = plan.kvLayers[s];
    need(l >= 0 && l < numLayers && plan.kvSlot[l] == (int)s, "plan.kvLayers and plan.kvSlot disagree");
  }
  if (plan.cyclicLow >= 0) {
    need(plan.cyclicLow <= plan.cyclicHigh && plan.cyclicHigh < numLayers, "plan cyclic range out of bounds");
  }
}

}  // namespace lckv
