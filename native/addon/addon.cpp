// N-API surface of the engine. Heavy calls (loading tensors, append) run in AsyncWorkers off
// the JavaScript thread and settle a Promise; errors carry a `code` that lib/errors.ts maps to
// a typed error. Objects hold shared_ptrs, so dispose() during an in-flight call is safe: the
// call finishes on the state it started with, and later calls are refused.
#include <napi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "../engine/errors.h"
#include "../engine/model.h"
#include "../engine/op_bench.h"
#include "../engine/op_check.h"

using namespace lckv;

namespace {

Napi::Error makeError(Napi::Env env, const std::string& code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

[[noreturn]] void throwInvalid(Napi::Env env, const std::string& msg) {
  throw makeError(env, kErrInvalidArgument, msg);
}

// An AsyncWorker that settles a Promise and keeps the engine's error code.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  // Runs fn, turning every exception into a stored error (never lets one escape a thread).
  template <typename Fn>
  void guard(Fn&& fn) {
    try {
      fn();
    } catch (const EngineError& e) {
      code_ = e.code;
      SetError(e.what());
    } catch (const std::bad_alloc&) {
      code_ = kErrOutOfMemory;
      SetError("out of memory");
    } catch (const std::exception& e) {
      code_ = "LCKV_INTERNAL";
      SetError(e.what());
    }
  }
  void OnError(const Napi::Error& e) override {
    Napi::Error err = makeError(Env(), code_.empty() ? "LCKV_INTERNAL" : code_, e.Message());
    deferred_.Reject(err.Value());
  }
  Napi::Promise::Deferred deferred_;
  std::string code_;
};

// The backend a JavaScript option names: "cpu" or "cuda" (typed errors for any other name and
// for a build without CUDA).
std::unique_ptr<Backend> createNamedBackend(const std::string& name, int threads, DType weights, int device = 0,
                                            bool graphs = true) {
  if (name == "cpu") return createCpuBackend(threads, weights);
  if (name != "cuda") throw EngineError(kErrInvalidArgument, "backend must be \"cpu\" or \"cuda\"");
#ifdef LCKV_WITH_CUDA
  return createCudaBackend(device, weights, graphs);
#else
  throw EngineError("LCKV_DEVICE_UNAVAILABLE", "this build of lckv has no CUDA backend");
#endif
}

// ---- argument helpers ------------------------------------------------------------------------

int getInt(const Napi::Object& o, const char* key, bool required = true, int def = 0) {
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

// ---- Sequence --------------------------------------------------------------------------------

struct SharedModel {
  std::unique_ptr<Model> model;
};

struct SharedSequence {
  std::shared_ptr<SharedModel> owner;
  std::unique_ptr<SequenceState> state;
  // Claimed on the JS thread before a worker starts and released on the JS thread when its
  // result has been read, so state is never touched by two threads at once.
  std::atomic<bool> busy{false};
  // What JS may read at any time (state changes on a worker thread while a forward runs).
  int length = 0;
  double kvBytes = 0;
  void publish() {
    length = state->length();
    kvBytes = (double)state->kv->bytes();
  }
};

// Per-environment data: a constructor reference must not outlive the environment (worker
// threads each load the addon into their own environment).
struct AddonData {
  Napi::FunctionReference sequenceCtor;
};

class SequenceWrap : public Napi::ObjectWrap<SequenceWrap> {
 public:
  static void Init(Napi::Env env, AddonData* data) {
    Napi::Function f = DefineClass(env, "NativeSequence",
                                   {InstanceMethod("append", &SequenceWrap::Append),
                                    InstanceMethod("truncate", &SequenceWrap::Truncate),
                                    InstanceMethod("fork", &SequenceWrap::Fork),
                                    InstanceMethod("dispose", &SequenceWrap::Dispose),
                                    InstanceMethod("reserve", &SequenceWrap::Reserve),
                                    InstanceMethod("shift", &SequenceWrap::Shift),
                                    InstanceMethod("pagesToReserve", &SequenceWrap::PagesToReserve),
                                    InstanceMethod("pagesToShift", &SequenceWrap::PagesToShift),
                                    InstanceMethod("setCached", &SequenceWrap::SetCached),
                                    InstanceAccessor("reservedPages", &SequenceWrap::ReservedPages, nullptr),
                                    InstanceAccessor("length", &SequenceWrap::Length, nullptr),
                                    InstanceAccessor("kvBytes", &SequenceWrap::KvBytes, nullptr)});
    data->sequenceCtor = Napi::Persistent(f);
  }
  explicit SequenceWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SequenceWrap>(info) {}
  std::shared_ptr<SharedSequence> seq;

  static Napi::Object Wrap(Napi::Env env, std::shared_ptr<SharedSequence> s) {
    Napi::Object obj = env.GetInstanceData<AddonData>()->sequenceCtor.New({});
    s->publish();
    Unwrap(obj)->seq = std::move(s);
    return obj;
  }
  static bool IsSequence(Napi::Env env, const Napi::Value& v) {
    return v.IsObject() && v.As<Napi::Object>().InstanceOf(env.GetInstanceData<AddonData>()->sequenceCtor.Value());
  }

 private:
  std::shared_ptr<SharedSequence> live(Napi::Env env) {
    if (!seq) throw makeError(env, kErrDisposed, "the sequence has been disposed");
    return seq;
  }
  Napi::Value Append(const Napi::CallbackInfo& info);
  Napi::Value Shift(const Napi::CallbackInfo& info);
  Napi::Value Truncate(const Napi::CallbackInfo& info) {
    auto s = live(info.Env());
    if (s->busy) throw makeError(info.Env(), kErrBusy, "the sequence is running a forward");
    if (!info[0].IsNumber()) throwInvalid(info.Env(), "truncate(n) needs a number");
    double n = info[0].As<Napi::Number>().DoubleValue();
    if (n != (double)(int64_t)n || n < INT32_MIN || n > INT32_MAX)
      throwInvalid(info.Env(), "truncate(n): n must be an integer in [0, " + std::to_string(s->state->length()) + "]");
    try {  // the range is the model's to check
      s->owner->model->truncateSequence(*s->state, (int)n);  // pages past the new end go back to the pool
    } catch (const EngineError& e) {
      throw makeError(info.Env(), e.code, e.what());
    }
    s->publish();
    return info.Env().Undefined();
  }
  // reserve(totalTokens, extraPages = 0, decodeFrom?): promises the pages this sequence needs
  // to grow to totalTokens, plus extraPages (a context shift's copies); nothing to grow and no
  // extra pages drop the promise. decodeFrom: past that many tokens it grows by decoding, a
  // token at a time, so a model whose every layer is windowed promises only its window's pages
  // beyond the prefill's (KvPages::reserve). Throws LCKV_KV_CACHE_FULL when the pool cannot
  // promise them now.
  Napi::Value Reserve(const Napi::CallbackInfo& info) {
    auto s = live(info.Env());
    if (s->busy) throw makeError(info.Env(), kErrBusy, "the sequence is running a forward");
    const int total = tokenCount(info, "reserve");
    const int extra = extraPages(info, "reserve");
    try {
      s->state->kv->reserve(s->state->length(), total, extra, growth(info, *s, "reserve"));
    } catch (const EngineError& e) {
      throw makeError(info.Env(), e.code, e.what());
    }
    return info.Env().Undefined();
  }
  // pagesToReserve(totalTokens, extraPages = 0, decodeFrom?): the pages reserve() with these
  // arguments promises.
  Napi::Value PagesToReserve(const Napi::CallbackInfo& info) {
    auto s = live(info.Env());
    if (s->busy) throw makeError(info.Env(), kErrBusy, "the sequence is running a forward");
    const int total = tokenCount(info, "pagesToReserve");
    const int extra = extraPages(info, "pagesToReserve");
    return Napi::Number::New(info.Env(), s->state->kv->pagesToReserve(s->state->length(), total, extra, growth(info, *s, "pagesToReserve")));
  }
  static int extraPages(const Napi::CallbackInfo& info, const char* what) {
    if (info.Length() < 2 || info[1].IsUndefined()) return 0;
    const int e = countArg(info, 1);
    if (e < 0) throwInvalid(info.Env(), std::string(what) + "(totalTokens, extraPages): extraPages must be an integer >= 0");
    return e;
  }
  // The third argument, decodeFrom, as KvPages::Growth (no window cap without it).
  static KvPages::Growth growth(const Napi::CallbackInfo& info, const SharedSequence& s, const char* what) {
    if (info.Length() < 3 || info[2].IsUndefined()) return {};
    const int d = countArg(info, 2);
    if (d < 0) throwInvalid(info.Env(), std::string(what) + "(totalTokens, extraPages, decodeFrom): decodeFrom must be an integer >= 0");
    return {s.owner->model->decodeWindowPages(), d};
  }
  // pagesToShift(sink, drop): pages shift(sink, drop) would take beyond those it frees.
  Napi::Value PagesToShift(const Napi::CallbackInfo& info) {
    auto s = live(info.Env());
    if (s->busy) throw makeError(info.Env(), kErrBusy, "the sequence is running a forward");
    if (!info[0].IsNumber() || !info[1].IsNumber()) throwInvalid(info.Env(), "pagesToShift(sink, drop) needs two numbers");
    try {
      return Napi::Number::New(info.Env(), s->owner->model->pagesToShift(*s->state, info[0].As<Napi::Number>().Int32Value(),
                                                                          info[1].As<Napi::Number>().Int32Value()));
    } catch (const EngineError& e) {
      throw makeError(info.Env(), e.code, e.what());
    }
  }
  Napi::Value SetCached(const Napi::CallbackInfo& info) {
    auto s = live(info.Env());
    s->state->kv->setCached(info[0].ToBoolean().Value());
    return info.Env().Undefined();
  }
  Napi::Value ReservedPages(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), seq ? seq->state->kv->reserved() : 0);
  }
  // Argument i as an integer in [0, 1e9] (token and page counts); -1 when it is not one.
  static int countArg(const Napi::CallbackInfo& info, size_t i) {
    const double v = info[i].IsNumber() ? info[i].As<Napi::Number>().DoubleValue() : -1;
    return v >= 0 && v <= 1e9 && v == (double)(int64_t)v ? (int)v : -1;
  }
  static int tokenCount(const Napi::CallbackInfo& info, const char* what) {
    if (!info[0].IsNumber()) throwInvalid(info.Env(), std::string(what) + "(totalTokens) needs a number");
    const int t = countArg(info, 0);
    if (t < 0) throwInvalid(info.Env(), std::string(what) + "(totalTokens): an integer in [0, 1e9] is needed");
    return t;
  }
  Napi::Value Fork(const Napi::CallbackInfo& info) {
    auto s = live(info.Env());
    if (s->busy) throw makeError(info.Env(), kErrBusy, "the sequence is running a forward");
    auto child = std::make_shared<SharedSequence>();
    child->owner = s->owner;
    // No model lock: the fork shares the source's pages (the pool locks its own counts), and
    // the JS thread must not wait for other sequences' forwards.
    try {
      child->state = s->owner->model->forkSequence(*s->state);
    } catch (const EngineError& e) {
      throw makeError(info.Env(), e.code, e.what());
    }
    return Wrap(info.Env(), child);
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    seq.reset();
    return info.Env().Undefined();
  }
  Napi::Value Length(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), seq ? seq->length : 0);
  }
  Napi::Value KvBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), seq ? seq->kvBytes : 0);
  }
};

class AppendWorker : public PromiseWorker {
 public:
  AppendWorker(Napi::Env env, std::shared_ptr<SharedSequence> s, std::vector<int32_t> tokens, PrefillSpec prefill,
               LogitsWanted logits, bool sample, SamplingParams sp, Napi::Value cancel)
      : PromiseWorker(env), s_(std::move(s)), tokens_(std::move(tokens)), prefill_(prefill), logits_(logits),
        sample_(sample), sp_(sp) {
    // The flag's buffer stays alive while the worker reads it.
    if (cancel.IsTypedArray()) cancelRef_ = Napi::Persistent(cancel.As<Napi::Object>());
  }
  void Execute() override {
    guard([&] {
      Model& m = *s_->owner->model;
      std::lock_guard<std::mutex> lk(m.mutex());
      res_ = m.append(*s_->state, tokens_, prefill_, logits_, sample_ ? &sp_ : nullptr);
    });
  }
  void OnError(const Napi::Error& e) override {
    s_->publish();
    s_->busy = false;
    PromiseWorker::OnError(e);
  }
  void OnOK() override {
    Napi::Env env = Env();
    s_->publish();
    s_->busy = false;
    Napi::Object r = Napi::Object::New(env);
    r.Set("passes", Napi::Number::New(env, res_.passes));
    r.Set("length", Napi::Number::New(env, s_->length));
    if (!res_.logits.empty()) {
      Napi::Float32Array a = Napi::Float32Array::New(env, res_.logits.size());
      std::memcpy(a.Data(), res_.logits.data(), res_.logits.size() * sizeof(float));
      r.Set("logits", a);
    }
    if (sample_) r.Set("token", Napi::Number::New(env, res_.sampled));
    deferred_.Resolve(r);
  }

 private:
  std::shared_ptr<SharedSequence> s_;
  std::vector<int32_t> tokens_;
  PrefillSpec prefill_;
  LogitsWanted logits_;
  bool sample_;
  SamplingParams sp_;
  Napi::ObjectReference cancelRef_;
  AppendResult res_;
};

// A context shift runs under the model lock (it uses the backend), off the JS thread.
class ShiftWorker : public PromiseWorker {
 public:
  ShiftWorker(Napi::Env env, std::shared_ptr<SharedSequence> s, int sink, int drop)
      : PromiseWorker(env), s_(std::move(s)), sink_(sink), drop_(drop) {}
  void Execute() override {
    guard([&] {
      Model& m = *s_->owner->model;
      std::lock_guard<std::mutex> lk(m.mutex());
      m.shiftSequence(*s_->state, sink_, drop_);
    });
  }
  void OnError(const Napi::Error& e) override {
    s_->publish();
    s_->busy = false;
    PromiseWorker::OnError(e);
  }
  void OnOK() override {
    s_->publish();
    s_->busy = false;
    deferred_.Resolve(Napi::Number::New(Env(), s_->length));
  }

 private:
  std::shared_ptr<SharedSequence> s_;
  int sink_, drop_;
};

SamplingParams parseSampling(const Napi::Object& so) {
  SamplingParams sp;
  sp.temperature = (float)getNum(so, "temperature", 0);
  sp.topK = getInt(so, "topK", false, 0);
  sp.topP = (float)getNum(so, "topP", 1);
  sp.minP = (float)getNum(so, "minP", 0);
  sp.repetitionPenalty = (float)getNum(so, "repetitionPenalty", 1);
  sp.seed = (uint64_t)(int64_t)getNum(so, "seed", 0);
  return sp;
}

// append(tokens: Int32Array, opts: {mode, passes, logits: "none"|"last"|"all", sample?: {...}})
// shift(sink, drop) -> Promise<length>: drops tokens [sink, sink + drop) (whole pages).
Napi::Value SequenceWrap::Shift(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = live(env);
  if (!info[0].IsNumber() || !info[1].IsNumber()) throwInvalid(env, "shift(sink, drop) needs two numbers");
  const int sink = info[0].As<Napi::Number>().Int32Value(), drop = info[1].As<Napi::Number>().Int32Value();
  bool expected = false;
  if (!s->busy.compare_exchange_strong(expected, true))
    throw makeError(env, kErrBusy, "the sequence is already running a forward; await the previous call");
  auto* w = new ShiftWorker(env, s, sink, drop);
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

Napi::Value SequenceWrap::Append(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = live(env);
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throwInvalid(env, "append: tokens must be an Int32Array");
  Napi::Int32Array t = info[0].As<Napi::Int32Array>();
  std::vector<int32_t> tokens(t.Data(), t.Data() + t.ElementLength());
  Napi::Object o = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
  PrefillSpec prefill;
  Napi::Value mv = o.Get("mode");
  if (mv.IsString()) {
    std::string m = mv.As<Napi::String>();
    if (m == "fixed-point") prefill.mode = PrefillMode::FixedPoint;
    else if (m == "sequential") prefill.mode = PrefillMode::Sequential;
    else if (m == "iterative") prefill.mode = PrefillMode::Iterative;
    else throwInvalid(env, "append: mode must be \"fixed-point\", \"sequential\" or \"iterative\"");
  }
  prefill.passes = getInt(o, "passes", false, 1);
  prefill.tolerance = getNum(o, "tolerance", 0.0);
  if (!(prefill.tolerance >= 0)) throwInvalid(env, "append: tolerance must be >= 0");
  // cancel: an Int32Array (over a SharedArrayBuffer) whose first element JavaScript sets to stop.
  Napi::Value cv = o.Get("cancel");
  if (!cv.IsUndefined()) {
    if (!cv.IsTypedArray() || cv.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array || cv.As<Napi::Int32Array>().ElementLength() < 1)
      throwInvalid(env, "append: cancel must be an Int32Array of at least one element");
    prefill.cancel = cv.As<Napi::Int32Array>().Data();
  }
  LogitsWanted lw = LogitsWanted::None;
  Napi::Value lv = o.Get("logits");
  if (lv.IsString()) {
    std::string l = lv.As<Napi::String>();
    if (l == "last") lw = LogitsWanted::Last;
    else if (l == "all") lw = LogitsWanted::All;
    else if (l != "none") throwInvalid(env, "append: logits must be \"none\", \"last\" or \"all\"");
  }
  bool sample = false;
  SamplingParams sp;
  Napi::Value sv = o.Get("sample");
  if (sv.IsObject()) {
    sample = true;
    sp = parseSampling(sv.As<Napi::Object>());
  }
  bool expected = false;
  if (!s->busy.compare_exchange_strong(expected, true))
    throw makeError(env, kErrBusy, "the sequence is already running a forward; await the previous call");
  auto* w = new AppendWorker(env, s, std::move(tokens), prefill, lw, sample, sp, cv);
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

// ---- Model -----------------------------------------------------------------------------------

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports) {
    Napi::Function f = DefineClass(env, "NativeModel",
                                   {InstanceMethod("loadTensors", &ModelWrap::LoadTensors),
                                    InstanceMethod("decodeBatch", &ModelWrap::DecodeBatch),
                                    InstanceMethod("finalize", &ModelWrap::Finalize),
                                    InstanceMethod("createSequence", &ModelWrap::CreateSequence),
                                    InstanceMethod("createPool", &ModelWrap::CreatePool),
                                    InstanceMethod("poolStats", &ModelWrap::PoolStats),
                                    InstanceMethod("auditPool", &ModelWrap::AuditPool),
                                    InstanceMethod("memoryInfo", &ModelWrap::MemoryInfo),
                                    InstanceMethod("dispose", &ModelWrap::Dispose),
                                    InstanceAccessor("weightBytes", &ModelWrap::WeightBytes, nullptr),
                                    InstanceAccessor("backend", &ModelWrap::BackendName, nullptr)});
    exports.Set("NativeModel", f);
  }

  // new NativeModel(description, { backend: "cpu", threads })
  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    Napi::Env env = info.Env();
    if (!info[0].IsObject()) throwInvalid(env, "NativeModel needs a model description object");
    ModelConfig cfg = parseConfig(info[0].As<Napi::Object>());
    Napi::Object opts = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
    std::string backend = "cpu";
    if (opts.Get("backend").IsString()) backend = opts.Get("backend").As<Napi::String>();
    int threads = getInt(opts, "threads", false, 0);
    if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
    try {
      std::unique_ptr<Backend> be;
      std::string dt = opts.Get("dtype").IsString() ? std::string(opts.Get("dtype").As<Napi::String>()) : "f32";
      if (dt != "f32" && dt != "f16" && dt != "bf16") throw EngineError(kErrInvalidArgument, "dtype must be f32, f16 or bf16");
      const DType w = dt == "f32" ? DType::F32 : dt == "f16" ? DType::F16 : DType::BF16;
      const bool graphs = !opts.Get("cudaGraphs").IsBoolean() || opts.Get("cudaGraphs").As<Napi::Boolean>().Value();
      be = createNamedBackend(backend, threads, w, getInt(opts, "deviceIndex", false, 0), graphs);
      shared_ = std::make_shared<SharedModel>();
      shared_->model = std::make_unique<Model>(std::move(cfg), std::move(be));
      shared_->model->setRunAhead(!opts.Get("runAhead").IsBoolean() || opts.Get("runAhead").As<Napi::Boolean>().Value());
    } catch (const EngineError& e) {
      throw makeError(env, e.code, e.what());
    } catch (const std::bad_alloc&) {
      throw makeError(env, kErrOutOfMemory, "out of memory creating the backend");
    }
  }

 private:
  std::shared_ptr<SharedModel> live(Napi::Env env) {
    if (!shared_) throw makeError(env, kErrDisposed, "the model has been disposed");
    return shared_;
  }

  class LoadWorker : public PromiseWorker {
   public:
    LoadWorker(Napi::Env env, std::shared_ptr<SharedModel> m, std::vector<TensorSource> src)
        : PromiseWorker(env), m_(std::move(m)), src_(std::move(src)) {}
    void Execute() override {
      guard([&] {
        std::lock_guard<std::mutex> lk(m_->model->mutex());
        for (const auto& s : src_) m_->model->loadTensor(s);
      });
    }
    void OnOK() override { deferred_.Resolve(Env().Undefined()); }

   private:
    std::shared_ptr<SharedModel> m_;
    std::vector<TensorSource> src_;
  };

  // loadTensors([{name, sourceName, file, offset, nbytes, dtype, shape, transpose?, slice?}])
  Napi::Value LoadTensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = live(env);
    if (!info[0].IsArray()) throwInvalid(env, "loadTensors needs an array");
    Napi::Array a = info[0].As<Napi::Array>();
    std::vector<TensorSource> src;
    for (uint32_t i = 0; i < a.Length(); ++i) {
      if (!a.Get(i).IsObject()) throwInvalid(env, "loadTensors: entries must be objects");
      Napi::Object o = a.Get(i).As<Napi::Object>();
      TensorSource s;
      auto str = [&](const char* k) -> std::string {
        if (!o.Get(k).IsString()) throwInvalid(env, std::string("loadTensors: '") + k + "' must be a string");
        return o.Get(k).As<Napi::String>();
      };
      s.name = str("name");
      s.sourceName = str("sourceName");
      s.file = str("file");
      double off = getNum(o, "offset", -1), nb = getNum(o, "nbytes", -1);
      if (off < 0 || nb < 0 || off > 9.0e15 || nb > 9.0e15) throwInvalid(env, "loadTensors: bad offset or nbytes");
      s.offset = (uint64_t)off;
      s.nbytes = (uint64_t)nb;
      std::string dt = str("dtype");
      if (dt == "F32") s.dtype = DType::F32;
      else if (dt == "F16") s.dtype = DType::F16;
      else if (dt == "BF16") s.dtype = DType::BF16;
      else throwInvalid(env, "loadTensors: dtype must be F32, F16 or BF16");
      for (double d : getNumArray(o, "shape")) s.shape.push_back((int64_t)d);
      s.transpose = getBool(o, "transpose", false);
      if (o.Get("slice").IsArray()) {
        auto sl = getNumArray(o, "slice");
        if (sl.size() != 2) throwInvalid(env, "loadTensors: slice must be [start, end]");
        s.sliceStart = (int64_t)sl[0];
        s.sliceEnd = (int64_t)sl[1];
      }
      src.push_back(std::move(s));
    }
    auto* w = new LoadWorker(env, m, std::move(src));
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  }

  class DecodeBatchWorker : public PromiseWorker {
   public:
    DecodeBatchWorker(Napi::Env env, std::shared_ptr<SharedModel> m, std::vector<std::shared_ptr<SharedSequence>> seqs,
                      std::vector<int32_t> tokens, std::vector<SamplingParams> params, bool runAhead)
        : PromiseWorker(env),
          m_(std::move(m)),
          seqs_(std::move(seqs)),
          tokens_(std::move(tokens)),
          params_(std::move(params)),
          runAhead_(runAhead) {}
    void Execute() override {
      guard([&] {
        std::vector<SequenceState*> states;
        for (auto& s : seqs_) states.push_back(s->state.get());
        std::lock_guard<std::mutex> lk(m_->model->mutex());
        out_ = m_->model->decodeBatch(states, tokens_, params_, runAhead_);
      });
    }
    void release() {
      for (auto& s : seqs_) {
        s->publish();
        s->busy = false;
      }
    }
    void OnError(const Napi::Error& e) override {
      release();
      PromiseWorker::OnError(e);
    }
    void OnOK() override {
      release();
      Napi::Int32Array a = Napi::Int32Array::New(Env(), out_.size());
      std::memcpy(a.Data(), out_.data(), out_.size() * sizeof(int32_t));
      deferred_.Resolve(a);
    }

   private:
    std::shared_ptr<SharedModel> m_;
    std::vector<std::shared_ptr<SharedSequence>> seqs_;
    std::vector<int32_t> tokens_, out_;
    std::vector<SamplingParams> params_;
    bool runAhead_;
  };

  // decodeBatch(sequences: NativeSequence[], tokens: Int32Array, sampling: object[], runAhead = true)
  //   -> Promise<Int32Array>. runAhead false: the caller will not continue this batch next.
  Napi::Value DecodeBatch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = live(env);
    if (!info[0].IsArray() || !info[1].IsTypedArray() || !info[2].IsArray())
      throwInvalid(env, "decodeBatch(sequences, tokens: Int32Array, sampling[])");
    if (info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) throwInvalid(env, "decodeBatch: tokens must be an Int32Array");
    Napi::Array sa = info[0].As<Napi::Array>(), pa = info[2].As<Napi::Array>();
    Napi::Int32Array ta = info[1].As<Napi::Int32Array>();
    const uint32_t n = sa.Length();
    if (n == 0 || ta.ElementLength() != n || pa.Length() != n) throwInvalid(env, "decodeBatch: one token and one sampling object per sequence");
    std::vector<std::shared_ptr<SharedSequence>> seqs;
    std::vector<SamplingParams> params;
    for (uint32_t i = 0; i < n; ++i) {
      Napi::Value v = sa.Get(i);
      if (!SequenceWrap::IsSequence(env, v))
        throwInvalid(env, "decodeBatch: sequences must be NativeSequence objects");
      auto sq = SequenceWrap::Unwrap(v.As<Napi::Object>())->seq;
      if (!sq) throw makeError(env, kErrDisposed, "a sequence in the batch has been disposed");
      if (sq->owner != m) throwInvalid(env, "decodeBatch: a sequence belongs to another model");
      seqs.push_back(sq);
      if (!pa.Get(i).IsObject()) throwInvalid(env, "decodeBatch: sampling entries must be objects");
      params.push_back(parseSampling(pa.Get(i).As<Napi::Object>()));
    }
    if (info.Length() > 3 && !info[3].IsUndefined() && !info[3].IsBoolean()) throwInvalid(env, "decodeBatch: runAhead must be a boolean");
    const bool runAhead = info.Length() <= 3 || info[3].IsUndefined() || info[3].As<Napi::Boolean>().Value();
    // Claim every sequence, or none.
    for (size_t i = 0; i < seqs.size(); ++i) {
      bool expected = false;
      if (!seqs[i]->busy.compare_exchange_strong(expected, true)) {
        for (size_t j = 0; j < i; ++j) seqs[j]->busy = false;
        throw makeError(env, kErrBusy, "a sequence in the batch is already running a forward (or appears twice)");
      }
    }
    std::vector<int32_t> tokens(ta.Data(), ta.Data() + n);
    auto* w = new DecodeBatchWorker(env, m, std::move(seqs), std::move(tokens), std::move(params), runAhead);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  }

  // createPool(pages, pageTokens): allocates the K/V pool (once, after finalize).
  Napi::Value CreatePool(const Napi::CallbackInfo& info) {
    auto m = live(info.Env());
    if (!info[0].IsNumber() || !info[1].IsNumber()) throwInvalid(info.Env(), "createPool(pages, pageTokens) needs two numbers");
    const double pages = info[0].As<Napi::Number>().DoubleValue(), pageTokens = info[1].As<Napi::Number>().DoubleValue();
    if (!(pages >= 1 && pages <= 2147483647.0) || !(pageTokens >= 1 && pageTokens <= 65536))
      throwInvalid(info.Env(), "createPool: pages must be in [1, 2^31) and pageTokens in [1, 65536]");
    try {
      std::lock_guard<std::mutex> lk(m->model->mutex());
      m->model->createPool((int)pages, (int)pageTokens);
    } catch (const EngineError& e) {
      throw makeError(info.Env(), e.code, e.what());
    }
    return info.Env().Undefined();
  }
  Napi::Value PoolStats(const Napi::CallbackInfo& info) {
    auto m = live(info.Env());
    if (!m->model->hasPool()) throwInvalid(info.Env(), "the model has no K/V pool");
    const KvPoolStats st = m->model->pool().stats();
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("pageTokens", st.pageTokens);
    o.Set("pageBytes", (double)st.pageBytes);
    o.Set("pagesTotal", st.pagesTotal);
    o.Set("pagesUsed", st.pagesUsed);
    o.Set("pagesFree", st.pagesFree);
    o.Set("pagesCached", st.pagesCached);
    o.Set("pagesReserved", st.pagesReserved);
    o.Set("sharedRefs", (double)st.sharedRefs);
    return o;
  }
  // auditPool(): "" when every page's count matches the live page tables, else the mismatch.
  Napi::Value AuditPool(const Napi::CallbackInfo& info) {
    auto m = live(info.Env());
    return Napi::String::New(info.Env(), m->model->hasPool() ? m->model->pool().audit() : "");
  }
  Napi::Value MemoryInfo(const Napi::CallbackInfo& info) {
    auto m = live(info.Env());
    size_t freeBytes = 0, totalBytes = 0;
    try {
      m->model->backend().memoryInfo(freeBytes, totalBytes);
    } catch (const EngineError& e) {
      throw makeError(info.Env(), e.code, e.what());
    }
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("free", (double)freeBytes);
    o.Set("total", (double)totalBytes);
    int64_t recorded = 0, replayed = 0;
    m->model->backend().stepGraphStats(recorded, replayed);
    o.Set("stepGraphs", (double)recorded);
    o.Set("stepGraphReplays", (double)replayed);
    int64_t used = 0, discarded = 0;
    m->model->runAheadStats(used, discarded);
    o.Set("runAheadSteps", (double)used);
    o.Set("runAheadDiscarded", (double)discarded);
    return o;
  }

  Napi::Value Finalize(const Napi::CallbackInfo& info) {
    auto m = live(info.Env());
    try {
      std::lock_guard<std::mutex> lk(m->model->mutex());
      m->model->finalize();
    } catch (const EngineError& e) {
      throw makeError(info.Env(), e.code, e.what());
    }
    return info.Env().Undefined();
  }

  Napi::Value CreateSequence(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = live(env);
    if (!info[0].IsNumber()) throwInvalid(env, "createSequence(maxContext) needs a number");
    int maxContext = info[0].As<Napi::Number>().Int32Value();
    auto s = std::make_shared<SharedSequence>();
    s->owner = m;
    // No model lock: a new store shares nothing with running forwards, and taking the lock here
    // would block the JS thread for as long as another sequence's forward runs.
    try {
      s->state = m->model->createSequence(maxContext);
    } catch (const EngineError& e) {
      throw makeError(env, e.code, e.what());
    }
    return SequenceWrap::Wrap(env, s);
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    shared_.reset();
    return info.Env().Undefined();
  }
  Napi::Value WeightBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), shared_ ? (double)shared_->model->weightBytes() : 0);
  }
  Napi::Value BackendName(const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), shared_ ? shared_->model->backend().name() : "disposed");
  }

  std::shared_ptr<SharedModel> shared_;
};

// checkBackendOps({ backend: "cuda" | "cpu", dtype, seed }): every op on the given backend
// against the CPU backend with the same weight dtype, on fresh random inputs.
Napi::Value CheckBackendOps(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
  std::string backend = o.Get("backend").IsString() ? std::string(o.Get("backend").As<Napi::String>()) : "cuda";
  std::string dt = o.Get("dtype").IsString() ? std::string(o.Get("dtype").As<Napi::String>()) : "bf16";
  const DType w = dt == "f32" ? DType::F32 : dt == "f16" ? DType::F16 : DType::BF16;
  const uint64_t seed = (uint64_t)getNum(o, "seed", 1);
  try {
    std::unique_ptr<Backend> ref = createCpuBackend((int)std::max(1u, std::thread::hardware_concurrency()), w);
    std::unique_ptr<Backend> test = createNamedBackend(backend, 1, w);
    auto results = checkBackendOps(*ref, *test, seed);
    Napi::Array arr = Napi::Array::New(env, results.size());
    for (size_t i = 0; i < results.size(); ++i) {
      Napi::Object r = Napi::Object::New(env);
      r.Set("op", results[i].op);
      r.Set("shape", results[i].shape);
      r.Set("relErr", results[i].relErr);
      r.Set("allWritten", results[i].allWritten);
      arr.Set((uint32_t)i, r);
    }
    return arr;
  } catch (const EngineError& e) {
    throw makeError(env, e.code, e.what());
  } catch (const std::exception& e) {
    throw makeError(env, "LCKV_INTERNAL", e.what());
  }
}

// benchAttention({ backend: "cuda" | "cpu", sequences, context, numHeads, numKvHeads, headDim,
// iterations }): the attention of one decode step alone on a synthetic K/V pool (op_bench.h),
// returning { ms, bytes }: mean milliseconds per call and the bytes a call must move.
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
  try {
    std::unique_ptr<Backend> be = createNamedBackend(backend, (int)std::max(1u, std::thread::hardware_concurrency()), DType::F32);
    const AttentionBenchResult r = benchAttention(*be, shape);
    Napi::Object result = Napi::Object::New(env);
    result.Set("ms", r.ms);
    result.Set("bytes", r.bytes);
    return result;
  } catch (const EngineError& e) {
    throw makeError(env, e.code, e.what());
  } catch (const std::bad_alloc&) {
    throw makeError(env, kErrOutOfMemory, "out of memory");
  } catch (const std::exception& e) {
    throw makeError(env, "LCKV_INTERNAL", e.what());
  }
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  exports.Set("checkBackendOps", Napi::Function::New(env, CheckBackendOps));
  exports.Set("benchAttention", Napi::Function::New(env, BenchAttention));
  SequenceWrap::Init(env, data);
  ModelWrap::Init(env, exports);
  Napi::Object backends = Napi::Object::New(env);
  backends.Set("cpu", Napi::Boolean::New(env, true));
#ifdef LCKV_WITH_CUDA
  {
    std::string problem = cudaDeviceProblem();
    backends.Set("cudaBuilt", Napi::Boolean::New(env, true));
    backends.Set("cuda", Napi::Boolean::New(env, problem.empty()));
    if (!problem.empty()) backends.Set("cudaProblem", Napi::String::New(env, problem));
  }
#else
  backends.Set("cudaBuilt", Napi::Boolean::New(env, false));
  backends.Set("cuda", Napi::Boolean::New(env, false));
#endif
  exports.Set("backends", backends);
  exports.Set("version", Napi::String::New(env, "0.1.0"));
  return exports;
}

}  // namespace

NODE_API_MODULE(lckv, Init)
