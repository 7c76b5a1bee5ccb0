// NativeSequence: one sequence's K/V state. append() and shift() run in AsyncWorkers and settle a
// Promise; the other methods run on the JavaScript thread and are refused while a forward runs.
#pragma once
#include <napi.h>

#include <memory>

#include "addon_data.h"
#include "shared_handles.h"

namespace lckv::addon {

class SequenceWrap : public Napi::ObjectWrap<SequenceWrap> {
 public:
  static void Init(Napi::Env env, AddonData* data);
  explicit SequenceWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SequenceWrap>(info) {}
  std::shared_ptr<SharedSequence> seq;

  static Napi::Object Wrap(Napi::Env env, std::shared_ptr<SharedSequence> s);
  static bool IsSequence(Napi::Env env, const Napi::Value& v);

 private:
  std::shared_ptr<SharedSequence> live(Napi::Env env);
  // live(), refused (LCKV_BUSY) while a forward runs on the sequence.
  std::shared_ptr<SharedSequence> idle(Napi::Env env);
  // Claims s for a worker, which releases it (SharedSequence::release) when it has run.
  static void claim(Napi::Env env, SharedSequence& s);

  Napi::Value Append(const Napi::CallbackInfo& info);
  Napi::Value Shift(const Napi::CallbackInfo& info);
  Napi::Value Truncate(const Napi::CallbackInfo& info);
  Napi::Value ExactRewind(const Napi::CallbackInfo& info);
  Napi::Value CheckpointResidual(const Napi::CallbackInfo& info);
  Napi::Value DropResidualCheckpoint(const Napi::CallbackInfo& info);
  Napi::Value Reserve(const Napi::CallbackInfo& info);
  Napi::Value PagesToReserve(const Napi::CallbackInfo& info);
  Napi::Value PagesToShift(const Napi::CallbackInfo& info);
  Napi::Value SetCached(const Napi::CallbackInfo& info);
  Napi::Value ReadKv(const Napi::CallbackInfo& info);
  Napi::Value ReservedPages(const Napi::CallbackInfo& info);
  Napi::Value Fork(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value Length(const Napi::CallbackInfo& info);
  Napi::Value KvBytes(const Napi::CallbackInfo& info);
};

}  // namespace lckv::addon
