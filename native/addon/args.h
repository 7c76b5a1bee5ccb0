// Reading JavaScript arguments and options into engine values: typed numbers and flags that name
// the option in their error, the model description, sampling options and the backend option;
// and the one sampling result both wrapped classes return (a choice's log-probabilities).
// Every error is LCKV_INVALID_ARGUMENT unless said otherwise.
#pragma once
#include <napi.h>

#include <memory>
#include <string>
#include <vector>

#include "../engine/backend.h"
#include "../engine/config.h"
#include "../engine/sampling.h"

namespace lckv::addon {

// o[key] as a 32-bit integer; when absent, an error if required, else def.
int getInt(const Napi::Object& o, const char* key, bool required = true, int def = 0);
// o[key] as a number, def when absent.
double getNum(const Napi::Object& o, const char* key, double def);
// o[key] as a boolean, def when absent.
bool getBool(const Napi::Object& o, const char* key, bool def);
// o[key] as an array of numbers (required).
std::vector<double> getNumArray(const Napi::Object& o, const char* key);
std::vector<int> toInts(const std::vector<double>& d);

// The model description new NativeModel() takes (lib/native.ts NativeModelDescription).
ModelConfig parseConfig(const Napi::Object& o);
// A sampling object of append() or decodeBatch().
SamplingParams parseSampling(const Napi::Object& so);
// {logprob, topTokens: Int32Array, topLogprobs: Float64Array} (lib/native.ts NativeTokenLogprobs).
Napi::Object logprobsToJs(Napi::Env env, const TokenLogprobs& lp);

// The weights' type as the options spell it: "f32", "f16" or "bf16" (false for any other name).
bool parseWeightDtype(const std::string& name, DType& out);
// o[key] as a weights' type into out, which keeps its value when the key is absent; false when
// it is present and not one.
bool getWeightDtype(const Napi::Object& o, const char* key, DType& out);

// The backend a JavaScript option names: "cpu" or "cuda" (typed errors for any other name and
// for a build without CUDA). Throws EngineError, for the caller's runEngineCall.
std::unique_ptr<Backend> createNamedBackend(const std::string& name, int threads, DType weights, int device = 0,
                                            bool graphs = true);

}  // namespace lckv::addon
