// The model: weights, the KV plan, and the forward written once over the Backend interface.
#pragma once
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "config.h"
#include "kv_pool.h"
#include "sampling.h"
#include "weights.h"

namespace lckv {

// How a prompt chunk is prefilled when the plan has layers that read KV from above.
enum class PrefillMode {
  FixedPoint,  // iterate the cyclic group until its KV stops changing (at most n passes)
  Sequential,  // token by token (exact)
  Iterative,   // exactly `passes` passes from zero KV (the reference's training-time scheme)
};

struct PrefillSpec {
  PrefillMode mode = PrefillMode::FixedPoint;
  int passes = 1;          // Iterative: how many
  // FixedPoint: converged when no K/V value read from above moved by more than tolerance times
  // the largest such value. 0 = bit for bit (always reached, after at most n passes).
  double tolerance = 0.0;
  // Set non-zero by another thread to stop the prefill: it is checked before each pass and each
  // token, and the append then fails with LCKV_ABORTED, leaving the sequence as it was.
  const volatile int32_t* cancel = nullptr;
  void throwIfCancelled() const;
};

enum class LogitsWanted { None, Last, All };

// One sequence's state: its tokens and its pages of the model's K/V pool. Only the positions
// below `tokens.size()` are valid; a failed append leaves the tokens untouched.
struct SequenceState {
  std::unique_ptr<KvPages> kv;
  std::vector<int32_t> tokens;
  int maxContext = 0;
  int length() const { return (int)tokens.size(); }
  // Never reused by another sequence, and bumped by every change other than a decode step
  // (append, truncate, shift, fork): a step run ahead for this sequence holds only while both
  // are what they were when it was queued.
  const uint64_t id = nextId();
  uint64_t version = 0;
  // A channel-key type's residual rows as they were at `length` tokens, holding `page`, the page
  // of the last token (Model::checkpointResidual): a rewind back to `length`, or into that page
  // before it, puts them back, so it stays exact although later writes moved the residual on
  // (and quantized the page). Empty rows: none.
  struct ResidualCheckpoint {
    Tensor rows;
    int page = -1, length = 0;
  };
  ResidualCheckpoint residualCheckpoint;

 private:
  static uint64_t nextId();
};

struct AppendResult {
  int passes = 0;               // passes over the cyclic group (1 when the plan has none)
  std::vector<float> logits;    // [rows, vocab] as asked
  int32_t sampled = -1;         // next token when sampling was asked
  TokenLogprobs sampledLogprobs;  // its log-probabilities, when the sampling asked for them
  Tensor lastLogits;            // the last position's logits, on the backend (for sampling)
  // Fixed-point prefill that reached its pass limit without converging: the number of leading
  // positions of the chunk that are exact (the rest are then run token by token). -1 otherwise.
  int exactPrefix = -1;
};

// Each group of members below lives in the source file its comment names.
class Model {
 public:
  // ---- construction (model.cpp) ----
  Model(ModelConfig cfg, std::unique_ptr<Backend> backend);
  // Waits for the backend's queued work before the pool and weights it reads are freed.
  ~Model();
  const ModelConfig& config() const { return cfg_; }
  Backend& backend() { return *backend_; }
  // Serialises forwards over one model (the CPU backend's thread pool is shared).
  std::mutex& mutex() { return mutex_; }

  // ---- the tensor registry (model_weights.cpp) ----
  // Loads one tensor, checking its shape against what the config expects.
  void loadTensor(const TensorSource& src);
  // Throws naming the first required tensor that was never loaded.
  void finalize();
  bool ready() const { return ready_; }
  size_t weightBytes() const { return weightBytes_; }
  // Names of the tensors this config needs, with their [rows, cols].
  std::map<std::string, std::pair<int64_t, int64_t>> expectedTensors() const;

  // ---- the K/V pool and the sequences in it (sequences.cpp) ----
  // The page layout of this model's K/V cache in `type` (throws when the head size cannot take it).
  KvLayout kvLayout(KvType type, int pageTokens) const;
  // Why this model cannot keep its K/V in `type` on its backend ("" when it can): a head size
  // the type's layout cannot take, or heads the backend's kernels lack (Backend::attentionProblem).
  std::string kvTypeProblem(KvType type) const;
  // Allocates the K/V pool: `pages` pages of `pageTokens` positions each, values of `type` (which
  // kvTypeProblem must pass). Once, before the first sequence.
  void createPool(int pages, int pageTokens, KvType type);
  bool hasPool() const { return pool_ != nullptr; }
  KvPool& pool() { return *pool_; }

  std::unique_ptr<SequenceState> createSequence(int maxContext);
  // A copy of seq that shares its pages (copy-on-write).
  std::unique_ptr<SequenceState> forkSequence(SequenceState& seq);
  // Rewinds seq to its first n tokens; pages past them go back to the pool. Refused when a
  // sliding window has already released K/V that the token at n would need. With a
  // channel-key K/V type (int4) a rewind into a quantized page is lossy once (kv_format.h):
  // exactRewind(seq, n) < n says so.
  void truncateSequence(SequenceState& seq, int n);
  // The largest m <= n at which truncateSequence(seq, m) keeps the K/V exact (KvPages::exactRewind,
  // or n where the residual checkpoint restores n's page).
  int exactRewind(const SequenceState& seq, int n) const;
  // Saves seq's residual rows while they hold its last token's page in bf16 (a channel-key type;
  // nothing otherwise), so that a rewind to its length after later writes stays exact: an append of
  // several calls that fails part way (lib's chunked prefill) rewinds to the checkpoint. Until
  // dropResidualCheckpoint, a truncation below its length, or a context shift.
  void checkpointResidual(SequenceState& seq);
  void dropResidualCheckpoint(SequenceState& seq);
  // Context shift (StreamingLLM's attention sinks): drops tokens [sink, sink + drop) and moves
  // the later ones down by `drop` positions. Their K is re-rotated by -drop with RoPE (learned
  // position embeddings cannot be moved, so there the K/V stay as computed). sink and drop are
  // whole pages. The result approximates, not equals, a sequence that never held the dropped
  // tokens: the K/V kept were computed with them in view. Throws LCKV_KV_CACHE_FULL and changes
  // nothing when the pool cannot supply the copies of shared moved pages (pagesToShift); after a
  // device error midway the sequence keeps its first `sink` tokens only.
  void shiftSequence(SequenceState& seq, int sink, int drop);
  // K then V of KV slot `slot` at positions [start, start + n) of seq, as attention reads them
  // (decoded from the cache's type): 2 * n * kvDim floats. For tools that study the cache
  // (lckv condense's calibration).
  void readKv(SequenceState& seq, int slot, int start, int n, std::vector<float>& out);
  // The most pages a sequence holds at once while it decodes, when every layer reads through a
  // sliding window (their K/V below the widest window is released); 0 for other models.
  int decodeWindowPages() const;
  // Pages shiftSequence(seq, sink, drop) takes from the pool beyond those it frees (copies of
  // shared pages whose keys it rotates); reserve them first.
  int pagesToShift(const SequenceState& seq, int sink, int drop) const;

  // ---- appending tokens: the prefill modes (prefill.cpp) ----
  // Appends tokens to the sequence, running the forward; optionally returns logits and samples.
  AppendResult append(SequenceState& seq, const std::vector<int32_t>& tokens, const PrefillSpec& prefill,
                      LogitsWanted logits, const SamplingParams* sampling);

  // ---- the batched decode step and run-ahead (decode_step.cpp) ----
  // One decode step for several sequences at once: row r appends tokens[r] to seqs[r] and, for
  // r < params.size(), samples its next token with params[r] (one result per such row); the
  // rows after those only append (a prompt's tokens run as batched token steps). The weights are
  // read once for the whole batch; each row's result is the same as when its sequence runs
  // alone. All or nothing: on error no sequence changes. runAhead false: the caller will not
  // continue this batch next, so no step is queued ahead (see the definition). logprobs: when
  // some row asks for log-probabilities (params[r].logprobs >= 0), one entry per sampled row
  // (filled for the rows that asked); untouched otherwise. rowsPerSeq (null: one each): the rows
  // of each sequence, its tokens consecutive in `tokens` (a prompt's chunk in a mixed step; only
  // for an unsampled sequence of a model without a cyclic layer group).
  std::vector<int32_t> decodeBatch(const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& tokens,
                                   const std::vector<SamplingParams>& params, bool runAhead = true,
                                   std::vector<TokenLogprobs>* logprobs = nullptr,
                                   const std::vector<int32_t>* rowsPerSeq = nullptr);

  // Run-ahead decoding (decodeBatch), on by default where the backend can.
  void setRunAhead(bool on) { runAheadOn_ = on; }
  // Steps run ahead whose result a decodeBatch call used, and those it threw away (the next
  // call asked for something else). Read from any thread.
  void runAheadStats(int64_t& used, int64_t& discarded) const {
    used = runAheadUsed_.load(std::memory_order_relaxed);
    discarded = runAheadDiscarded_.load(std::memory_order_relaxed);
  }

 private:
  // ---- the K/V pool and the sequences in it (sequences.cpp) ----
  // Throws unless sink and drop are whole pages within seq and the model can shift.
  void checkShift(const SequenceState& seq, int sink, int drop) const;
  // Whether a shift rotates moved keys (RoPE, and some tokens move): then it rewrites their pages.
  bool shiftRotates(const SequenceState& seq, int sink, int drop) const;
  void releaseOutsideWindow(SequenceState& seq);
  // Channel-key types: points seq's residual at the page of `start`, the next position written,
  // after reading that page's rows before `start` back from their codes when the residual
  // lacks them (a rewind into a quantized page: lossy once). Nothing for other types.
  void moveResidual(SequenceState& seq, int start);
  // Whether truncating seq to n puts the residual checkpoint's rows back (exactRewind).
  bool residualCheckpointRestores(const SequenceState& seq, int n) const;

  // ---- the forward (forward.cpp; Scratch is in model_internal.h) ----
  struct Layer {
    Tensor attnNormW, attnNormB, q, qB, k, kB, v, vB, o, oB, mlpNormW, mlpNormB, gate, gateB, up, upB, down, downB;
  };
  struct Scratch;

  // Layers first..last. With settle, the last layer's residual add is done; without, it stays
  // pending in s (computeLogits then folds it into the final norm).
  void runLayers(Scratch& s, int n, const int32_t* pos, int first, int last, bool settle = true);
  // Adds the last layer's output to h if it is still pending (h then holds the layer's result).
  void settleResidual(Scratch& s, int n);
  // A layer whole, or in two parts: up to its K/V write (the norm, the projections, RoPE and the
  // write; s.q and s.h then hold what the rest reads), and the rest (attention, output
  // projection, MLP). Between the cyclic group's passes only the top layer's K/V is read.
  // zeroKv: every key and value the layer's rows can see is zero (the first cyclic pass over a
  // sequence's first chunk, for a layer reading from above): its attention adds nothing, and
  // neither it nor the output projection runs (a layer with an output bias runs them).
  enum class LayerPart { Whole, UpToKv, AfterKv };
  void runLayer(Scratch& s, int n, const int32_t* pos, int layer, LayerPart part = LayerPart::Whole, bool zeroKv = false);
  void viewPages(Scratch& s, const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& rowSeq,
                 bool roundStride = false);
  void allocScratch(Scratch& s, int n);
  // Logits of rows rowStart .. rowStart + rows - 1 of the n rows in s.
  Tensor computeLogits(Scratch& s, int n, int rowStart, int rows);

  // ---- appending tokens: the prefill modes (prefill.cpp) ----
  void forwardChunk(SequenceState& seq, const int32_t* tokens, int n, int start, const PrefillSpec& prefill,
                    LogitsWanted want, bool download, AppendResult& res);
  // The tokens of one piece of an append, at [start, start + n): one forwardChunk in the
  // prefill's mode (token by token when sequential, and after a fixed point that did not
  // converge), its logits added to res as `logits` asks.
  void appendPiece(SequenceState& seq, const int32_t* tokens, int n, int start, const PrefillSpec& prefill,
                   LogitsWanted logits, bool needLogits, AppendResult& res);

  // ---- the batched decode step and run-ahead (decode_step.cpp) ----
  // The decode step queued ahead by the last decodeBatch call (see there): the batch it
  // continues, as it will be when that step's tokens are appended, and the slot its tokens go to.
  struct StepAhead {
    bool queued = false;
    int slot = 0;
    std::vector<uint64_t> ids, versions;
    std::vector<int> lengths;         // each sequence's length when the step is asked for
    std::vector<int32_t> tokens;      // the tokens it appends (the last call's results)
    std::vector<SamplingParams> params;
  };
  // Whether the queued step is the one this decodeBatch call asks for.
  bool aheadMatches(const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& tokens,
                    const std::vector<SamplingParams>& params) const;
  // Queues the step after this one: every sequence one token longer, its token the one the
  // choice in `fromSlot` makes. Queues nothing when that step might not be the next one asked.
  void queueStepAhead(Scratch& s, const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& pos,
                      const std::vector<SamplingParams>& params, int fromSlot);

  // ---- state ----
  // In one block because their order is the reverse of their destruction's: backend_ comes
  // before the tensors it allocated and the pool that keeps a reference to it, so it outlives them.
  ModelConfig cfg_;
  std::unique_ptr<Backend> backend_;
  std::map<std::string, Tensor> tensors_;
  std::map<std::string, std::pair<int64_t, int64_t>> expected_;  // expectedTensors(), computed once
  std::vector<Layer> layers_;
  Tensor embed_, posEmbed_, finalNormW_, finalNormB_, lmHead_;
  std::shared_ptr<KvPool> pool_;
  // When every KV slot is read only by sliding-window layers: the widest window, so pages
  // wholly older than it can go back to the pool. 0: some layer reads the whole past.
  int releaseWindow_ = 0;
  StepAhead ahead_;
  bool runAheadOn_ = true;
  std::atomic<int64_t> runAheadUsed_{0}, runAheadDiscarded_{0};
  std::vector<int> upwardTargetSlots_;  // KV slots read by some layer below their owner
  size_t weightBytes_ = 0;
  bool ready_ = false;
  std::mutex mutex_;
};

}  // namespace lckv
