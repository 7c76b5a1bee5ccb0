// The K/V pool and the sequences in it: creating, forking, truncating, releasing K/V outside
// a sliding window, and context shift.
#include <algorithm>
#include <new>
#include <string>

#include "errors.h"
#include "model_internal.h"

namespace lckv {

uint64_t SequenceState::nextId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

KvLayout Model::kvLayout(KvType type, int pageTokens) const {
  KvLayout layout;
  layout.slots = (int)cfg_.plan.kvLayers.size();
  layout.kvDim = cfg_.numKvHeads * cfg_.headDim;
  layout.kvHeads = cfg_.numKvHeads;
  layout.pageTokens = pageTokens;
  layout.type = type;
  const std::string problem = kvHeadDimProblem(type, cfg_.headDim);
  if (!problem.empty()) throw EngineError(kErrInvalidArgument, problem);
  return layout;
}

std::string Model::kvTypeProblem(KvType type) const {
  const std::string problem = kvHeadDimProblem(type, cfg_.headDim);
  if (!problem.empty()) return problem;
  // Layers differ only in their diagonal rule and window, which no backend's limits depend on.
  AttentionSpec spec;
  spec.numHeads = cfg_.numHeads;
  spec.numKvHeads = cfg_.numKvHeads;
  spec.headDim = cfg_.headDim;
  return backend_->attentionProblem(spec, type);
}

void Model::createPool(int pages, int pageTokens, KvType type) {
  if (pool_) throw EngineError(kErrInvalidArgument, "the K/V pool already exists");
  if (pages <= 0 || pageTokens <= 0) throw EngineError(kErrInvalidArgument, "the K/V pool needs pages > 0 and pageTokens > 0");
  const std::string problem = kvTypeProblem(type);
  if (!problem.empty()) throw EngineError(kErrInvalidArgument, problem);
  const KvLayout layout = kvLayout(type, pageTokens);
  const std::string pageProblem = backend_->kvPageProblem(type, pageTokens);
  if (!pageProblem.empty()) throw EngineError(kErrInvalidArgument, pageProblem);
  try {
    pool_ = std::make_shared<KvPool>(*backend_, layout, pages);
  } catch (const std::bad_alloc&) {
    throw EngineError(kErrOutOfMemory, "out of memory allocating a K/V pool of " + std::to_string(pages) + " pages (" +
                                           std::to_string((int64_t)pages * layout.pageBytes()) + " bytes)");
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
  const bool restore = residualCheckpointRestores(seq, n);
  ++seq.version;
  seq.tokens.resize((size_t)n);
  seq.kv->keep(n);
  if (restore) {
    putResidualRows(*backend_, *pool_, seq, seq.residualCheckpoint.rows);
    seq.kv->setResidualPage(seq.residualCheckpoint.page);
  }
  // The checkpoint holds while the rows before its length stay what it saved.
  if (restore || n < seq.residualCheckpoint.length) seq.residualCheckpoint = {};
}

bool Model::residualCheckpointRestores(const SequenceState& seq, int n) const {
  const SequenceState::ResidualCheckpoint& cp = seq.residualCheckpoint;
  if (cp.rows.empty() || n > cp.length || n > seq.length()) return false;
  const int P = pool_->layout().pageTokens;
  return n > 0 && (n - 1) / P == cp.page && seq.kv->residualPage() != cp.page && !seq.kv->residualShared() &&
         (int)seq.kv->residual().size() == cp.rows.rows;
}

int Model::exactRewind(const SequenceState& seq, int n) const {
  return residualCheckpointRestores(seq, n) ? n : seq.kv->exactRewind(n);
}

void Model::checkpointResidual(SequenceState& seq) {
  seq.residualCheckpoint = {};
  const KvLayout& L = pool_->layout();
  const int n = seq.length(), P = L.pageTokens;
  // The residual holds the page of the last token (a partial page, or a full one not yet left).
  if (!kvTypeChannelKeys(L.type) || n == 0 || seq.kv->residualPage() != (n - 1) / P) return;
  seq.residualCheckpoint = {copyResidualRows(*backend_, *pool_, seq), (n - 1) / P, n};
}

void Model::dropResidualCheckpoint(SequenceState& seq) { seq.residualCheckpoint = {}; }

void Model::moveResidual(SequenceState& seq, int start) {
  const KvLayout& L = pool_->layout();
  if (!kvTypeChannelKeys(L.type)) return;
  const int P = L.pageTokens, page = start / P;
  if (seq.kv->residualStale(start)) {
    // Rows [page * P, start) are read back from their codes (keys per channel, values per
    // token) and written to the residual in bf16: their second rounding.
    const int from = page * P, n = start - from, kvd = L.kvDim;
    Backend& be = *backend_;
    Scratch s;
    viewPages(s, {&seq}, std::vector<int32_t>((size_t)n, 0));
    std::vector<int32_t> pos((size_t)n);
    for (int r = 0; r < n; ++r) pos[(size_t)r] = from + r;
    std::vector<std::vector<float>> host((size_t)L.slots);
    for (int slot = 0; slot < L.slots; ++slot) be.kvRead(s.kv, 0, slot, from, n, host[(size_t)slot]);  // from the codes: stale
    Tensor k = be.alloc(n, kvd), v = be.alloc(n, kvd);
    s.residualPage[0] = page;
    for (int slot = 0; slot < L.slots; ++slot) {
      be.writeRows(k, 0, n, host[(size_t)slot].data());
      be.writeRows(v, 0, n, host[(size_t)slot].data() + (size_t)n * kvd);
      be.kvWrite(s.kv, slot, k, v, n, pos.data());  // no row ends the page: nothing is quantized
    }
  }
  seq.kv->setResidualPage(page);
}

void Model::readKv(SequenceState& seq, int slot, int start, int n, std::vector<float>& out) {
  if (slot < 0 || slot >= (int)cfg_.plan.kvLayers.size())
    throw EngineError(kErrInvalidArgument, "readKv: slot " + std::to_string(slot) + " is outside the model's " +
                                               std::to_string(cfg_.plan.kvLayers.size()) + " KV layers");
  if (start < 0 || n < 0 || start + n > seq.length())
    throw EngineError(kErrInvalidArgument, "readKv: positions [" + std::to_string(start) + ", " + std::to_string(start + n) +
                                               ") are outside the sequence's " + std::to_string(seq.length()) + " tokens");
  out.clear();
  if (n == 0) return;
  std::lock_guard<std::mutex> lk(mutex_);
  Scratch s;
  viewPages(s, {&seq}, std::vector<int32_t>(1, 0));
  backend_->kvRead(s.kv, 0, slot, start, n, out);
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
  // window keeps one spare position, see releaseOutsideWindow): at most ceil((W + 1) / P) + 1,
  // and a channel-key type's residual.
  return (releaseWindow_ + 1 + P - 1) / P + 1 + pool_->layout().residualParts();
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
  seq.residualCheckpoint = {};  // its rows move
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
    const bool channelKeys = kvTypeChannelKeys(pool_->layout().type);
    const int residualPage = s.residualPage[0];
    for (int slot = 0; slot < (int)cfg_.plan.kvLayers.size(); ++slot) {
      s.residualPage[0] = residualPage;  // the last page reads from the residual, if it holds it
      be.kvRead(s.kv, 0, slot, sink, moved, host);  // K rows, then V rows
      be.writeRows(k, 0, moved, host.data());
      be.writeRows(v, 0, moved, host.data() + (size_t)moved * kvd);
      be.rope(k, moved, cfg_.numKvHeads, cfg_.headDim, back.data(), cfg_.ropeInvFreq, 1.0f);
      if (!channelKeys) {
        be.kvWrite(s.kv, slot, k, v, moved, pos.data());
        continue;
      }
      // A channel-key type writes a page at a time through the residual (each full page is
      // quantized from it), which ends holding the last page.
      for (int a = 0; a < moved;) {
        const int b = std::min(moved, pool_->layout().pageEnd(sink + a) - sink);
        s.residualPage[0] = (sink + a) / P;
        Tensor kp = tensorRows(k, a, b - a), vp = tensorRows(v, a, b - a);
        be.kvWrite(s.kv, slot, kp, vp, b - a, pos.data() + a);
        a = b;
      }
    }
    if (channelKeys) seq.kv->setResidualPage((len - drop - 1) / P);
  } catch (...) {
    keepSink();
    throw;
  }
}

}  // namespace lckv
