// What the JavaScript objects hold: shared_ptrs to the engine's model and sequence state, so
// dispose() during an in-flight call is safe (the call finishes on the state it started with,
// and later calls are refused).
#pragma once
#include <atomic>
#include <memory>

#include "../engine/model.h"

namespace lckv::addon {

struct SharedModel {
  std::unique_ptr<Model> model;
};

struct SharedSequence {
  std::shared_ptr<SharedModel> owner;
  std::unique_ptr<SequenceState> state;
  // Claimed on the JS thread before a worker starts and released on the JS thread when its
  // result has been read, so state is never touched by two threads at once.
  std::atomic<bool> busy{false};
  // What JS may read at any time (state changes on a worker thread while a forward runs).
  int length = 0;
  double kvBytes = 0;
  void publish() {
    length = state->length();
    kvBytes = (double)state->kv->bytes();
  }
  // Ends a worker's claim, on the JS thread once the worker has run.
  void release() {
    publish();
    busy = false;
  }
};

}  // namespace lckv::addon
