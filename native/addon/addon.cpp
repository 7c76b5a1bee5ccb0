// N-API surface of the engine: the module's exports, registered here. Heavy calls (loading
// tensors, append) run in AsyncWorkers off the JavaScript thread and settle a Promise; errors
// carry a `code` that lib/errors.ts maps to a typed error (engine_call.h). Objects hold
// shared_ptrs, so dispose() during an in-flight call is safe: the call finishes on the state it
// started with, and later calls are refused (shared_handles.h).
//   NativeModel                      model_wrap.h (its sequences, NativeSequence: sequence_wrap.h)
//   checkBackendOps, benchAttention, setCpuQueuedSampling  op_hooks.h
//   backends, version                here
// Arguments and options are read in args.h.
#include <napi.h>

#include <string>

#include "../engine/backend.h"
#include "addon_data.h"
#include "model_wrap.h"
#include "op_hooks.h"
#include "sequence_wrap.h"

using namespace lckv;
using namespace lckv::addon;

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  exports.Set("checkBackendOps", Napi::Function::New(env, CheckBackendOps));
  exports.Set("benchAttention", Napi::Function::New(env, BenchAttention));
  exports.Set("setCpuQueuedSampling", Napi::Function::New(env, SetCpuQueuedSampling));
  SequenceWrap::Init(env, data);
  ModelWrap::Init(env, exports);
  Napi::Object backends = Napi::Object::New(env);
  backends.Set("cpu", Napi::Boolean::New(env, true));
#ifdef LCKV_WITH_CUDA
  {
    std::string problem = cudaDeviceProblem();
    backends.Set("cudaBuilt", Napi::Boolean::New(env, true));
    backends.Set("cuda", Napi::Boolean::New(env, problem.empty()));
    if (!problem.empty()) backends.Set("cudaProblem", Napi::String::New(env, problem));
  }
#else
  backends.Set("cudaBuilt", Napi::Boolean::New(env, false));
  backends.Set("cuda", Napi::Boolean::New(env, false));
#endif
  exports.Set("backends", backends);
  exports.Set("version", Napi::String::New(env, "0.1.0"));
  return exports;
}

}  // namespace

NODE_API_MODULE(lckv, Init)
