// NativeSequence (sequence_wrap.h): its methods, and the AsyncWorkers of append() and shift().
#include "sequence_wrap.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../engine/errors.h"
#include "args.h"
#include "engine_call.h"

namespace lckv::addon {

namespace {

class AppendWorker : public PromiseWorker {
 public:
  AppendWorker(Napi::Env env, std::shared_ptr<SharedSequence> s, std::vector<int32_t> tokens, PrefillSpec prefill,
               LogitsWanted logits, bool sample, SamplingParams sp, Napi::Value cancel)
      : PromiseWorker(env), s_(std::move(s)), tokens_(std::move(tokens)), prefill_(prefill), logits_(logits),
        sample_(sample), sp_(sp) {
    // The flag's buffer stays alive while the worker reads it.
    if (cancel.IsTypedArray()) cancelRef_ = Napi::Persistent(cancel.As<Napi::Object>());
  }
  void run() override {
    Model& m = *s_->owner->model;
    std::lock_guard<std::mutex> lk(m.mutex());
    res_ = m.append(*s_->state, tokens_, prefill_, logits_, sample_ ? &sp_ : nullptr);
  }
  void OnError(const Napi::Error& e) override {
    s_->release();
    PromiseWorker::OnError(e);
  }
  void OnOK() override {
    Napi::Env env = Env();
    s_->release();
    Napi::Object r = Napi::Object::New(env);
    r.Set("passes", Napi::Number::New(env, res_.passes));
    r.Set("length", Napi::Number::New(env, s_->length));
    if (!res_.logits.empty()) {
      Napi::Float32Array a = Napi::Float32Array::New(env, res_.logits.size());
      std::memcpy(a.Data(), res_.logits.data(), res_.logits.size() * sizeof(float));
      r.Set("logits", a);
    }
    if (sample_) r.Set("token", Napi::Number::New(env, res_.sampled));
    if (sample_ && sp_.logprobs >= 0) r.Set("logprobs", logprobsToJs(env, res_.sampledLogprobs));
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
  void run() override {
    Model& m = *s_->owner->model;
    std::lock_guard<std::mutex> lk(m.mutex());
    m.shiftSequence(*s_->state, sink_, drop_);
  }
  void OnError(const Napi::Error& e) override {
    s_->release();
    PromiseWorker::OnError(e);
  }
  void OnOK() override {
    s_->release();
    deferred_.Resolve(Napi::Number::New(Env(), s_->length));
  }

 private:
  std::shared_ptr<SharedSequence> s_;
  int sink_, drop_;
};

// Argument i as an integer in [0, 1e9] (token and page counts); -1 when it is not one.
int countArg(const Napi::CallbackInfo& info, size_t i) {
  const double v = info[i].IsNumber() ? info[i].As<Napi::Number>().DoubleValue() : -1;
  return v >= 0 && v <= 1e9 && v == (double)(int64_t)v ? (int)v : -1;
}

int tokenCount(const Napi::CallbackInfo& info, const char* what) {
  if (!info[0].IsNumber()) throwInvalid(info.Env(), std::string(what) + "(totalTokens) needs a number");
  const int t = countArg(info, 0);
  if (t < 0) throwInvalid(info.Env(), std::string(what) + "(totalTokens): an integer in [0, 1e9] is needed");
  return t;
}

int extraPages(const Napi::CallbackInfo& info, const char* what) {
  if (info.Length() < 2 || info[1].IsUndefined()) return 0;
  const int e = countArg(info, 1);
  if (e < 0) throwInvalid(info.Env(), std::string(what) + "(totalTokens, extraPages): extraPages must be an integer >= 0");
  return e;
}

// The third argument, decodeFrom, as KvPages::Growth (no window cap without it).
KvPages::Growth growth(const Napi::CallbackInfo& info, const SharedSequence& s, const char* what) {
  if (info.Length() < 3 || info[2].IsUndefined()) return {};
  const int d = countArg(info, 2);
  if (d < 0) throwInvalid(info.Env(), std::string(what) + "(totalTokens, extraPages, decodeFrom): decodeFrom must be an integer >= 0");
  return {s.owner->model->decodeWindowPages(), d};
}

}  // namespace

void SequenceWrap::Init(Napi::Env env, AddonData* data) {
  Napi::Function f = DefineClass(env, "NativeSequence",
                                 {InstanceMethod("append", &SequenceWrap::Append),
                                  InstanceMethod("truncate", &SequenceWrap::Truncate),
                                  InstanceMethod("exactRewind", &SequenceWrap::ExactRewind),
                                  InstanceMethod("checkpointResidual", &SequenceWrap::CheckpointResidual),
                                  InstanceMethod("dropResidualCheckpoint", &SequenceWrap::DropResidualCheckpoint),
                                  InstanceMethod("fork", &SequenceWrap::Fork),
                                  InstanceMethod("dispose", &SequenceWrap::Dispose),
                                  InstanceMethod("reserve", &SequenceWrap::Reserve),
                                  InstanceMethod("shift", &SequenceWrap::Shift),
                                  InstanceMethod("pagesToReserve", &SequenceWrap::PagesToReserve),
                                  InstanceMethod("pagesToShift", &SequenceWrap::PagesToShift),
                                  InstanceMethod("setCached", &SequenceWrap::SetCached),
                                  InstanceMethod("readKv", &SequenceWrap::ReadKv),
                                  InstanceAccessor("reservedPages", &SequenceWrap::ReservedPages, nullptr),
                                  InstanceAccessor("length", &SequenceWrap::Length, nullptr),
                                  InstanceAccessor("kvBytes", &SequenceWrap::KvBytes, nullptr)});
  data->sequenceCtor = Napi::Persistent(f);
}

Napi::Object SequenceWrap::Wrap(Napi::Env env, std::shared_ptr<SharedSequence> s) {
  Napi::Object obj = env.GetInstanceData<AddonData>()->sequenceCtor.New({});
  s->publish();
  Unwrap(obj)->seq = std::move(s);
  return obj;
}

bool SequenceWrap::IsSequence(Napi::Env env, const Napi::Value& v) {
  return v.IsObject() && v.As<Napi::Object>().InstanceOf(env.GetInstanceData<AddonData>()->sequenceCtor.Value());
}

std::shared_ptr<SharedSequence> SequenceWrap::live(Napi::Env env) {
  if (!seq) throw makeError(env, kErrDisposed, "the sequence has been disposed");
  return seq;
}

std::shared_ptr<SharedSequence> SequenceWrap::idle(Napi::Env env) {
  auto s = live(env);
  if (s->busy) throw makeError(env, kErrBusy, "the sequence is running a forward");
  return s;
}

void SequenceWrap::claim(Napi::Env env, SharedSequence& s) {
  bool expected = false;
  if (!s.busy.compare_exchange_strong(expected, true))
    throw makeError(env, kErrBusy, "the sequence is already running a forward; await the previous call");
}

Napi::Value SequenceWrap::Truncate(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  if (!info[0].IsNumber()) throwInvalid(info.Env(), "truncate(n) needs a number");
  double n = info[0].As<Napi::Number>().DoubleValue();
  if (n != (double)(int64_t)n || n < INT32_MIN || n > INT32_MAX)
    throwInvalid(info.Env(), "truncate(n): n must be an integer in [0, " + std::to_string(s->state->length()) + "]");
  runEngineCall(info.Env(), [&] {  // the range is the model's to check
    s->owner->model->truncateSequence(*s->state, (int)n);  // pages past the new end go back to the pool
  });
  s->publish();
  return info.Env().Undefined();
}

// exactRewind(n): the largest m <= n to which truncate(m) rewinds with the K/V exact (less than
// n where an int4 cache would read the rows of n's page back from their codes).
Napi::Value SequenceWrap::ExactRewind(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  if (!info[0].IsNumber()) throwInvalid(info.Env(), "exactRewind(n) needs a number");
  const double n = info[0].As<Napi::Number>().DoubleValue();
  if (n != (double)(int64_t)n || n < 0 || n > s->state->length())
    throwInvalid(info.Env(), "exactRewind(n): n must be an integer in [0, " + std::to_string(s->state->length()) + "]");
  return Napi::Number::New(info.Env(), s->owner->model->exactRewind(*s->state, (int)n));
}

// checkpointResidual(): an int4 sequence that ends mid-page keeps a copy of its residual, so that
// truncate() back to its length stays exact after later writes quantized that page
// (Model::checkpointResidual); dropResidualCheckpoint() releases it. No-ops for other types.
Napi::Value SequenceWrap::CheckpointResidual(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  runEngineCall(info.Env(), [&] { s->owner->model->checkpointResidual(*s->state); });
  return info.Env().Undefined();
}

Napi::Value SequenceWrap::DropResidualCheckpoint(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  s->owner->model->dropResidualCheckpoint(*s->state);
  return info.Env().Undefined();
}

// reserve(totalTokens, extraPages = 0, decodeFrom?): promises the pages this sequence needs
// to grow to totalTokens, plus extraPages (a context shift's copies); nothing to grow and no
// extra pages drop the promise. decodeFrom: past that many tokens it grows by decoding, a
// token at a time, so a model whose every layer is windowed promises only its window's pages
// beyond the prefill's (KvPages::reserve). Throws LCKV_KV_CACHE_FULL when the pool cannot
// promise them now.
Napi::Value SequenceWrap::Reserve(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  const int total = tokenCount(info, "reserve");
  const int extra = extraPages(info, "reserve");
  runEngineCall(info.Env(), [&] { s->state->kv->reserve(s->state->length(), total, extra, growth(info, *s, "reserve")); });
  return info.Env().Undefined();
}

// pagesToReserve(totalTokens, extraPages = 0, decodeFrom?): the pages reserve() with these
// arguments promises.
Napi::Value SequenceWrap::PagesToReserve(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  const int total = tokenCount(info, "pagesToReserve");
  const int extra = extraPages(info, "pagesToReserve");
  return Napi::Number::New(info.Env(), s->state->kv->pagesToReserve(s->state->length(), total, extra, growth(info, *s, "pagesToReserve")));
}

// pagesToShift(sink, drop): pages shift(sink, drop) would take beyond those it frees.
Napi::Value SequenceWrap::PagesToShift(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  if (!info[0].IsNumber() || !info[1].IsNumber()) throwInvalid(info.Env(), "pagesToShift(sink, drop) needs two numbers");
  return runEngineCall(info.Env(), [&] {
    return Napi::Number::New(info.Env(), s->owner->model->pagesToShift(*s->state, info[0].As<Napi::Number>().Int32Value(),
                                                                        info[1].As<Napi::Number>().Int32Value()));
  });
}

Napi::Value SequenceWrap::SetCached(const Napi::CallbackInfo& info) {
  auto s = live(info.Env());
  s->state->kv->setCached(info[0].ToBoolean().Value());
  return info.Env().Undefined();
}

// readKv(slot, start, n) -> Float32Array: K then V of KV slot `slot` at positions
// [start, start + n), decoded from the cache's type (2 * n * kvDim floats).
Napi::Value SequenceWrap::ReadKv(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  for (size_t i = 0; i < 3; ++i)
    if (!info[i].IsNumber()) throwInvalid(info.Env(), "readKv(slot, start, n) needs three numbers");
  std::vector<float> out;
  runEngineCall(info.Env(), [&] {
    s->owner->model->readKv(*s->state, info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value(),
                            info[2].As<Napi::Number>().Int32Value(), out);
  });
  Napi::Float32Array a = Napi::Float32Array::New(info.Env(), out.size());
  std::copy(out.begin(), out.end(), a.Data());
  return a;
}

Napi::Value SequenceWrap::ReservedPages(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), seq ? seq->state->kv->reserved() : 0);
}

Napi::Value SequenceWrap::Fork(const Napi::CallbackInfo& info) {
  auto s = idle(info.Env());
  auto child = std::make_shared<SharedSequence>();
  child->owner = s->owner;
  // No model lock: the fork shares the source's pages (the pool locks its own counts), and
  // the JS thread must not wait for other sequences' forwards.
  runEngineCall(info.Env(), [&] { child->state = s->owner->model->forkSequence(*s->state); });
  return Wrap(info.Env(), child);
}

Napi::Value SequenceWrap::Dispose(const Napi::CallbackInfo& info) {
  seq.reset();
  return info.Env().Undefined();
}

Napi::Value SequenceWrap::Length(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), seq ? seq->length : 0);
}

Napi::Value SequenceWrap::KvBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), seq ? seq->kvBytes : 0);
}

// shift(sink, drop) -> Promise<length>: drops tokens [sink, sink + drop) (whole pages).
Napi::Value SequenceWrap::Shift(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = live(env);
  if (!info[0].IsNumber() || !info[1].IsNumber()) throwInvalid(env, "shift(sink, drop) needs two numbers");
  const int sink = info[0].As<Napi::Number>().Int32Value(), drop = info[1].As<Napi::Number>().Int32Value();
  claim(env, *s);
  auto* w = new ShiftWorker(env, s, sink, drop);
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

// append(tokens: Int32Array, opts: {mode, passes, logits: "none"|"last"|"all", sample?: {...}})
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
  claim(env, *s);
  auto* w = new AppendWorker(env, s, std::move(tokens), prefill, lw, sample, sp, cv);
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

}  // namespace lckv::addon
