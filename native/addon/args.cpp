// Reading JavaScript arguments and options into engine values (args.h).
#include "args.h"

#include <algorithm>
#include <cstdint>

#include "../engine/errors.h"
#include "engine_call.h"

namespace lckv::addon {

bool parseWeightDtype(const std::string& name, DType& out) {
  if (name == "f32") out = DType::F32;
  else if (name == "f16") out = DType::F16;
  else if (name == "bf16") out = DType::BF16;
  else return false;
  return true;
}

bool getWeightDtype(const Napi::Object& o, const char* key, DType& out) {
  const Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return true;
  return v.IsString() && parseWeightDtype(v.As<Napi::String>(), out);
}

std::unique_ptr<Backend> createNamedBackend(const std::string& name, int threads, DType weights, int device,
                                            bool graphs) {
  if (name == "cpu") return createCpuBackend(threads, weights);
  if (name != "cuda") throw EngineError(kErrInvalidArgument, "backend must be \"cpu\" or \"cuda\"");
#ifdef LCKV_WITH_CUDA
  return createCudaBackend(device, weights, graphs);
#else
  throw EngineError(kErrDeviceUnavailable, "this build of lckv has no CUDA backend");
#endif
}

int getInt(const Napi::Object& o, const char* key, bool required, int def) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) {
    if (required) throwInvalid(o.Env(), std::string("model description lacks '") + key + "'");
    return def;
  }
  if (!v.IsNumber()) throwInvalid(o.Env(), std::string("'") + key + "' must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d != (double)(int64_t)d || d < -2147483648.0 || d > 2147483647.0)
    throwInvalid(o.Env(), std::string("'") + key + "' must be a 32-bit integer");
  return (int)d;
}

double getNum(const Napi::Object& o, const char* key, double def) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return def;
  if (!v.IsNumber()) throwInvalid(o.Env(), std::string("'") + key + "' must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

bool getBool(const Napi::Object& o, const char* key, bool def) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return def;
  if (!v.IsBoolean()) throwInvalid(o.Env(), std::string("'") + key + "' must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

std::vector<double> getNumArray(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsArray()) throwInvalid(o.Env(), std::string("'") + key + "' must be an array of numbers");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<double> out(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    if (!e.IsNumber()) throwInvalid(o.Env(), std::string("'") + key + "' must be an array of numbers");
    out[i] = e.As<Napi::Number>().DoubleValue();
  }
  return out;
}

std::vector<int> toInts(const std::vector<double>& d) { return std::vector<int>(d.begin(), d.end()); }

ModelConfig parseConfig(const Napi::Object& o) {
  ModelConfig c;
  Napi::Value style = o.Get("style");
  if (!style.IsString()) throwInvalid(o.Env(), "'style' must be \"llama\" or \"gpt2\"");
  std::string s = style.As<Napi::String>();
  if (s == "llama") c.style = BlockStyle::Llama;
  else if (s == "gpt2") c.style = BlockStyle::Gpt2;
  else throwInvalid(o.Env(), "'style' must be \"llama\" or \"gpt2\"");
  c.numLayers = getInt(o, "numLayers");
  c.hidden = getInt(o, "hidden");
  c.numHeads = getInt(o, "numHeads");
  c.numKvHeads = getInt(o, "numKvHeads");
  c.headDim = getInt(o, "headDim");
  c.intermediate = getInt(o, "intermediate");
  c.vocab = getInt(o, "vocab");
  c.maxPositions = getInt(o, "maxPositions", false, 0);
  c.normEps = (float)getNum(o, "normEps", 1e-5);
  c.tiedEmbeddings = getBool(o, "tiedEmbeddings", false);
  c.attentionBias = getBool(o, "attentionBias", false);
  c.mlpBias = getBool(o, "mlpBias", false);
  if (c.style == BlockStyle::Llama) {
    for (double f : getNumArray(o, "ropeInvFreq")) c.ropeInvFreq.push_back((float)f);
    c.ropeAttentionScale = (float)getNum(o, "ropeAttentionScale", 1.0);
  }
  Napi::Value pv = o.Get("plan");
  if (!pv.IsObject()) throwInvalid(o.Env(), "model description lacks 'plan'");
  Napi::Object p = pv.As<Napi::Object>();
  c.plan.target = toInts(getNumArray(p, "target"));
  for (double d : getNumArray(p, "strict")) c.plan.strict.push_back(d != 0);
  c.plan.window = toInts(getNumArray(p, "window"));
  c.plan.kvLayers = toInts(getNumArray(p, "kvLayers"));
  c.plan.kvSlot.assign((size_t)std::max(0, c.numLayers), -1);
  for (size_t s2 = 0; s2 < c.plan.kvLayers.size(); ++s2) {
    int l = c.plan.kvLayers[s2];
    if (l < 0 || l >= c.numLayers) throwInvalid(o.Env(), "plan.kvLayers entry out of range");
    c.plan.kvSlot[(size_t)l] = (int)s2;
  }
  c.plan.cyclicLow = getInt(p, "cyclicLow", false, -1);
  c.plan.cyclicHigh = getInt(p, "cyclicHigh", false, -1);
  return c;
}

SamplingParams parseSampling(const Napi::Object& so) {
  SamplingParams sp;
  sp.temperature = (float)getNum(so, "temperature", 0);
  sp.topK = getInt(so, "topK", false, 0);
  sp.topP = (float)getNum(so, "topP", 1);
  sp.minP = (float)getNum(so, "minP", 0);
  sp.repetitionPenalty = (float)getNum(so, "repetitionPenalty", 1);
  sp.seed = (uint64_t)(int64_t)getNum(so, "seed", 0);
  sp.presencePenalty = (float)getNum(so, "presencePenalty", 0);
  sp.frequencyPenalty = (float)getNum(so, "frequencyPenalty", 0);
  sp.penaltyFrom = getInt(so, "penaltyFrom", false, 0);
  sp.logprobs = getInt(so, "logprobs", false, -1);
  if (sp.logprobs < -1) throwInvalid(so.Env(), "'logprobs' must be -1 (none) or a count of top tokens");
  // logitBias: {tokens: Int32Array, values: Float32Array} of one length.
  Napi::Value bv = so.Get("logitBias");
  if (!bv.IsUndefined()) {
    if (!bv.IsObject()) throwInvalid(so.Env(), "'logitBias' must be {tokens: Int32Array, values: Float32Array}");
    Napi::Object b = bv.As<Napi::Object>();
    Napi::Value tv = b.Get("tokens"), vv = b.Get("values");
    if (!tv.IsTypedArray() || tv.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array || !vv.IsTypedArray() ||
        vv.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      throwInvalid(so.Env(), "'logitBias' must be {tokens: Int32Array, values: Float32Array}");
    Napi::Int32Array t = tv.As<Napi::Int32Array>();
    Napi::Float32Array v = vv.As<Napi::Float32Array>();
    if (t.ElementLength() != v.ElementLength()) throwInvalid(so.Env(), "'logitBias': tokens and values differ in length");
    sp.logitBias.reserve(t.ElementLength());
    for (size_t i = 0; i < t.ElementLength(); ++i) sp.logitBias.emplace_back(t[i], v[i]);
  }
  return sp;
}

Napi::Object logprobsToJs(Napi::Env env, const TokenLogprobs& lp) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("logprob", Napi::Number::New(env, lp.logprob));
  Napi::Int32Array t = Napi::Int32Array::New(env, lp.topTokens.size());
  Napi::Float64Array v = Napi::Float64Array::New(env, lp.topLogprobs.size());
  for (size_t i = 0; i < lp.topTokens.size(); ++i) {
    t[i] = lp.topTokens[i];
    v[i] = lp.topLogprobs[i];
  }
  o.Set("topTokens", t);
  o.Set("topLogprobs", v);
  return o;
}

}  // namespace lckv::addon
