// The model's construction and destruction: checks the config and derives what the forward
// needs from its KV plan. The rest of Model lives by concern in model_weights.cpp,
// sequences.cpp, forward.cpp, prefill.cpp and decode_step.cpp.
#include "model.h"

#include <algorithm>
#include <stdexcept>

#include "errors.h"

namespace lckv {

Model::Model(ModelConfig cfg, std::unique_ptr<Backend> backend) : cfg_(std::move(cfg)), backend_(std::move(backend)) {
  try {
    cfg_.validate();
  } catch (const std::invalid_argument& e) {
    throw EngineError(kErrInvalidArgument, std::string("invalid model description: ") + e.what());
  }
  layers_.resize((size_t)cfg_.numLayers);
  expected_ = expectedTensors();
  // Sliding windows everywhere: the widest one bounds what any future query can read.
  for (int i = 0; i < cfg_.numLayers; ++i) {
    const int w = cfg_.plan.window[i];
    if (w <= 0) {
      releaseWindow_ = 0;
      break;
    }
    releaseWindow_ = std::max(releaseWindow_, w);
  }
  // Slots whose owner is read by a layer below it: the only cross-pass state of the cyclic group.
  for (int i = 0; i < cfg_.numLayers; ++i) {
    int t = cfg_.plan.target[i];
    if (t > i) {
      int slot = cfg_.plan.kvSlot[t];
      if (std::find(upwardTargetSlots_.begin(), upwardTargetSlots_.end(), slot) == upwardTargetSlots_.end())
        upwardTargetSlots_.push_back(slot);
    }
  }
  // The first step a model runs may be a recorded one (prompts as batched token steps).
  if (!cfg_.ropeInvFreq.empty()) backend_->uploadRopeFrequencies(cfg_.ropeInvFreq);
}

Model::~Model() {
  // A step queued ahead may still read the pool and the weights; members go after this.
  try {
    if (backend_) backend_->finishQueued();
  } catch (...) {
    // A destructor does not throw; a device fault here also fails the backend's next call.
  }
}

}  // namespace lckv
