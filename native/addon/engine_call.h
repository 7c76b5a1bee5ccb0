// Running engine calls from JavaScript: the JS error an engine failure becomes (with the `code`
// that lib/errors.ts maps to a typed error), runEngineCall for calls made on the JavaScript
// thread, and PromiseWorker for calls run off it. Every engine failure reaches JavaScript
// through currentEngineFailure, so the mapping from C++ exceptions to codes is written once.
#pragma once
#include <napi.h>

#include <exception>
#include <string>

namespace lckv::addon {

Napi::Error makeError(Napi::Env env, const std::string& code, const std::string& msg);

[[noreturn]] void throwInvalid(Napi::Env env, const std::string& msg);

// What JavaScript sees of an exception: its code and message.
struct EngineFailure {
  std::string code;
  std::string message;
};

// The failure for the exception being handled; call it only inside a catch handler of a
// std::exception. An EngineError keeps its code, std::bad_alloc becomes an out-of-memory error
// with outOfMemoryMessage, anything else an internal error with its what().
EngineFailure currentEngineFailure(const char* outOfMemoryMessage = "out of memory");

// Runs fn on the JavaScript thread and returns its result, throwing an engine failure as a JS
// error (currentEngineFailure). Napi errors fn throws (argument checks) pass through unchanged.
template <typename Fn>
auto runEngineCall(Napi::Env env, Fn&& fn, const char* outOfMemoryMessage = "out of memory") -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception&) {
    const EngineFailure f = currentEngineFailure(outOfMemoryMessage);
    throw makeError(env, f.code, f.message);
  }
}

// An AsyncWorker that settles a Promise and keeps the engine's error code. Subclasses put the
// engine call in run() (on a worker thread) and resolve in OnOK().
class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  virtual void run() = 0;
  // Runs run(), turning every exception into a stored error (never lets one escape a thread).
  void Execute() final;
  void OnError(const Napi::Error& e) override;
  Napi::Promise::Deferred deferred_;
  std::string code_;
};

}  // namespace lckv::addon
