// The op check, the op bench and a CPU backend switch as addon functions, for the tests and the
// benchmarks (engine/op_check.h, engine/op_bench.h, engine/backend.h).
#pragma once
#include <napi.h>

namespace lckv::addon {

// checkBackendOps({ backend: "cuda" | "cpu", dtype, seed }): every op on the given backend
// against the CPU backend with the same weight dtype, on fresh random inputs.
Napi::Value CheckBackendOps(const Napi::CallbackInfo& info);

// benchAttention({ backend: "cuda" | "cpu", sequences, context, numHeads, numKvHeads, headDim,
// iterations }): the attention of one decode step alone on a synthetic K/V pool (op_bench.h),
// returning { ms, bytes }: mean milliseconds per call and the bytes a call must move.
Napi::Value BenchAttention(const Napi::CallbackInfo& info);

// setCpuQueuedSampling(on): CPU backends of models loaded from then on queue their token choices
// as a GPU does (backend.h), for the tests of run-ahead's page bookkeeping.
Napi::Value SetCpuQueuedSampling(const Napi::CallbackInfo& info);

}  // namespace lckv::addon
