// NativeModel (model_wrap.h): its methods, and the AsyncWorkers of loadTensors() and decodeBatch().
#include "model_wrap.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../engine/errors.h"
#include "args.h"
#include "engine_call.h"
#include "sequence_wrap.h"

namespace lckv::addon {

namespace {

class LoadWorker : public PromiseWorker {
 public:
  LoadWorker(Napi::Env env, std::shared_ptr<SharedModel> m, std::vector<TensorSource> src)
      : PromiseWorker(env), m_(std::move(m)), src_(std::move(src)) {}
  void run() override {
    std::lock_guard<std::mutex> lk(m_->model->mutex());
    for (const auto& s : src_) m_->model->loadTensor(s);
  }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }

 private:
  std::shared_ptr<SharedModel> m_;
  std::vector<TensorSource> src_;
};

class DecodeBatchWorker : public PromiseWorker {
 public:
  DecodeBatchWorker(Napi::Env env, std::shared_ptr<SharedModel> m, std::vector<std::shared_ptr<SharedSequence>> seqs,
                    std::vector<int32_t> tokens, std::vector<SamplingParams> params, bool runAhead, std::vector<int32_t> rows)
      : PromiseWorker(env),
        m_(std::move(m)),
        seqs_(std::move(seqs)),
        tokens_(std::move(tokens)),
        params_(std::move(params)),
        rows_(std::move(rows)),
        runAhead_(runAhead) {}
  void run() override {
    std::vector<SequenceState*> states;
    for (auto& s : seqs_) states.push_back(s->state.get());
    std::lock_guard<std::mutex> lk(m_->model->mutex());
    out_ = m_->model->decodeBatch(states, tokens_, params_, runAhead_, &logprobs_, rows_.empty() ? nullptr : &rows_);
  }
  void release() {
    for (auto& s : seqs_) s->release();
  }
  void OnError(const Napi::Error& e) override {
    release();
    PromiseWorker::OnError(e);
  }
  void OnOK() override {
    release();
    Napi::Int32Array a = Napi::Int32Array::New(Env(), out_.size());
    std::memcpy(a.Data(), out_.data(), out_.size() * sizeof(int32_t));
    if (!logprobs_.empty()) {
      // Only when some row asked: the tokens array carries one entry per row (null for a row
      // that did not ask).
      Napi::Array lp = Napi::Array::New(Env(), logprobs_.size());
      for (size_t r = 0; r < logprobs_.size(); ++r)
        lp.Set((uint32_t)r, params_[r].logprobs >= 0 ? Napi::Value(logprobsToJs(Env(), logprobs_[r])) : Env().Null());
      a.Set("logprobs", lp);
    }
    deferred_.Resolve(a);
  }

 private:
  std::shared_ptr<SharedModel> m_;
  std::vector<std::shared_ptr<SharedSequence>> seqs_;
  std::vector<int32_t> tokens_, out_;
  std::vector<SamplingParams> params_;
  std::vector<TokenLogprobs> logprobs_;
  std::vector<int32_t> rows_;  // empty: one row per sequence
  bool runAhead_;
};

}  // namespace

void ModelWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function f = DefineClass(env, "NativeModel",
                                 {InstanceMethod("loadTensors", &ModelWrap::LoadTensors),
                                  InstanceMethod("decodeBatch", &ModelWrap::DecodeBatch),
                                  InstanceMethod("finalize", &ModelWrap::Finalize),
                                  InstanceMethod("createSequence", &ModelWrap::CreateSequence),
                                  InstanceMethod("createPool", &ModelWrap::CreatePool),
                                  InstanceMethod("kvPageBytes", &ModelWrap::KvPageBytes),
                                  InstanceMethod("kvTypeProblem", &ModelWrap::KvTypeProblem),
                                  InstanceMethod("poolStats", &ModelWrap::PoolStats),
                                  InstanceMethod("auditPool", &ModelWrap::AuditPool),
                                  InstanceMethod("memoryInfo", &ModelWrap::MemoryInfo),
                                  InstanceMethod("dispose", &ModelWrap::Dispose),
                                  InstanceAccessor("weightBytes", &ModelWrap::WeightBytes, nullptr),
                                  InstanceAccessor("backend", &ModelWrap::BackendName, nullptr)});
  exports.Set("NativeModel", f);
}

ModelWrap::ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwInvalid(env, "NativeModel needs a model description object");
  ModelConfig cfg = parseConfig(info[0].As<Napi::Object>());
  Napi::Object opts = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
  std::string backend = "cpu";
  if (opts.Get("backend").IsString()) backend = opts.Get("backend").As<Napi::String>();
  int threads = getInt(opts, "threads", false, 0);
  if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
  runEngineCall(
      env,
      [&] {
        std::unique_ptr<Backend> be;
        std::string dt = opts.Get("dtype").IsString() ? std::string(opts.Get("dtype").As<Napi::String>()) : "f32";
        // "checkpoint" (the CPU only): each weight stays in the dtype its checkpoint stores.
        const bool keepCheckpointDtype = dt == "checkpoint";
        if (keepCheckpointDtype && backend != "cpu") throw EngineError(kErrInvalidArgument, "dtype checkpoint is for the CPU backend only");
        DType w = DType::F32;
        if (!keepCheckpointDtype && !parseWeightDtype(dt, w))
          throw EngineError(kErrInvalidArgument, "dtype must be f32, f16, bf16 or checkpoint");
        const bool graphs = !opts.Get("cudaGraphs").IsBoolean() || opts.Get("cudaGraphs").As<Napi::Boolean>().Value();
        be = keepCheckpointDtype ? createCpuBackend(threads, DType::F32, true)
                                 : createNamedBackend(backend, threads, w, getInt(opts, "deviceIndex", false, 0), graphs);
        shared_ = std::make_shared<SharedModel>();
        shared_->model = std::make_unique<Model>(std::move(cfg), std::move(be));
        shared_->model->setRunAhead(!opts.Get("runAhead").IsBoolean() || opts.Get("runAhead").As<Napi::Boolean>().Value());
      },
      "out of memory creating the backend");
}

std::shared_ptr<SharedModel> ModelWrap::live(Napi::Env env) {
  if (!shared_) throw makeError(env, kErrDisposed, "the model has been disposed");
  return shared_;
}

// loadTensors([{name, sourceName, file, offset, nbytes, dtype, shape, transpose?, slice?}])
Napi::Value ModelWrap::LoadTensors(const Napi::CallbackInfo& info) {
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

// decodeBatch(sequences: NativeSequence[], tokens: Int32Array, sampling: object[], runAhead = true,
//   rows?: Int32Array) -> Promise<Int32Array>, one token per sampling object. Sequences past
//   sampling.length only append their tokens. rows: each sequence's number of tokens (absent:
//   one each; Model::decodeBatch says when a sequence may have several). runAhead false: the
//   caller will not continue this batch next. When a row's sampling asks for logprobs, the array
//   also has a `logprobs` property (one per sampled row).
Napi::Value ModelWrap::DecodeBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  if (!info[0].IsArray() || !info[1].IsTypedArray() || !info[2].IsArray())
    throwInvalid(env, "decodeBatch(sequences, tokens: Int32Array, sampling[])");
  if (info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) throwInvalid(env, "decodeBatch: tokens must be an Int32Array");
  Napi::Array sa = info[0].As<Napi::Array>(), pa = info[2].As<Napi::Array>();
  Napi::Int32Array ta = info[1].As<Napi::Int32Array>();
  const uint32_t n = sa.Length();
  std::vector<int32_t> rows;
  if (info.Length() > 4 && !info[4].IsUndefined()) {
    if (!info[4].IsTypedArray() || info[4].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
      throwInvalid(env, "decodeBatch: rows must be an Int32Array");
    Napi::Int32Array ra = info[4].As<Napi::Int32Array>();
    if (ra.ElementLength() != n) throwInvalid(env, "decodeBatch: one row count per sequence");
    rows.assign(ra.Data(), ra.Data() + n);
  }
  // The engine checks the counts themselves; here only that the tokens can be read.
  uint64_t rowTotal = rows.empty() ? n : 0;
  for (int32_t k : rows) rowTotal += (uint64_t)std::max<int32_t>(k, 0);
  if (n == 0 || ta.ElementLength() != rowTotal || pa.Length() > n)
    throwInvalid(env, "decodeBatch: one token per row, and at most one sampling object per sequence");
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
    if (i >= pa.Length()) continue;
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
  std::vector<int32_t> tokens(ta.Data(), ta.Data() + ta.ElementLength());
  auto* w = new DecodeBatchWorker(env, m, std::move(seqs), std::move(tokens), std::move(params), runAhead, std::move(rows));
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

namespace {
// The K/V type named by argument i (a string; absent: f32), or a typed error naming the option.
KvType kvTypeArg(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || info[i].IsUndefined()) return KvType::F32;
  KvType t;
  if (!info[i].IsString() || !parseKvType(std::string(info[i].As<Napi::String>()).c_str(), t))
    throwInvalid(info.Env(), "kvCacheDtype must be one of \"f32\", \"bf16\", \"fp8\", \"int8\", \"int4\"");
  return t;
}
}  // namespace

// kvPageBytes(kvType, pageTokens): the bytes of one K/V page of this model in that type, scales
// and alignment included (what the pool allocates per page).
Napi::Value ModelWrap::KvPageBytes(const Napi::CallbackInfo& info) {
  auto m = live(info.Env());
  const KvType type = kvTypeArg(info, 0);
  if (!info[1].IsNumber() || !(info[1].As<Napi::Number>().DoubleValue() >= 1 && info[1].As<Napi::Number>().DoubleValue() <= 65536))
    throwInvalid(info.Env(), "kvPageBytes: pageTokens must be in [1, 65536]");
  int64_t bytes = 0;
  runEngineCall(info.Env(), [&] { bytes = m->model->kvLayout(type, info[1].As<Napi::Number>().Int32Value()).pageBytes(); });
  return Napi::Number::New(info.Env(), (double)bytes);
}

// kvTypeProblem(kvType) -> string | null: why this model cannot keep its K/V in that type on
// its backend (Model::kvTypeProblem), or null when it can.
Napi::Value ModelWrap::KvTypeProblem(const Napi::CallbackInfo& info) {
  auto m = live(info.Env());
  const KvType type = kvTypeArg(info, 0);
  std::string problem;
  runEngineCall(info.Env(), [&] { problem = m->model->kvTypeProblem(type); });
  return problem.empty() ? info.Env().Null() : Napi::String::New(info.Env(), problem);
}

// createPool(pages, pageTokens, kvType = "f32"): allocates the K/V pool (once, after finalize).
Napi::Value ModelWrap::CreatePool(const Napi::CallbackInfo& info) {
  auto m = live(info.Env());
  if (!info[0].IsNumber() || !info[1].IsNumber()) throwInvalid(info.Env(), "createPool(pages, pageTokens) needs two numbers");
  const double pages = info[0].As<Napi::Number>().DoubleValue(), pageTokens = info[1].As<Napi::Number>().DoubleValue();
  if (!(pages >= 1 && pages <= 2147483647.0) || !(pageTokens >= 1 && pageTokens <= 65536))
    throwInvalid(info.Env(), "createPool: pages must be in [1, 2^31) and pageTokens in [1, 65536]");
  const KvType type = kvTypeArg(info, 2);
  runEngineCall(info.Env(), [&] {
    std::lock_guard<std::mutex> lk(m->model->mutex());
    m->model->createPool((int)pages, (int)pageTokens, type);
  });
  return info.Env().Undefined();
}

Napi::Value ModelWrap::PoolStats(const Napi::CallbackInfo& info) {
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
  o.Set("residualPages", st.residualPages);
  return o;
}
// auditPool(): "" when every page's count matches the live page tables, else the mismatch.
Napi::Value ModelWrap::AuditPool(const Napi::CallbackInfo& info) {
  auto m = live(info.Env());
  return Napi::String::New(info.Env(), m->model->hasPool() ? m->model->pool().audit() : "");
}

Napi::Value ModelWrap::MemoryInfo(const Napi::CallbackInfo& info) {
  auto m = live(info.Env());
  size_t freeBytes = 0, totalBytes = 0;
  runEngineCall(info.Env(), [&] { m->model->backend().memoryInfo(freeBytes, totalBytes); });
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("free", (double)freeBytes);
  o.Set("total", (double)totalBytes);
  int64_t kept = 0, replayed = 0, recordings = 0;
  m->model->backend().stepGraphStats(kept, replayed, recordings);
  o.Set("stepGraphs", (double)kept);
  o.Set("stepGraphReplays", (double)replayed);
  o.Set("stepGraphRecordings", (double)recordings);
  int64_t used = 0, discarded = 0;
  m->model->runAheadStats(used, discarded);
  o.Set("runAheadSteps", (double)used);
  o.Set("runAheadDiscarded", (double)discarded);
  return o;
}

Napi::Value ModelWrap::Finalize(const Napi::CallbackInfo& info) {
  auto m = live(info.Env());
  runEngineCall(info.Env(), [&] {
    std::lock_guard<std::mutex> lk(m->model->mutex());
    m->model->finalize();
  });
  return info.Env().Undefined();
}

Napi::Value ModelWrap::CreateSequence(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = live(env);
  if (!info[0].IsNumber()) throwInvalid(env, "createSequence(maxContext) needs a number");
  int maxContext = info[0].As<Napi::Number>().Int32Value();
  auto s = std::make_shared<SharedSequence>();
  s->owner = m;
  // No model lock: a new store shares nothing with running forwards, and taking the lock here
  // would block the JS thread for as long as another sequence's forward runs.
  runEngineCall(env, [&] { s->state = m->model->createSequence(maxContext); });
  return SequenceWrap::Wrap(env, s);
}

Napi::Value ModelWrap::Dispose(const Napi::CallbackInfo& info) {
  shared_.reset();
  return info.Env().Undefined();
}

Napi::Value ModelWrap::WeightBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), shared_ ? (double)shared_->model->weightBytes() : 0);
}

Napi::Value ModelWrap::BackendName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), shared_ ? shared_->model->backend().name() : "disposed");
}

}  // namespace lckv::addon
