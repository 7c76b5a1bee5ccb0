// The batched decode step (decodeBatch): its recording keys, and run-ahead, which queues the
// next step on the device before the host has read this one's tokens.
#include <algorithm>
#include <deque>
#include <new>
#include <string>

#include "errors.h"
#include "model_internal.h"

namespace lckv {

// A decode step's recording: per batch size, rows sampled, table stride and 256 positions of
// context (the attention's split-K plan is fixed in a recording). The stride is a power of two
// (viewPages rounds it), so its log takes 6 bits; rows and sampled rows 16 bits each, which is
// why larger batches run unrecorded (kMaxRecordedRows).
constexpr int kMaxRecordedRows = 0xFFFF;
static uint64_t stepKey(int n, int sampled, int stride, int maxPos) {
  uint64_t logStride = 0;
  while ((1 << logStride) < stride) ++logStride;
  return (uint64_t)n << 48 | (uint64_t)sampled << 32 | logStride << 26 | (uint64_t)(maxPos / Backend::kStepContextBucket);
}

static bool sameSampling(const SamplingParams& a, const SamplingParams& b) {
  return a.temperature == b.temperature && a.topK == b.topK && a.topP == b.topP && a.minP == b.minP &&
         a.repetitionPenalty == b.repetitionPenalty && a.seed == b.seed && a.presencePenalty == b.presencePenalty &&
         a.frequencyPenalty == b.frequencyPenalty && a.penaltyFrom == b.penaltyFrom && a.logitBias == b.logitBias &&
         a.logprobs == b.logprobs;
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
    // The residuals too are this step's: a step run ahead stays in the page its residual holds.
    const Backend::StepInputs in{nullptr, next.data(), n, s.tables.data(), (int)s.tables.size(), s.rowSeq.data(),
                                 s.residuals.data(), (int)s.residuals.size()};
    Tensor lg;
    // Only a recorded step runs ahead: it writes nothing but its own buffers and the K/V of each
    // sequence's next position, past its length until the next call appends it.
    if (!be.replayStepFromSampled(stepKey(n, n, s.kv.stride, maxPos), in, fromSlot, lg)) return;
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
//
// Rows past params.size() only append their token: a prompt's tokens before its last, as rows
// of the shared step. No logits are computed for them, and run-ahead is off for a batch that has
// them (their next token is the prompt's, not a sampled one).
//
// rowsPerSeq (null: one row each) gives a sequence several rows, its next tokens at consecutive
// positions: a chunk of a prompt in the same step as the decode rows (a mixed step). Every layer
// writes the K/V of all rows before its attention reads any, so each row sees the rows before it
// in its sequence, as in a prefill chunk. That is the exact result only where one pass is: a
// model without a cyclic layer group (with one, a token reads the final K/V of the one before).
// Such a step is not recorded (its rows are not one per sequence), and a sampled sequence has
// one row.
std::vector<int32_t> Model::decodeBatch(const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& tokens,
                                        const std::vector<SamplingParams>& params, bool runAhead,
                                        std::vector<TokenLogprobs>* logprobs, const std::vector<int32_t>* rowsPerSeq) {
  if (!ready_) throw EngineError(kErrInvalidArgument, "model weights are not loaded");
  const int numSeqs = (int)seqs.size(), sampled = (int)params.size();
  if (numSeqs == 0 || sampled > numSeqs)
    throw EngineError(kErrInvalidArgument, "decodeBatch needs at least one sequence and at most one sampling setting per sequence");
  std::vector<int32_t> rows((size_t)numSeqs, 1);
  if (rowsPerSeq) {
    if ((int)rowsPerSeq->size() != numSeqs)
      throw EngineError(kErrInvalidArgument, "decodeBatch needs one row count per sequence");
    rows = *rowsPerSeq;
  }
  int64_t total = 0;
  bool severalRows = false;
  for (int i = 0; i < numSeqs; ++i) {
    const int k = rows[(size_t)i];
    if (k < 1) throw EngineError(kErrInvalidArgument, "decodeBatch: every sequence needs at least one row, got " + std::to_string(k));
    if (k > 1 && i < sampled) throw EngineError(kErrInvalidArgument, "decodeBatch: a sampled sequence has one row");
    severalRows = severalRows || k > 1;
    total += k;
  }
  if ((int64_t)tokens.size() != total) throw EngineError(kErrInvalidArgument, "decodeBatch needs one token per row");
  if (severalRows && cfg_.plan.hasCycle())
    throw EngineError(kErrInvalidArgument,
                      "several rows of one sequence in a step need a model without a cyclic layer group (there a token reads "
                      "the final K/V of the one before)");
  const int n = (int)total;
  // Sequences exist only on a pool, so a batch has one.
  const KvLayout& L = pool_->layout();
  for (int i = 0; i < numSeqs; ++i) {
    for (int q = 0; q < i; ++q)
      if (seqs[(size_t)q] == seqs[(size_t)i]) throw EngineError(kErrInvalidArgument, "a sequence appears twice in one batch");
    const int start = seqs[(size_t)i]->length(), k = rows[(size_t)i];
    if ((int64_t)start + k > seqs[(size_t)i]->maxContext)
      throw EngineError(kErrContextOverflow, "a sequence in the batch is full (" + std::to_string(seqs[(size_t)i]->maxContext) + " tokens)");
    // A channel-key type's residual holds the one page being written (kv_format.h), so a
    // sequence's rows must end in the page of its first: past it they would land in a page the
    // residual does not hold. The scheduler cuts an int4 prompt's chunks at its pages.
    if (kvTypeChannelKeys(L.type) && start % L.pageTokens + k > L.pageTokens)
      throw EngineError(kErrInvalidArgument,
                        "decodeBatch: rows of sequence " + std::to_string(i) + " must lie in one " + std::to_string(L.pageTokens) +
                            "-token page of its " + kvTypeName(L.type) + " K/V cache (the residual holds one page): " +
                            std::to_string(k) + " rows from position " + std::to_string(start) + " cross into the next page");
  }
  for (int r = 0; r < n; ++r)
    if (tokens[(size_t)r] < 0 || tokens[(size_t)r] >= cfg_.vocab)
      throw EngineError(kErrTokenOutOfRange, "token id " + std::to_string(tokens[(size_t)r]) + " is outside the vocabulary [0, " +
                                                  std::to_string(cfg_.vocab) + ")");
  Backend& be = *backend_;
  BackendRange range(be, "decode batch");
  std::vector<int32_t> pos((size_t)n), out((size_t)sampled), rowSeq((size_t)n);
  for (int i = 0, r = 0; i < numSeqs; ++i)
    for (int k = 0; k < rows[(size_t)i]; ++k, ++r) {
      pos[(size_t)r] = seqs[(size_t)i]->length() + k;
      rowSeq[(size_t)r] = i;
    }
  // A recording's inputs are one row per sequence (its page tables are numbered by row).
  const bool recordable = n <= kMaxRecordedRows && !severalRows;
  const bool queueChoice = runAheadOn_ && recordable && sampled == n && be.canQueueSampling(params.data(), n);
  const bool queuedAhead = queueChoice && aheadMatches(seqs, tokens, params);
  if (ahead_.queued && !queuedAhead) runAheadDiscarded_.fetch_add(1, std::memory_order_relaxed);
  const int slot = queuedAhead ? ahead_.slot : 0;
  ahead_.queued = false;
  PendingWrites writes{seqs};  // the batch is all or nothing
  // The residuals this step moves off the page they hold, put back if it fails (before `writes`
  // gives the pages back), so each sequence's rows read as they did.
  std::deque<ResidualBackup> backups;
  try {
    for (int i = 0; i < numSeqs; ++i)  // the commit below cannot fail halfway
      seqs[(size_t)i]->tokens.reserve(seqs[(size_t)i]->tokens.size() + (size_t)rows[(size_t)i]);
    // Every sequence's pages before any residual moves: a full pool refuses the batch as it was.
    for (int i = 0; i < numSeqs; ++i) seqs[(size_t)i]->kv->prepareWrite(seqs[(size_t)i]->length(), rows[(size_t)i]);
    // With a step to queue ahead, then the page of each sequence's next position where the pool
    // can spare it: the step ahead runs only where every sequence's next position is in a page
    // it holds alone (queueStepAhead), and sequences of different lengths (requests that started
    // decoding at different steps) would otherwise have one of them open a new page at nearly
    // every step. A page taken early stays with its sequence, which writes it next. Taken after
    // every sequence's own pages, so that an early page never takes the page another row of this
    // step needs. (A channel-key type's step ahead stays in the page its residual holds, so there
    // it cannot help; a step queued ahead holds its own pages already.)
    if (queueChoice && runAhead && !kvTypeChannelKeys(L.type))
      for (int i = 0; i < numSeqs; ++i) {
        KvPages& kv = *seqs[(size_t)i]->kv;
        const int next = seqs[(size_t)i]->length() + rows[(size_t)i];
        if (next + 1 > seqs[(size_t)i]->maxContext || kv.writableInPlace(next)) continue;
        try {
          kv.prepareWrite(next, 1);
        } catch (const EngineError& e) {
          // The pool cannot spare it (refused before anything moved): this sequence's step ahead
          // waits. Anything else fails the step, and the rollback undoes it: a failed copy (were
          // the page shared) has moved pages and reservations, so no fallback could commit after
          // it, and host memory too short for an optional page is short for the step as well.
          if (e.code != kErrKvCacheFull) throw;
        }
      }
    for (SequenceState* q : seqs) {
      // Nor does this (writableInPlace checked it). The sequence's rows all lie in the page of its
      // first (checked above), the one page the residual holds.
      const int start = q->length();
      if (kvTypeChannelKeys(L.type) && start > 0 && q->kv->residualPage() != start / L.pageTokens) {
        backups.emplace_back(*this, *q);
        backups.back().save();
      }
      moveResidual(*q, start);
    }
    Scratch s;
    viewPages(s, seqs, rowSeq, true);
    if (queuedAhead) {
      runAheadUsed_.fetch_add(1, std::memory_order_relaxed);
    } else {
      int maxPos = 0;
      for (int p : pos) maxPos = std::max(maxPos, p);
      const uint64_t key = stepKey(n, sampled, s.kv.stride, maxPos);
      const Backend::StepInputs in{tokens.data(), pos.data(), n, s.tables.data(), (int)s.tables.size(), rowSeq.data(),
                                   s.residuals.data(), (int)s.residuals.size()};
      Tensor lg;
      if (!(recordable && be.replayStep(key, in, lg))) {
        auto forward = [&] {
          s.pendingResidual = false;  // a failed recording may have stopped mid-layer
          allocScratch(s, n);
          be.embed(tokens.data(), pos.data(), n, embed_, opt(posEmbed_), s.h);
          // One pass: a decode row's strict layers read only earlier, final positions, and a
          // chunk's rows come only without a cyclic group.
          runLayers(s, n, pos.data(), 0, cfg_.numLayers - 1, false);
          return sampled > 0 ? computeLogits(s, n, 0, sampled) : Tensor{};
        };
        bool ran = false;
        if (recordable && be.beginStepCapture(key, in)) {
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
      std::vector<uint64_t> positions((size_t)sampled);
      for (int r = 0; r < sampled; ++r) positions[(size_t)r] = (uint64_t)(pos[(size_t)r] + 1);
      if (queueChoice) {
        be.queueSampleRows(lg, n, cfg_.vocab, params.data(), positions.data(), slot);
      } else if (sampled > 0) {
        std::vector<std::vector<int32_t>> histories((size_t)sampled);
        bool wantLogprobs = false;
        for (int r = 0; r < sampled; ++r) {
          if (readsHistory(params[(size_t)r])) {
            histories[(size_t)r] = seqs[(size_t)r]->tokens;
            histories[(size_t)r].push_back(tokens[(size_t)r]);
          }
          wantLogprobs = wantLogprobs || params[(size_t)r].logprobs >= 0;
        }
        // Log-probabilities only where a row asks (the common path allocates nothing for them).
        if (wantLogprobs && logprobs) logprobs->assign((size_t)sampled, TokenLogprobs{});
        be.sampleRows(lg, sampled, cfg_.vocab, params.data(), histories.data(), positions.data(), out.data(),
                      wantLogprobs && logprobs ? logprobs->data() : nullptr);
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
  for (int r = 0; r < n; ++r) seqs[(size_t)rowSeq[(size_t)r]]->tokens.push_back(tokens[(size_t)r]);
  for (ResidualBackup& b : backups) b.release();
  writes.commit();
  for (SequenceState* q : seqs) releaseOutsideWindow(*q);
  return out;
}

}  // namespace lckv
