// Errors the engine raises. `code` travels to JavaScript, where lib/errors.ts maps it to a typed error.
#pragma once
#include <stdexcept>
#include <string>

// The codes, one named constant each (kErrInvalidArgument, ...): generated from the table
// lib/error-codes.json, which lib/error-codes.ts (the TypeScript list) comes from too.
#include "error_codes.h"

namespace lckv {

struct EngineError : std::runtime_error {
  std::string code;
  EngineError(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

}  // namespace lckv
