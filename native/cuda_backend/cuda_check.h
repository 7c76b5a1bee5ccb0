// Checks shared by every file of the CUDA backend: cudaOk, a failed CUDA runtime call as an
// EngineError (out of memory as std::bad_alloc); f32, a tensor a kernel reads or writes as float.
#pragma once
#include <cuda_runtime.h>

#include <new>
#include <string>

#include "../engine/backend.h"
#include "../engine/errors.h"

namespace lckv {

inline void cudaOk(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky-free error so the process keeps working
  if (e == cudaErrorMemoryAllocation) throw std::bad_alloc();
  throw EngineError(kErrCuda, std::string(what) + ": " + cudaGetErrorString(e));
}

// t's data as float, for a kernel that takes only f32 (the cast alone would read a bf16 or f16
// tensor's bytes as garbage floats, or past its end). op and name say what refused it.
inline float* f32(const Tensor& t, const char* op, const char* name) {
  if (t.dtype != DType::F32)
    throw EngineError(kErrInvalidArgument, std::string(op) + ": " + name + " must be " + dtypeName(DType::F32) + ", not " + dtypeName(t.dtype));
  return static_cast<float*>(t.data);
}

}  // namespace lckv
