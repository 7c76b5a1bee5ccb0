// Runs every backend op on two backends with the same fresh random inputs and reports how far
// the second's outputs are from the first's (the reference, normally the CPU backend).
// The GPU test project calls it through the addon; this is lckv's "test-backend-ops".
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"

namespace lckv {

struct OpCheck {
  std::string op;      // e.g. "linear"
  std::string shape;   // human-readable case description
  double relErr = 0;   // ||test - ref||_2 / ||ref||_2 (infinite when anything is NaN)
  bool allWritten = true;  // no element of the (poisoned) output was left unwritten
  double tolerance = 0;    // the largest relErr this case passes with (set by the case, > 0)
};

// ops: the op names to check (empty: all). An entry selects the op of that name and the ops
// named "<entry> <part>" ("linears" selects "linears q", "linears k" and "linears v"); an
// entry that selects nothing is refused (kErrInvalidArgument), so a misspelt name does not
// pass silently with no cases.
std::vector<OpCheck> checkBackendOps(Backend& ref, Backend& test, uint64_t seed, const std::vector<std::string>& ops = {});

}  // namespace lckv
