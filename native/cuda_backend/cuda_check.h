// cudaOk: a failed CUDA runtime call as an EngineError (out of memory as std::bad_alloc), shared
// by every file of the CUDA backend.
#pragma once
#include <cuda_runtime.h>

#include <new>
#include <string>

#include "../engine/errors.h"

namespace lckv {

inline void cudaOk(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky-free error so the process keeps working
  if (e == cudaErrorMemoryAllocation) throw std::bad_alloc();
  throw EngineError(kErrCuda, std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace lckv
