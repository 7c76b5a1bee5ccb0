// Per-environment data: a constructor reference must not outlive the environment (worker
// threads each load the addon into their own environment).
#pragma once
#include <napi.h>

namespace lckv::addon {

struct AddonData {
  Napi::FunctionReference sequenceCtor;
};

}  // namespace lckv::addon
