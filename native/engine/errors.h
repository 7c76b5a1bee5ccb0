// Errors the engine raises. `code` travels to JavaScript, where lib/errors.ts maps it to a typed error.
#pragma once
#include <stdexcept>
#include <string>

namespace lckv {

struct EngineError : std::runtime_error {
  std::string code;
  EngineError(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

// Codes (kept in sync with lib/errors.ts).
inline const char* kErrInvalidArgument = "LCKV_INVALID_ARGUMENT";
inline const char* kErrWeights = "LCKV_WEIGHTS";
inline const char* kErrIo = "LCKV_IO";
inline const char* kErrOutOfMemory = "LCKV_OUT_OF_MEMORY";
inline const char* kErrContextOverflow = "LCKV_CONTEXT_OVERFLOW";
inline const char* kErrTokenOutOfRange = "LCKV_TOKEN_OUT_OF_RANGE";
inline const char* kErrDisposed = "LCKV_DISPOSED";
inline const char* kErrBusy = "LCKV_BUSY";
inline const char* kErrKvCacheFull = "LCKV_KV_CACHE_FULL";
inline const char* kErrAborted = "LCKV_ABORTED";

}  // namespace lckv
