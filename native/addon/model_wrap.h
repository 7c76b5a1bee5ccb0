// NativeModel: a model on one backend. loadTensors() and decodeBatch() run in AsyncWorkers and
// settle a Promise; the other methods run on the JavaScript thread.
#pragma once
#include <napi.h>

#include <memory>

#include "shared_handles.h"

namespace lckv::addon {

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  // new NativeModel(description, { backend: "cpu", threads })
  explicit ModelWrap(const Napi::CallbackInfo& info);

 private:
  std::shared_ptr<SharedModel> live(Napi::Env env);

  Napi::Value LoadTensors(const Napi::CallbackInfo& info);
  Napi::Value DecodeBatch(const Napi::CallbackInfo& info);
  Napi::Value CreatePool(const Napi::CallbackInfo& info);
  Napi::Value KvPageBytes(const Napi::CallbackInfo& info);
  Napi::Value KvTypeProblem(const Napi::CallbackInfo& info);
  Napi::Value PoolStats(const Napi::CallbackInfo& info);
  Napi::Value AuditPool(const Napi::CallbackInfo& info);
  Napi::Value MemoryInfo(const Napi::CallbackInfo& info);
  Napi::Value Finalize(const Napi::CallbackInfo& info);
  Napi::Value CreateSequence(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value WeightBytes(const Napi::CallbackInfo& info);
  Napi::Value BackendName(const Napi::CallbackInfo& info);

  std::shared_ptr<SharedModel> shared_;
};

}  // namespace lckv::addon
