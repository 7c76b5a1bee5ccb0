// The op check and op bench hooks (op_hooks.h).
#include "op_hooks.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../engine/op_bench.h"
#include "../engine/op_check.h"
#include "args.h"
#include "engine_call.h"

namespace lckv::addon {

Napi::Value CheckBackendOps(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
  std::string backend = o.Get("backend").IsString() ? std::string(o.Get("backend").As<Napi::String>()) : "cuda";
  DType w = DType::BF16;
  if (!getWeightDtype(o, "dtype", w))
    throwInvalid(env, "checkBackendOps: dtype must be \"f32\", \"f16\" or \"bf16\" (the weights' type)");
  const uint64_t seed = (uint64_t)getNum(o, "seed", 1);
  // ops: names (or first words) of the op families to check (op_check.h); absent: all of them.
  std::vector<std::string> ops;
  if (!o.Get("ops").IsUndefined()) {
    if (!o.Get("ops").IsArray()) throwInvalid(env, "checkBackendOps: 'ops' must be an array of op names");
    Napi::Array a = o.Get("ops").As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
      if (!a.Get(i).IsString()) throwInvalid(env, "checkBackendOps: 'ops' must be an array of op names");
      ops.push_back(a.Get(i).As<Napi::String>());
    }
  }
  return runEngineCall(env, [&] {
    std::unique_ptr<Backend> ref = createCpuBackend((int)std::max(1u, std::thread::hardware_concurrency()), w);
    std::unique_ptr<Backend> test = createNamedBackend(backend, 1, w);
    auto results = checkBackendOps(*ref, *test, seed, ops);
    Napi::Array arr = Napi::Array::New(env, results.size());
    for (size_t i = 0; i < results.size(); ++i) {
      Napi::Object r = Napi::Object::New(env);
      r.Set("op", results[i].op);
      r.Set("shape", results[i].shape);
      r.Set("relErr", results[i].relErr);
      r.Set("tolerance", results[i].tolerance);
      r.Set("allWritten", results[i].allWritten);
      arr.Set((uint32_t)i, r);
    }
    return arr;
  });
}

Napi::Value BenchAttention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwInvalid(env, "benchAttention takes an options object");
  Napi::Object o = info[0].As<Napi::Object>();
  std::string backend = o.Get("backend").IsString() ? std::string(o.Get("backend").As<Napi::String>()) : "cuda";
  if (backend != "cuda" && backend != "cpu") throwInvalid(env, "benchAttention: backend must be 'cuda' or 'cpu'");
  AttentionBenchShape shape;
  shape.sequences = getInt(o, "sequences", false, 0);
  shape.context = getInt(o, "context", false, 0);
  shape.numHeads = getInt(o, "numHeads", false, 0);
  shape.numKvHeads = getInt(o, "numKvHeads", false, 0);
  shape.headDim = getInt(o, "headDim", false, 0);
  shape.iterations = getInt(o, "iterations", false, 10);
  shape.queries = getInt(o, "queries", false, 1);
  if (!getWeightDtype(o, "dtype", shape.weights) || shape.weights == DType::F16)
    throwInvalid(env, "benchAttention: dtype must be \"f32\" or \"bf16\" (the weights' type, which sets the output's)");
  if (o.Has("kvCacheDtype") && !o.Get("kvCacheDtype").IsUndefined() &&
      (!o.Get("kvCacheDtype").IsString() || !parseKvType(std::string(o.Get("kvCacheDtype").As<Napi::String>()).c_str(), shape.kvType)))
    throwInvalid(env, "benchAttention: kvCacheDtype must be one of \"f32\", \"bf16\", \"fp8\", \"int8\", \"int4\"");
  return runEngineCall(env, [&] {
    std::unique_ptr<Backend> be = createNamedBackend(backend, (int)std::max(1u, std::thread::hardware_concurrency()), shape.weights);
    const AttentionBenchResult r = benchAttention(*be, shape);
    Napi::Object result = Napi::Object::New(env);
    result.Set("ms", r.ms);
    result.Set("bytes", r.bytes);
    result.Set("flops", r.flops);
    return result;
  });
}

Napi::Value SetCpuQueuedSampling(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) throwInvalid(env, "setCpuQueuedSampling takes a boolean");
  setCpuQueuedSampling(info[0].As<Napi::Boolean>().Value());
  return env.Undefined();
}

}  // namespace lckv::addon
