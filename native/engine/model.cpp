#include "model.h"

#include <algorithm>
#include <cmath>
#include <new>

#include "errors.h"

namespace lckv {

namespace {
std::string layerName(int i, const char* what) { return "layers." + std::to_string(i) + "." + what; }
std::string shapeStr(int64_t r, int64_t c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; }
}  // namespace

// Activations of one chunk of n tokens. Allocated per append: the CPU backend's allocations are
// cheap next to the forward, and a GPU backend replaces this with a preallocated arena.
struct Model::Scratch {
  Tensor h, x, q, k, v, a, o, g, u, h0;
  // The pages this forward reads and writes (kv.tables and kv.rowSeq point into the vectors).
  KvView kv;
  std::vector<int32_t> tables, rowSeq;
  // The last MLP output waits in `o` to be added to `h` by the next layer's fused add + norm.
  bool pendingResidual = false;
};

// The page writes of one forward, undone unless committed: on any failure each sequence gives
// back the pages past its (unchanged) length and the reservation they used, so a failed call
// leaves every sequence as it was.
struct PendingWrites {
  std::vector<SequenceState*> seqs;
  bool committed = false;
  ~PendingWrites() {
    if (!committed)
      for (SequenceState* q : seqs) q->kv->rollbackWrite(q->length());
  }
  void commit() {
    for (SequenceState* q : seqs) q->kv->commitWrite();
    committed = true;
  }
};

Model::Model(ModelConfig cfg, std::unique_ptr<Backend> backend) : cfg_(std::move(cfg)), backend_(std::move(backend)) {
  try {
    cfg_.validate();
  } catch (const std::invalid_argument& e) {
    throw EngineError(kErrInvalidArgument, std::string("invalid model description: ") + e.what());
  }
  layers_.resize((size_t)cfg_.numLayers);
  expected_ = expectedTensors();
  // Sliding windows everywhere: the widest one bounds what any future query can read.
  for (int i = 0; i < cfg_.numLayers; ++i) {
    const int w = cfg_.plan.window[i];
    if (w <= 0) {
      releaseWindow_ = 0;
      break;
    }
    releaseWindow_ = std::max(releaseWindow_, w);
  }
  // Slots whose owner is read by a layer below it: the only cross-pass state of the cyclic group.
  for (int i = 0; i < cfg_.numLayers; ++i) {
    int t = cfg_.plan.target[i];
    if (t > i) {
      int slot = cfg_.plan.kvSlot[t];
      if (std::find(upwardTargetSlots_.begin(), upwardTargetSlots_.end(), slot) == upwardTargetSlots_.end())
        upwardTargetSlots_.push_back(slot);
    }
  }
}

Model::~Model() {
  // A step queued ahead may still read the pool and the weights; members go after this.
  try {
    if (backend_) backend_->finishQueued();
  } catch (...) {
    // A destructor does not throw; a device fault here also fails the backend's next call.
  }
}

std::map<std::string, std::pair<int64_t, int64_t>> Model::expectedTensors() const {
  const ModelConfig& c = cfg_;
  const int64_t E = c.hidden, qd = (int64_t)c.numHeads * c.headDim, kvd = (int64_t)c.numKvHeads * c.headDim;
  const int64_t I = c.intermediate;
  const bool gpt2 = c.style == BlockStyle::Gpt2;
  std::map<std::string, std::pair<int64_t, int64_t>> m;
  m["embed.weight"] = {c.vocab, E};
  if (gpt2) m["pos_embed.weight"] = {c.maxPositions, E};
  m["final_norm.weight"] = {1, E};
  if (gpt2) m["final_norm.bias"] = {1, E};
  if (!c.tiedEmbeddings) m["lm_head.weight"] = {c.vocab, E};
  for (int i = 0; i < c.numLayers; ++i) {
    const bool kv = c.plan.kvSlot[i] >= 0;
    m[layerName(i, "attn_norm.weight")] = {1, E};
    m[layerName(i, "mlp_norm.weight")] = {1, E};
    if (gpt2) {
      m[layerName(i, "attn_norm.bias")] = {1, E};
      m[layerName(i, "mlp_norm.bias")] = {1, E};
    }
    m[layerName(i, "q.weight")] = {qd, E};
    m[layerName(i, "o.weight")] = {E, qd};
    if (kv) {
      m[layerName(i, "k.weight")] = {kvd, E};
      m[layerName(i, "v.weight")] = {kvd, E};
    }
    if (c.attentionBias) {
      m[layerName(i, "q.bias")] = {1, qd};
      m[layerName(i, "o.bias")] = {1, E};
      if (kv) {
        m[layerName(i, "k.bias")] = {1, kvd};
        m[layerName(i, "v.bias")] = {1, kvd};
      }
    }
    if (!gpt2) m[layerName(i, "gate.weight")] = {I, E};
    m[layerName(i, "up.weight")] = {I, E};
    m[layerName(i, "down.weight")] = {E, I};
    if (c.mlpBias) {
      if (!gpt2) m[layerName(i, "gate.bias")] = {1, I};
      m[layerName(i, "up.bias")] = {1, I};
      m[layerName(i, "down.bias")] = {1, E};
    }
  }
  return m;
}

void Model::loadTensor(const TensorSource& src) {
  auto it = expected_.find(src.name);
  if (it == expected_.end())
    throw EngineError(kErrWeights, "tensor '" + src.sourceName + "' in " + src.file + " maps to '" + src.name +
                                       "', which this model's config does not use");
  int64_t rows = 0, cols = 0;
  std::vector<float> vals = readTensorF32(src, rows, cols);
  if (rows != it->second.first || cols != it->second.second)
    throw EngineError(kErrWeights, "tensor '" + src.sourceName + "' in " + src.file + " has shape " + shapeStr(rows, cols) +
                                       " after layout conversion; the config implies " +
                                       shapeStr(it->second.first, it->second.second));
  for (float f : vals)
    if (!std::isfinite(f))
      throw EngineError(kErrWeights, "tensor '" + src.sourceName + "' in " + src.file + " holds a NaN or infinite value");
  Tensor t;
  try {
    t = backend_->upload(vals.data(), rows, cols);
  } catch (const std::bad_alloc&) {
    throw EngineError(kErrOutOfMemory, "out of memory loading tensor '" + src.sourceName + "'");
  }
  auto old = tensors_.find(src.name);
  if (old != tensors_.end()) weightBytes_ -= (size_t)old->second.numel() * dtypeSize(old->second.dtype);
  weightBytes_ += (size_t)t.numel() * dtypeSize(t.dtype);
  tensors_[src.name] = t;
  ready_ = false;
}

void Model::finalize() {
  for (const auto& kv : expected_)
    if (!tensors_.count(kv.first))
      throw EngineError(kErrWeights, "missing tensor for '" + kv.first + "'");
  auto get = [&](const std::string& n) -> Tensor {
    auto it = tensors_.find(n);
    return it == tensors_.end() ? Tensor{} : it->second;
  };
  embed_ = get("embed.weight");
  posEmbed_ = get("pos_embed.weight");
  finalNormW_ = get("final_norm.weight");
  finalNormB_ = get("final_norm.bias");
  lmHead_ = cfg_.tiedEmbeddings ? embed_ : get("lm_head.weight");
  for (int i = 0; i < cfg_.numLayers; ++i) {
    Layer& L = layers_[(size_t)i];
    L.attnNormW = get(layerName(i, "attn_norm.weight"));
    L.attnNormB = get(layerName(i, "attn_norm.bias"));
    L.q = get(layerName(i, "q.weight"));
    L.qB = get(layerName(i, "q.bias"));
    L.k = get(layerName(i, "k.weight"));
    L.kB = get(layerName(i, "k.bias"));
    L.v = get(layerName(i, "v.weight"));
    L.vB = get(layerName(i, "v.bias"));
    L.o = get(layerName(i, "o.weight"));
    L.oB = get(layerName(i, "o.bias"));
    L.mlpNormW = get(layerName(i, "mlp_norm.weight"));
    L.mlpNormB = get(layerName(i, "mlp_norm.bias"));
    L.gate = get(layerName(i, "gate.weight"));
    L.gateB = get(layerName(i, "gate.bias"));
    L.up = get(layerName(i, "up.weight"));
    L.upB = get(layerName(i, "up.bias"));
    L.down = get(layerName(i, "down.weight"));
    L.downB = get(layerName(i, "down.bias"));
  }
  ready_ = true;
}

void Model::createPool(int pages, int pageTokens) {
  if (pool_) throw EngineError(kErrInvalidArgument, "the K/V pool already exists");
  if (pages <= 0 || pageTokens <= 0) throw EngineError(kErrInvalidArgument, "the K/V pool needs pages > 0 and pageTokens > 0");
  KvLayout layout;
  layout.slots = (int)cfg_.plan.kvLayers.size();
  layout.kvDim = cfg_.numKvHeads * cfg_.headDim;
  layout.pageTokens = pageTokens;
  try {
    pool_ = std::make_shared<KvPool>(*backend_, layout, pages);
  } catch (const std::bad_alloc&) {
    throw EngineError(kErrOutOfMemory, "out of memory allocating a K/V pool of " + std::to_string(pages) + " pages (" +
                                           std::to_string((int64_t)pages * layout.pageFloats() * 4) + " bytes)");
  }
}

std::unique_ptr<SequenceState> Model::createSequence(int maxContext) {
  if (maxContext <= 0) throw EngineError(kErrInvalidArgument, "maxContext must be > 0");
  if (cfg_.maxPositions > 0 && maxContext > cfg_.maxPositions)
    throw EngineError(kErrInvalidArgument, "maxContext " + std::to_string(maxContext) +
                                               " exceeds the model's learned positions (" + std::to_string(cfg_.maxPositions) + ")");
  if (!pool_) throw EngineError(kErrInvalidArgument, "the model has no K/V pool yet");
  auto seq = std::make_unique<SequenceState>();
  seq->maxContext = maxContext;
  seq->kv = std::make_unique<KvPages>(pool_);
  return seq;
}

std::unique_ptr<SequenceState> Model::forkSequence(SequenceState& seq) {
  ++seq.version;  // its pages are shared from now on
  auto out = std::make_unique<SequenceState>();
  out->maxContext = seq.maxContext;
  out->tokens = seq.tokens;
  out->kv = seq.kv->share();
  out->kv->keep(seq.length());
  return out;
}

void Model::releaseOutsideWindow(SequenceState& seq) {
  // The next query (at length) reads keys >= length - W + 1; one position more stays so the
  // generate loop can rewind its last token and run it again.
  if (releaseWindow_ > 0) seq.kv->releaseBelow(seq.length() - releaseWindow_ - 1);
}

void Model::truncateSequence(SequenceState& seq, int n) {
  if (n < 0 || n > seq.length())
    throw EngineError(kErrInvalidArgument, "truncate(n): n must be an integer in [0, " + std::to_string(seq.length()) + "]");
  if (releaseWindow_ > 0 && n > 0 && seq.kv->firstHeld() > 0 && n - releaseWindow_ + 1 < seq.kv->firstHeld())
    throw EngineError(kErrInvalidArgument, "cannot rewind to " + std::to_string(n) + " tokens: the sliding window (" +
                                               std::to_string(releaseWindow_) + ") already released the K/V before position " +
                                               std::to_string(seq.kv->firstHeld()));
  ++seq.version;
  seq.tokens.resize((size_t)n);
  seq.kv->keep(n);
}

void Model::checkShift(const SequenceState& seq, int sink, int drop) const {
  const int P = pool_->layout().pageTokens, len = seq.length();
  if (sink < 0 || drop <= 0 || sink % P || drop % P || sink + drop > len)
    throw EngineError(kErrInvalidArgument, "shift: sink (" + std::to_string(sink) + ") and drop (" + std::to_string(drop) +
                                               ") must be whole pages of " + std::to_string(P) + " tokens within the sequence of " +
                                               std::to_string(len));
  if (releaseWindow_ > 0)
    throw EngineError(kErrInvalidArgument, "contextShift: every layer of this model attends through a sliding window, which "
                                           "already bounds its memory; generate without contextShift");
}

int Model::decodeWindowPages() const {
  if (releaseWindow_ <= 0) return 0;
  const int P = pool_->layout().pageTokens;
  // While token L is written, the pages of [L - W - 1, L] are held, their first page whole (the
  // window keeps one spare position, see releaseOutsideWindow): at most ceil((W + 1) / P) + 1.
  return (releaseWindow_ + 1 + P - 1) / P + 1;
}

bool Model::shiftRotates(const SequenceState& seq, int sink, int drop) const {
  return cfg_.style == BlockStyle::Llama && seq.length() > sink + drop;
}

int Model::pagesToShift(const SequenceState& seq, int sink, int drop) const {
  checkShift(seq, sink, drop);
  const int P = pool_->layout().pageTokens;
  return shiftRotates(seq, sink, drop) ? seq.kv->pagesToShift(sink / P, drop / P, seq.length()) : 0;
}

void Model::shiftSequence(SequenceState& seq, int sink, int drop) {
  checkShift(seq, sink, drop);
  ++seq.version;
  const int P = pool_->layout().pageTokens, len = seq.length();
  Backend& be = *backend_;
  BackendRange range(be, "context shift");
  const int moved = len - sink - drop;
  const bool rope = shiftRotates(seq, sink, drop);
  const int kvd = cfg_.numKvHeads * cfg_.headDim;
  // The buffers first, so that running out of memory leaves the sequence as it was; then the
  // pages, all or nothing unless a device copy fails.
  Tensor k, v;
  if (rope) {
    k = be.alloc(moved, kvd);
    v = be.alloc(moved, kvd);
  }
  // Past this point a failure (a device error) would leave K/V half moved or half rotated: the
  // sequence then keeps its first `sink` tokens only, whose K/V nothing touched.
  const size_t pagesBefore = seq.kv->table().size();
  auto keepSink = [&] {
    seq.tokens.resize((size_t)sink);
    seq.kv->keep(sink);
  };
  if (rope) {
    try {
      seq.kv->shiftPages(sink / P, drop / P, len);  // moved pages made private: their keys turn below
    } catch (...) {
      if (seq.kv->table().size() != pagesBefore) keepSink();  // a copy failed after the release
      throw;
    }
  } else {
    seq.kv->erasePages(sink / P, drop / P);
  }
  seq.tokens.erase(seq.tokens.begin() + sink, seq.tokens.begin() + sink + drop);
  seq.kv->keep(seq.length());
  if (!rope) return;
  // RoPE: q.k depends on the positions' difference only, so rotating every moved key by -drop
  // makes them read as if they had been computed drop positions earlier.
  try {
    Scratch s;
    viewPages(s, {&seq}, std::vector<int32_t>((size_t)moved, 0));
    std::vector<int32_t> pos((size_t)moved), back(pos.size(), -drop);
    for (int r = 0; r < moved; ++r) pos[(size_t)r] = sink + r;
    std::vector<float> host;
    for (int slot = 0; slot < (int)cfg_.plan.kvLayers.size(); ++slot) {
      be.kvRead(s.kv, 0, slot, sink, moved, host);  // K rows, then V rows
      be.writeRows(k, 0, moved, host.data());
      be.writeRows(v, 0, moved, host.data() + (size_t)moved * kvd);
      be.rope(k, moved, cfg_.numKvHeads, cfg_.headDim, back.data(), cfg_.ropeInvFreq, 1.0f);
      be.kvWrite(s.kv, slot, k, v, moved, pos.data());
    }
  } catch (...) {
    keepSink();
    throw;
  }
}

// Points s.kv at the page tables of seqs; rowSeq[r] is the sequence of row r of the forward.
void Model::viewPages(Scratch& s, const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& rowSeq, bool roundStride) {
  size_t stride = 1;
  for (SequenceState* q : seqs) stride = std::max(stride, q->kv->table().size());
  // A recorded decode step has its table stride built in: a power of two changes rarely.
  if (roundStride)
    while (stride & (stride - 1)) stride += stride & (~stride + 1);
  s.tables.assign(seqs.size() * stride, -1);
  for (size_t i = 0; i < seqs.size(); ++i) std::copy(seqs[i]->kv->table().begin(), seqs[i]->kv->table().end(), s.tables.begin() + (int64_t)(i * stride));
  s.rowSeq = rowSeq;
  s.kv.pool = &pool_->storage();
  s.kv.layout = pool_->layout();
  s.kv.tables = s.tables.data();
  s.kv.stride = (int)stride;
  s.kv.numSeqs = (int)seqs.size();
  s.kv.rowSeq = s.rowSeq.data();
}

static const Tensor* opt(const Tensor& t) { return t.empty() ? nullptr : &t; }

void PrefillSpec::throwIfCancelled() const {
  if (cancel && *cancel != 0) throw EngineError(kErrAborted, "the prefill was aborted");
}

void Model::runLayer(Scratch& s, int n, const int32_t* pos, int i) {
  Backend& be = *backend_;
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (int k = 0; k < 1024; ++k) v.push_back("layer " + std::to_string(k));
    return v;
  }();
  BackendRange range(be, i < 1024 ? names[(size_t)i].c_str() : "layer");
  const ModelConfig& c = cfg_;
  const Layer& L = layers_[(size_t)i];
  const NormKind nk = c.style == BlockStyle::Gpt2 ? NormKind::Layer : NormKind::Rms;
  const bool rope = c.style == BlockStyle::Llama;

  if (s.pendingResidual) be.addNorm(nk, s.h, s.o, n, L.attnNormW, opt(L.attnNormB), c.normEps, s.x);
  else be.norm(nk, s.h, n, L.attnNormW, opt(L.attnNormB), c.normEps, s.x);
  s.pendingResidual = false;
  const int ownSlot = c.plan.kvSlot[i];
  if (ownSlot >= 0) {
    const Backend::LinearTarget qkv[3] = {{&L.q, opt(L.qB), &s.q}, {&L.k, opt(L.kB), &s.k}, {&L.v, opt(L.vB), &s.v}};
    be.linears(s.x, n, qkv, 3);
  } else {
    be.linear(s.x, n, L.q, opt(L.qB), s.q);
  }
  if (rope)
    be.ropeKvWrite(s.q, c.numHeads, ownSlot >= 0 ? &s.k : nullptr, &s.v, c.numKvHeads, c.headDim, n, pos, c.ropeInvFreq,
                   c.ropeAttentionScale, &s.kv, ownSlot);
  else if (ownSlot >= 0)
    be.kvWrite(s.kv, ownSlot, s.k, s.v, n, pos);
  AttentionSpec spec;
  spec.numHeads = c.numHeads;
  spec.numKvHeads = c.numKvHeads;
  spec.headDim = c.headDim;
  spec.strict = c.plan.strict[i];
  spec.window = c.plan.window[i];
  spec.scale = 1.0f / std::sqrt((float)c.headDim);
  // Every row of every sequence in one call: K/V is read where its owner wrote it, never copied.
  be.attention(s.q, n, pos, s.kv, c.plan.kvSlot[c.plan.target[i]], spec, s.a);
  be.linear(s.a, n, L.o, opt(L.oB), s.o);
  be.addNorm(nk, s.h, s.o, n, L.mlpNormW, opt(L.mlpNormB), c.normEps, s.x);
  if (c.style == BlockStyle::Llama) {
    be.linearSwiglu(s.x, n, L.gate, opt(L.gateB), L.up, opt(L.upB), s.u, s.g);
    be.linear(s.g, n, L.down, opt(L.downB), s.o);
  } else {
    be.linear(s.x, n, L.up, opt(L.upB), s.u);
    be.geluTanh(s.u, n);
    be.linear(s.u, n, L.down, opt(L.downB), s.o);
  }
  s.pendingResidual = true;
}

void Model::runLayers(Scratch& s, int n, const int32_t* pos, int first, int last, bool settle) {
  for (int i = first; i <= last; ++i) runLayer(s, n, pos, i);
  // Callers read or copy h next: settle the last residual.
  if (settle && s.pendingResidual) {
    backend_->addInPlace(s.h, s.o, n);
    s.pendingResidual = false;
  }
}

Tensor Model::computeLogits(Scratch& s, int n, int rowStart, int rows) {
  Backend& be = *backend_;
  const NormKind nk = cfg_.style == BlockStyle::Gpt2 ? NormKind::Layer : NormKind::Rms;
  Tensor xr = be.alloc(rows, cfg_.hidden);
  if (rowStart == 0 && rows == n) {
    // Every row (a decode step): the final norm reads h where it is, with the last layer's
    // residual add in the same pass: two launches (an add and a copy) fewer per step.
    if (s.pendingResidual) be.addNorm(nk, s.h, s.o, n, finalNormW_, opt(finalNormB_), cfg_.normEps, xr);
    else be.norm(nk, s.h, n, finalNormW_, opt(finalNormB_), cfg_.normEps, xr);
    s.pendingResidual = false;
  } else {
    if (s.pendingResidual) be.addInPlace(s.h, s.o, n);
    s.pendingResidual = false;
    Tensor hr = be.alloc(rows, cfg_.hidden);
    be.copyRows(s.h, rowStart, hr, 0, rows);
    be.norm(nk, hr, rows, finalNormW_, opt(finalNormB_), cfg_.normEps, xr);
  }
  Tensor lg = be.alloc(rows, cfg_.vocab);
  be.linear(xr, rows, lmHead_, nullptr, lg);
  return lg;
}

void Model::allocScratch(Scratch& s, int n) {
  Backend& be = *backend_;
  const ModelConfig& c = cfg_;
  const int qd = c.numHeads * c.headDim, kvd = c.numKvHeads * c.headDim;
  s.h = be.alloc(n, c.hidden);
  s.x = be.alloc(n, c.hidden);
  s.q = be.alloc(n, qd);
  s.a = be.alloc(n, qd);
  s.k = be.alloc(n, kvd);
  s.v = be.alloc(n, kvd);
  s.o = be.alloc(n, c.hidden);
  s.g = be.alloc(n, c.intermediate);
  s.u = be.alloc(n, c.intermediate);
}

uint64_t SequenceState::nextId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

// A decode step's recording: per batch size, table stride and 256 positions of context (the
// attention's split-K plan is fixed in a recording).
static uint64_t stepKey(int n, int stride, int maxPos) {
  return (uint64_t)n << 40 | (uint64_t)stride << 20 | (uint64_t)(maxPos / Backend::kStepContextBucket);
}

static bool sameSampling(const SamplingParams& a, const SamplingParams& b) {
  return a.temperature == b.temperature && a.topK == b.topK && a.topP == b.topP && a.minP == b.minP &&
         a.repetitionPenalty == b.repetitionPenalty && a.seed == b.seed;
}

bool Model::aheadMatches(const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& tokens,
                         const std::vector<SamplingParams>& params) const {
  const StepAhead& a = ahead_;
  if (!a.queued || a.ids.size() != seqs.size()) return false;
  for (size_t r = 0; r < seqs.size(); ++r) {
    const SequenceState& q = *seqs[r];
    if (q.id != a.ids[r] || q.version != a.versions[r] || q.length() != a.lengths[r] || tokens[r] != a.tokens[r] ||
        !sameSampling(params[r], a.params[r]) || !q.kv->writableInPlace(q.length()))
      return false;
  }
  return true;
}

void Model::queueStepAhead(Scratch& s, const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& pos,
                           const std::vector<SamplingParams>& params, int fromSlot) {
  ahead_.queued = false;  // (called only where run-ahead is on and the choices are queued)
  // The step ahead is an option: running out of host or device memory for it does not fail this
  // call's own step. (A device error does: it would fail whatever ran next.)
  try {
    const int n = (int)seqs.size();
    std::vector<int32_t> next((size_t)n);
    int maxPos = 0;
    for (int r = 0; r < n; ++r) {
      // The step must be one the next call can run as it is: its sequence not full, and its
      // position in a page this sequence holds alone (a new page or a copy would change the
      // pool, which only the call itself may do).
      next[(size_t)r] = pos[(size_t)r] + 1;
      if (next[(size_t)r] + 1 > seqs[(size_t)r]->maxContext || !seqs[(size_t)r]->kv->writableInPlace(next[(size_t)r])) return;
      maxPos = std::max(maxPos, next[(size_t)r]);
    }
    std::vector<uint64_t> seeds((size_t)n);
    for (int r = 0; r < n; ++r) seeds[(size_t)r] = (uint64_t)next[(size_t)r] + 1;
    ahead_.slot = fromSlot ^ 1;
    ahead_.ids.resize((size_t)n);
    ahead_.versions.resize((size_t)n);
    ahead_.lengths.assign(next.begin(), next.end());
    ahead_.params = params;
    ahead_.tokens.reserve((size_t)n);
    for (int r = 0; r < n; ++r) {
      ahead_.ids[(size_t)r] = seqs[(size_t)r]->id;
      ahead_.versions[(size_t)r] = seqs[(size_t)r]->version;
    }
    Backend& be = *backend_;
    const Backend::StepInputs in{nullptr, next.data(), n, s.tables.data(), (int)s.tables.size(), s.rowSeq.data()};
    Tensor lg;
    // Only a recorded step runs ahead: it writes nothing but its own buffers and the K/V of each
    // sequence's next position, past its length until the next call appends it.
    if (!be.replayStepFromSampled(stepKey(n, s.kv.stride, maxPos), in, fromSlot, lg)) return;
    be.queueSampleRows(lg, n, cfg_.vocab, params.data(), seeds.data(), ahead_.slot);
  } catch (const std::bad_alloc&) {
    return;
  }
  ahead_.queued = true;  // its tokens (this call's results) are filled in by decodeBatch
}

// With run-ahead (a backend that queues token choices on the device), each call queues the
// step after its own before it waits for its tokens: the next call, if it continues the same
// batch with those tokens, finds its step queued or already done, and the device does not wait
// for the host between steps. A call that asks for anything else throws the queued step away;
// it only wrote K/V past each sequence's length, which nothing reads. (A device fault in a
// queued step surfaces in whatever waits on the device next, as any asynchronous fault does.)
std::vector<int32_t> Model::decodeBatch(const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& tokens,
                                        const std::vector<SamplingParams>& params, bool runAhead) {
  if (!ready_) throw EngineError(kErrInvalidArgument, "model weights are not loaded");
  const int n = (int)seqs.size();
  if (n == 0 || tokens.size() != seqs.size() || params.size() != seqs.size())
    throw EngineError(kErrInvalidArgument, "decodeBatch needs one token and one sampling setting per sequence");
  for (int r = 0; r < n; ++r) {
    for (int q = 0; q < r; ++q)
      if (seqs[(size_t)q] == seqs[(size_t)r]) throw EngineError(kErrInvalidArgument, "a sequence appears twice in one batch");
    if (tokens[(size_t)r] < 0 || tokens[(size_t)r] >= cfg_.vocab)
      throw EngineError(kErrTokenOutOfRange, "token id " + std::to_string(tokens[(size_t)r]) + " is outside the vocabulary [0, " +
                                                  std::to_string(cfg_.vocab) + ")");
    if (seqs[(size_t)r]->length() + 1 > seqs[(size_t)r]->maxContext)
      throw EngineError(kErrContextOverflow, "a sequence in the batch is full (" + std::to_string(seqs[(size_t)r]->maxContext) + " tokens)");
  }
  Backend& be = *backend_;
  BackendRange range(be, "decode batch");
  std::vector<int32_t> pos((size_t)n), out((size_t)n), rowSeq((size_t)n);
  for (int r = 0; r < n; ++r) {
    pos[(size_t)r] = seqs[(size_t)r]->length();
    rowSeq[(size_t)r] = r;
  }
  const bool queueChoice = runAheadOn_ && be.canQueueSampling(params.data(), n);
  const bool queuedAhead = queueChoice && aheadMatches(seqs, tokens, params);
  if (ahead_.queued && !queuedAhead) runAheadDiscarded_.fetch_add(1, std::memory_order_relaxed);
  const int slot = queuedAhead ? ahead_.slot : 0;
  ahead_.queued = false;
  PendingWrites writes{seqs};  // the batch is all or nothing
  try {
    for (SequenceState* q : seqs) q->tokens.reserve(q->tokens.size() + 1);  // the commit below cannot fail halfway
    for (SequenceState* q : seqs) q->kv->prepareWrite(q->length(), 1);  // changes nothing for a step queued ahead
    Scratch s;
    viewPages(s, seqs, rowSeq, true);
    if (queuedAhead) {
      runAheadUsed_.fetch_add(1, std::memory_order_relaxed);
    } else {
      int maxPos = 0;
      for (int p : pos) maxPos = std::max(maxPos, p);
      const uint64_t key = stepKey(n, s.kv.stride, maxPos);
      const Backend::StepInputs in{tokens.data(), pos.data(), n, s.tables.data(), (int)s.tables.size(), rowSeq.data()};
      Tensor lg;
      if (!be.replayStep(key, in, lg)) {
        auto forward = [&] {
          s.pendingResidual = false;  // a failed recording may have stopped mid-layer
          allocScratch(s, n);
          be.embed(tokens.data(), pos.data(), n, embed_, opt(posEmbed_), s.h);
          // One token per sequence: strict layers read only earlier, final positions: one pass.
          runLayers(s, n, pos.data(), 0, cfg_.numLayers - 1, false);
          return computeLogits(s, n, 0, n);
        };
        bool ran = false;
        if (be.beginStepCapture(key, in)) {
          try {
            lg = forward();
            be.endStepCapture(lg);
            ran = true;
          } catch (const std::bad_alloc&) {
            // Nothing ran. Out of memory passes: record this step another time; run it op by op
            // now (which reports the error if memory is still short).
            be.abortStepCapture(true);
          } catch (const std::exception&) {
            // Nothing ran: an op that cannot be recorded (or a failed recording) runs unrecorded.
            be.abortStepCapture(false);
          }
        }
        if (!ran) lg = forward();
      }
      std::vector<uint64_t> positions((size_t)n);
      for (int r = 0; r < n; ++r) positions[(size_t)r] = (uint64_t)(pos[(size_t)r] + 1);
      if (queueChoice) {
        be.queueSampleRows(lg, n, cfg_.vocab, params.data(), positions.data(), slot);
      } else {
        std::vector<std::vector<int32_t>> histories((size_t)n);
        for (int r = 0; r < n; ++r) {
          if (params[(size_t)r].repetitionPenalty != 1.0f) {
            histories[(size_t)r] = seqs[(size_t)r]->tokens;
            histories[(size_t)r].push_back(tokens[(size_t)r]);
          }
        }
        be.sampleRows(lg, n, cfg_.vocab, params.data(), histories.data(), positions.data(), out.data());
      }
    }
    if (queueChoice) {
      if (runAhead) queueStepAhead(s, seqs, pos, params, slot);
      be.takeSampled(slot, n, out.data());
    }
    if (ahead_.queued) ahead_.tokens.assign(out.begin(), out.end());  // capacity reserved by queueStepAhead
  } catch (const std::bad_alloc&) {
    ahead_.queued = false;
    throw EngineError(kErrOutOfMemory, "out of memory running a decode batch of " + std::to_string(n));
  } catch (...) {
    ahead_.queued = false;
    throw;
  }
  for (int r = 0; r < n; ++r) seqs[(size_t)r]->tokens.push_back(tokens[(size_t)r]);
  writes.commit();
  for (SequenceState* q : seqs) releaseOutsideWindow(*q);
  return out;
}

// Fixed-point prefill stops iterating after this many passes without converging: random
// weights need not contract, and at tolerance 0 the last bits of late positions keep moving
// until the induction reaches them, which costs n passes of n tokens. By induction the first
// `passes` positions are exact by then; append() runs the rest token by token, which is exact
// too. A trained model converges well before (the default model: 23 passes for 250 tokens).
constexpr int kFixedPointMaxPasses = 64;

// Runs n tokens at positions [start, start+n) through every layer, prefilling the cyclic
// group as `mode` says. Keeps the last row's logits in res.lastLogits and, with `download`,
// appends the wanted rows to res.logits.
void Model::forwardChunk(SequenceState& seq, const int32_t* tokens, int n, int start, const PrefillSpec& prefill,
                         LogitsWanted want, bool download, AppendResult& res) {
  Backend& be = *backend_;
  BackendRange range(be, n == 1 ? "decode step" : "prefill chunk");
  const ModelConfig& c = cfg_;
  Scratch s;
  allocScratch(s, n);
  std::vector<int32_t> pos((size_t)n);
  for (int r = 0; r < n; ++r) pos[(size_t)r] = start + r;
  viewPages(s, {&seq}, std::vector<int32_t>((size_t)n, 0));

  be.embed(tokens, pos.data(), n, embed_, opt(posEmbed_), s.h);

  const KvPlan& plan = c.plan;
  if (!plan.hasCycle() || n == 1) {
    // A single token needs one pass: strict layers read only earlier, final positions.
    runLayers(s, n, pos.data(), 0, c.numLayers - 1);
    res.passes = std::max(res.passes, 1);
  } else {
    const int low = plan.cyclicLow, high = plan.cyclicHigh;
    if (low > 0) runLayers(s, n, pos.data(), 0, low - 1);
    s.h0 = be.alloc(n, c.hidden);
    be.copyRows(s.h, 0, s.h0, 0, n);
    // Zero KV before the first pass, so the first pass reads the same thing every time.
    for (int l = low; l <= high; ++l)
      if (plan.kvSlot[l] >= 0) be.kvZero(s.kv, 0, plan.kvSlot[l], start, n);
    std::vector<std::vector<float>> prev(upwardTargetSlots_.size()), cur(upwardTargetSlots_.size());
    for (size_t j = 0; j < upwardTargetSlots_.size(); ++j) be.kvRead(s.kv, 0, upwardTargetSlots_[j], start, n, prev[j]);
    int passes = 0;
    const int maxPasses = prefill.mode == PrefillMode::Iterative ? std::max(1, prefill.passes) : std::min(n, kFixedPointMaxPasses);
    bool converged = false;
    while (true) {
      prefill.throwIfCancelled();
      BackendRange passRange(be, "cyclic group pass");
      be.copyRows(s.h0, 0, s.h, 0, n);
      runLayers(s, n, pos.data(), low, high);
      ++passes;
      if (passes >= maxPasses) break;  // after n passes every position is exact by induction
      if (prefill.mode == PrefillMode::FixedPoint) {
        double moved = 0, largest = 0;
        bool same = true;
        for (size_t j = 0; j < upwardTargetSlots_.size(); ++j) {
          be.kvRead(s.kv, 0, upwardTargetSlots_[j], start, n, cur[j]);
          if (cur[j] != prev[j]) same = false;
          for (size_t e = 0; e < cur[j].size(); ++e) {
            const double d = std::fabs((double)cur[j][e] - (double)prev[j][e]);
            moved = std::isnan(d) ? INFINITY : std::max(moved, d);  // NaN never counts as converged
            largest = std::max(largest, (double)std::fabs(cur[j][e]));
          }
        }
        // This pass read (to within the tolerance) the K/V it wrote: the fixed point.
        if (same || (prefill.tolerance > 0 && moved <= prefill.tolerance * largest)) {
          converged = true;
          break;
        }
        prev.swap(cur);
      }
    }
    res.passes = std::max(res.passes, passes);
    if (prefill.mode == PrefillMode::FixedPoint && !converged && passes < n) res.exactPrefix = passes;
    if (high + 1 < c.numLayers) runLayers(s, n, pos.data(), high + 1, c.numLayers - 1);
  }
  if (want == LogitsWanted::None) return;
  const int rows = want == LogitsWanted::All ? n : 1;
  Tensor lg = computeLogits(s, n, n - rows, rows);
  res.lastLogits = lg;
  res.lastLogits.data = static_cast<float*>(lg.data) + (int64_t)(rows - 1) * cfg_.vocab;
  res.lastLogits.rows = 1;
  if (download) {
    const size_t old = res.logits.size();
    res.logits.resize(old + (size_t)rows * cfg_.vocab);
    be.download(lg, 0, rows, res.logits.data() + old);
  }
}

AppendResult Model::append(SequenceState& seq, const std::vector<int32_t>& tokens, const PrefillSpec& prefill,
                           LogitsWanted logits, const SamplingParams* sampling) {
  if (!ready_) throw EngineError(kErrInvalidArgument, "model weights are not loaded");
  ++seq.version;  // a step run ahead for seq would not follow these tokens
  const int n = (int)tokens.size();
  if (n == 0) throw EngineError(kErrInvalidArgument, "append needs at least one token");
  for (int r = 0; r < n; ++r)
    if (tokens[(size_t)r] < 0 || tokens[(size_t)r] >= cfg_.vocab)
      throw EngineError(kErrTokenOutOfRange, "token id " + std::to_string(tokens[(size_t)r]) + " at index " +
                                                  std::to_string(r) + " is outside the vocabulary [0, " +
                                                  std::to_string(cfg_.vocab) + ")");
  const int start = seq.length();
  if ((int64_t)start + n > seq.maxContext)
    throw EngineError(kErrContextOverflow, "sequence of " + std::to_string(start) + " tokens cannot take " +
                                               std::to_string(n) + " more: the context holds " + std::to_string(seq.maxContext));
  AppendResult res;
  PendingWrites writes{{&seq}};
  try {
    seq.kv->prepareWrite(start, n);  // throws LCKV_KV_CACHE_FULL, changing nothing, when the pool is short
    const bool needLogits = logits != LogitsWanted::None || sampling != nullptr;
    const bool download = logits != LogitsWanted::None;  // sampling alone reads them on the backend
    if (prefill.mode == PrefillMode::Sequential && n > 1) {
      for (int r = 0; r < n; ++r) {
        prefill.throwIfCancelled();
        const bool want = logits == LogitsWanted::All || (needLogits && r == n - 1);
        forwardChunk(seq, tokens.data() + r, 1, start + r, prefill, want ? LogitsWanted::Last : LogitsWanted::None,
                     download, res);
      }
      res.passes = 1;
    } else {
      const LogitsWanted rows = logits == LogitsWanted::All ? LogitsWanted::All
                                : needLogits                ? LogitsWanted::Last
                                                            : LogitsWanted::None;
      forwardChunk(seq, tokens.data(), n, start, prefill, rows, download, res);
      if (res.exactPrefix >= 0) {
        // The fixed point did not converge within its pass limit: positions from exactPrefix
        // on are run token by token, reading the exact K/V before them and overwriting what the
        // passes left at their own positions.
        const int from = res.exactPrefix;
        if (download) res.logits.resize(logits == LogitsWanted::All ? (size_t)from * cfg_.vocab : 0);
        for (int r = from; r < n; ++r) {
          prefill.throwIfCancelled();
          const bool want = logits == LogitsWanted::All || (needLogits && r == n - 1);
          forwardChunk(seq, tokens.data() + r, 1, start + r, prefill, want ? LogitsWanted::Last : LogitsWanted::None,
                       download, res);
        }
        res.exactPrefix = -1;
      }
    }
  } catch (const std::bad_alloc&) {
    throw EngineError(kErrOutOfMemory, "out of memory running the forward for " + std::to_string(n) + " tokens");
  }
  if (sampling) {
    // Sample before committing, so a failure here leaves the sequence as it was.
    std::vector<int32_t> history;
    if (sampling->repetitionPenalty != 1.0f) {
      history = seq.tokens;
      history.insert(history.end(), tokens.begin(), tokens.end());
    }
    try {
      res.sampled = backend_->sample(res.lastLogits, cfg_.vocab, *sampling, history, (uint64_t)(start + n));
    } catch (const std::bad_alloc&) {
      throw EngineError(kErrOutOfMemory, "out of memory while sampling");
    }
  }
  res.lastLogits = Tensor{};
  seq.tokens.insert(seq.tokens.end(), tokens.begin(), tokens.end());
  writes.commit();
  releaseOutsideWindow(seq);
  return res;
}

}  // namespace lckv
