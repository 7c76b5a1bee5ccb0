// Appending tokens: the prefill of a chunk (fixed-point, iterative or sequential passes over the
// cyclic group) and append(), which commits the chunk's pages and tokens only once every step
// has succeeded, and otherwise leaves the sequence as it was.
#include <algorithm>
#include <cmath>
#include <new>
#include <string>

#include "errors.h"
#include "model_internal.h"

namespace lckv {

void PrefillSpec::throwIfCancelled() const {
  if (cancel && *cancel != 0) throw EngineError(kErrAborted, "the prefill was aborted");
}

Backend::KvMotion Backend::kvMotion(const KvView& kv, int seq, int slot, int start, int n, std::shared_ptr<void>& snapshot) {
  KvMotion m;
  std::vector<float> cur;
  kvRead(kv, seq, slot, start, n, cur);
  if (!snapshot) {
    snapshot = std::make_shared<std::vector<float>>(std::move(cur));
    return m;
  }
  std::vector<float>& prev = *std::static_pointer_cast<std::vector<float>>(snapshot);
  if (prev.size() != cur.size())
    throw EngineError(kErrInvalidArgument, "kvMotion: the snapshot holds another number of values than this range");
  m.same = cur == prev;
  for (size_t e = 0; e < cur.size(); ++e) {
    const double d = std::fabs((double)cur[e] - (double)prev[e]);
    m.moved = std::isnan(d) ? INFINITY : std::max(m.moved, d);
    m.largest = std::max(m.largest, (double)std::fabs(cur[e]));
  }
  prev.swap(cur);
  return m;
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
    // The fixed point compares each pass's K/V read from above with the last one's
    // (Backend::kvMotion); the iterative mode compares nothing, so its passes queue on the device
    // without a sync between them.
    std::vector<std::shared_ptr<void>> snapshots(upwardTargetSlots_.size());
    if (prefill.mode == PrefillMode::FixedPoint)
      for (size_t j = 0; j < upwardTargetSlots_.size(); ++j) be.kvMotion(s.kv, 0, upwardTargetSlots_[j], start, n, snapshots[j]);
    int passes = 0;
    const int maxPasses = prefill.mode == PrefillMode::Iterative ? std::max(1, prefill.passes) : std::min(n, kFixedPointMaxPasses);
    bool converged = false;
    while (true) {
      prefill.throwIfCancelled();
      BackendRange passRange(be, "cyclic group pass");
      be.copyRows(s.h0, 0, s.h, 0, n);
      // The passes read only the top layer's K/V from it: its attention and MLP run once, after
      // the last pass (its query and input stay in s.q and s.h).
      // The first pass over a sequence's first chunk: a layer reading from above sees only the
      // zeros written before it (no earlier positions), so its attention adds nothing.
      const bool zeroAbove = passes == 0 && start == 0;
      for (int l = low; l < high; ++l) runLayer(s, n, pos.data(), l, LayerPart::Whole, zeroAbove && plan.target[l] > l);
      runLayer(s, n, pos.data(), high, LayerPart::UpToKv);
      ++passes;
      if (passes >= maxPasses) break;  // after n passes every position is exact by induction
      if (prefill.mode == PrefillMode::FixedPoint) {
        double moved = 0, largest = 0;
        bool same = true;
        for (size_t j = 0; j < upwardTargetSlots_.size(); ++j) {
          const Backend::KvMotion m = be.kvMotion(s.kv, 0, upwardTargetSlots_[j], start, n, snapshots[j]);
          same = same && m.same;
          moved = std::max(moved, m.moved);  // +inf for a NaN: never counts as converged
          largest = std::max(largest, m.largest);
        }
        // This pass read (to within the tolerance) the K/V it wrote: the fixed point.
        // An infinite value makes every change "within" tolerance x inf: then only `same` counts.
        if (same || (prefill.tolerance > 0 && std::isfinite(largest) && moved <= prefill.tolerance * largest)) {
          converged = true;
          break;
        }
      }
    }
    runLayer(s, n, pos.data(), high, LayerPart::AfterKv);
    settleResidual(s, n);  // as runLayers does, before the layers above read h
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

void Model::appendPiece(SequenceState& seq, const int32_t* tokens, int n, int start, const PrefillSpec& prefill,
                        LogitsWanted logits, bool sample, AppendResult& res) {
  // Every piece starts by checking the flag, a piece of one token too (a cancelled append then
  // does nothing whatever its length and the pages it crosses; append() undoes earlier pieces).
  prefill.throwIfCancelled();
  const bool needLogits = logits != LogitsWanted::None || sample;
  const bool download = logits != LogitsWanted::None;  // sampling alone reads them on the backend
  if (prefill.mode == PrefillMode::Sequential && n > 1) {
    for (int r = 0; r < n; ++r) {
      prefill.throwIfCancelled();
      const bool want = logits == LogitsWanted::All || (needLogits && r == n - 1);
      forwardChunk(seq, tokens + r, 1, start + r, prefill, want ? LogitsWanted::Last : LogitsWanted::None, download, res);
    }
    res.passes = std::max(res.passes, 1);
    return;
  }
  const LogitsWanted rows = logits == LogitsWanted::All ? LogitsWanted::All : needLogits ? LogitsWanted::Last : LogitsWanted::None;
  const size_t before = res.logits.size();
  forwardChunk(seq, tokens, n, start, prefill, rows, download, res);
  if (res.exactPrefix >= 0) {
    // The fixed point did not converge within its pass limit: positions from exactPrefix on
    // are run token by token, reading the exact K/V before them and overwriting what the
    // passes left at their own positions.
    const int from = res.exactPrefix;
    if (download) res.logits.resize(before + (logits == LogitsWanted::All ? (size_t)from * cfg_.vocab : 0));
    for (int r = from; r < n; ++r) {
      prefill.throwIfCancelled();
      const bool want = logits == LogitsWanted::All || (needLogits && r == n - 1);
      forwardChunk(seq, tokens + r, 1, start + r, prefill, want ? LogitsWanted::Last : LogitsWanted::None, download, res);
    }
    res.exactPrefix = -1;
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
  ResidualBackup backup(*this, seq);  // undone after `writes`
  try {
    seq.kv->prepareWrite(start, n);  // throws LCKV_KV_CACHE_FULL, changing nothing, when the pool is short
    const KvLayout& L = pool_->layout();
    if (!kvTypeChannelKeys(L.type)) {
      appendPiece(seq, tokens.data(), n, start, prefill, logits, sampling != nullptr, res);
    } else {
      // A page at a time: a query reads the page of its own position from the residual, which
      // holds one page (kv_format.h). The first piece fills the page the sequence ends in. When
      // the append moves the residual off the page it holds (to a later page, or to the first
      // page when the sequence ends at a page's end), a failure puts the residual back as it was,
      // so the rows before `start` read as they did.
      const int P = L.pageTokens;
      for (int a = 0; a < n;) {
        const int b = std::min(n, L.pageEnd(start + a) - start);
        if (a == 0 && start > 0 && (b < n || seq.kv->residualPage() != start / P)) backup.save();
        moveResidual(seq, start + a);
        const bool lastPiece = b == n;
        appendPiece(seq, tokens.data() + a, b - a, start + a, prefill,
                    logits == LogitsWanted::All ? LogitsWanted::All : lastPiece ? logits : LogitsWanted::None,
                    lastPiece && sampling != nullptr, res);
        a = b;
      }
    }
  } catch (const std::bad_alloc&) {
    throw EngineError(kErrOutOfMemory, "out of memory running the forward for " + std::to_string(n) + " tokens");
  }
  if (sampling) {
    // Sample before committing, so a failure here leaves the sequence as it was.
    std::vector<int32_t> history;
    if (readsHistory(*sampling)) {
      history = seq.tokens;
      history.insert(history.end(), tokens.begin(), tokens.end());
    }
    try {
      res.sampled = backend_->sample(res.lastLogits, cfg_.vocab, *sampling, history, (uint64_t)(start + n),
                                     sampling->logprobs >= 0 ? &res.sampledLogprobs : nullptr);
    } catch (const std::bad_alloc&) {
      throw EngineError(kErrOutOfMemory, "out of memory while sampling");
    }
  }
  res.lastLogits = Tensor{};
  seq.tokens.insert(seq.tokens.end(), tokens.begin(), tokens.end());
  backup.release();
  writes.commit();
  releaseOutsideWindow(seq);
  return res;
}

}  // namespace lckv
