// The mapping from engine failures to JavaScript errors (engine_call.h).
#include "engine_call.h"

#include <new>

#include "../engine/errors.h"

namespace lckv::addon {

Napi::Error makeError(Napi::Env env, const std::string& code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

[[noreturn]] void throwInvalid(Napi::Env env, const std::string& msg) {
  throw makeError(env, kErrInvalidArgument, msg);
}

EngineFailure currentEngineFailure(const char* outOfMemoryMessage) {
  try {
    throw;
  } catch (const EngineError& e) {
    return {e.code, e.what()};
  } catch (const std::bad_alloc&) {
    return {kErrOutOfMemory, outOfMemoryMessage};
  } catch (const std::exception& e) {
    return {kErrInternal, e.what()};
  }
}

void PromiseWorker::Execute() {
  try {
    run();
  } catch (const std::exception&) {
    EngineFailure f = currentEngineFailure();
    code_ = std::move(f.code);
    SetError(f.message);
  }
}

void PromiseWorker::OnError(const Napi::Error& e) {
  Napi::Error err = makeError(Env(), code_.empty() ? kErrInternal : code_, e.Message());
  deferred_.Reject(err.Value());
}

}  // namespace lckv::addon
