// The backend interface: every op the model forward needs, nothing more.
// The forward (forward.cpp) is written once over this interface; the CPU backend (native/cpu_backend)
// is the plain reference, and a GPU backend implements the same calls with kernels. How a backend
// runs a step beyond its ops (recorded decode steps, run-ahead, profiler ranges) is
// StepExecution (step_execution.h), which Backend derives from.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "errors.h"
#include "kv_format.h"
#include "sampling.h"
#include "step_execution.h"

namespace lckv {

enum class DType { F32, F16, BF16 };
size_t dtypeSize(DType t);
const char* dtypeName(DType t);

// A 2-D buffer owned by a backend (host memory for the CPU backend, device memory elsewhere).
// Row-major [rows, cols]. Weights of a linear layer are [out, in], as in Hugging Face.
struct Tensor {
  std::shared_ptr<void> storage;
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  bool empty() const { return data == nullptr; }
  int64_t numel() const { return rows * cols; }
};

// Rows [first, first + count) of t, as a tensor of its own (the same storage).
inline Tensor tensorRows(const Tensor& t, int64_t first, int64_t count) {
  Tensor r = t;
  r.data = static_cast<uint8_t*>(t.data) + (size_t)(first * t.cols) * dtypeSize(t.dtype);
  r.rows = count;
  return r;
}

// The K/V pages one op reads or writes: the pool, and the page tables of the sequences whose
// rows the op handles. Positions are absolute token positions of each sequence.
struct KvView {
  Tensor* pool = nullptr;  // [pages, layout.pageBytes() / 4]: each page's bytes, held as 32-bit words
  KvLayout layout;
  const int32_t* tables = nullptr;  // host: numSeqs rows of `stride` page ids
  int stride = 0, numSeqs = 0;
  const int32_t* rowSeq = nullptr;  // host: for each row of the op, its row in `tables`
  // Channel-key types (kvTypeChannelKeys, kv_format.h): each sequence's residual, the bf16 page
  // being written. residuals: numSeqs rows of layout.residualParts() pool pages; residualPage:
  // per sequence, the page index (position / pageTokens) whose rows the residual holds (-1: none).
  const int32_t* residuals = nullptr;
  const int32_t* residualPage = nullptr;
  // Page of `pos` in the sequence of table row `seq` (-1: not allocated).
  int32_t page(int seq, int pos) const {
    const int i = pos / layout.pageTokens;
    return i < stride ? tables[(int64_t)seq * stride + i] : -1;
  }
  // page(seq, pos), checked: throws when that sequence holds no page of the pool there.
  int32_t pageAt(int seq, int pos) const {
    const int32_t p = seq >= 0 && seq < numSeqs && pos >= 0 ? page(seq, pos) : -1;
    if (p < 0 || p >= pool->rows)
      throw EngineError(kErrInvalidArgument, "K/V access outside the sequence's pages (position " + std::to_string(pos) + ")");
    return p;
  }
  // The residual's parts of table row `seq`, checked to hold the page of position `pos`: throws
  // when it holds another page (a write or read that the rule of kv_format.h does not allow).
  const int32_t* residualOf(int seq, int pos) const {
    const int R = layout.residualParts();
    if (!residuals || !residualPage || seq < 0 || seq >= numSeqs || pos < 0 || residualPage[seq] != pos / layout.pageTokens)
      throw EngineError(kErrInvalidArgument, "K/V access outside the sequence's residual page (position " + std::to_string(pos) + ")");
    const int32_t* parts = residuals + (int64_t)seq * R;
    for (int i = 0; i < R; ++i)
      if (parts[i] < 0 || parts[i] >= pool->rows) throw EngineError(kErrInvalidArgument, "a K/V residual part outside the pool");
    return parts;
  }
  // The residual a query of table row `seq` whose last visible key is `last` reads the keys of
  // that key's page from (kv_format.h's rule), checked as residualOf; null when it reads every
  // page quantized (that page complete, no key, or a type without a residual).
  const int32_t* queryResidual(int seq, int last) const {
    const int P = layout.pageTokens;
    if (!kvTypeChannelKeys(layout.type) || last < 0 || last % P == P - 1) return nullptr;
    return residualOf(seq, last);
  }
  // Whether position `pos` of table row `seq` is read from the residual (kvRead's rule): its
  // page is the residual's.
  bool inResidual(int seq, int pos) const {
    return kvTypeChannelKeys(layout.type) && residualPage && seq >= 0 && seq < numSeqs && pos >= 0 &&
           residualPage[seq] == pos / layout.pageTokens;
  }
};

struct AttentionSpec {
  int numHeads = 0, numKvHeads = 0, headDim = 0;
  bool strict = false;  // queries at p see keys < p; a query with no visible key outputs zero
  int window = 0;       // keys j with p - j < window only (0 = unlimited)
  float scale = 1.0f;
};

// How the final hidden state maps to logits (norm then the output projection).
enum class NormKind { Rms, Layer };

class Backend : public StepExecution {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Memory. alloc() contents are unspecified.
  virtual Tensor alloc(int64_t rows, int64_t cols) = 0;
  // The activation dtype in which linear() reads n rows best: F32, or BF16 where the backend
  // multiplies that many rows in bf16 anyway (the GPU's large-batch path), so that the op writing
  // such an input (a norm, the SwiGLU) rounds it once instead of a separate conversion pass.
  // norm(), addNorm(), linearSwiglu() and attention() write an `out` of this dtype; other ops
  // take f32.
  virtual DType linearInputType(int n) const { (void)n; return DType::F32; }
  // alloc() of an activation that only feeds linear(), in linearInputType(rows) (an f32-sized
  // block holds any narrower type). Its dtype follows `rows`: ops must run on all of its rows
  // (a buffer of 64 rows used for 16 would hand the GPU's GEMV a bf16 input, which it refuses).
  Tensor allocLinearInput(int64_t rows, int64_t cols) {
    Tensor t = alloc(rows, cols);
    t.dtype = linearInputType((int)rows);
    return t;
  }
  // A weight from f32 host values, kept in the backend's weight dtype.
  virtual Tensor upload(const float* host, int64_t rows, int64_t cols) = 0;
  // A weight from host values of dtype hostType (F32, BF16 or F16), as a checkpoint stores them.
  // The default widens them to f32 for upload(); a backend that keeps a 16-bit weight as it is
  // overrides it, so that no f32 copy is made.
  virtual Tensor uploadWeight(const void* host, DType hostType, int64_t rows, int64_t cols);
  // The dtype uploadWeight() keeps a weight of hostType in. A value finite in the checkpoint can
  // round to infinity there (1e5 in f16), so the load checks every weight in this type.
  virtual DType keptWeightType(DType hostType) const { (void)hostType; return DType::F32; }
  // Moves weights that are applied to the same input (a layer's Q, K and V) into one allocation,
  // back to back, each part becoming a view of it, so that linears() can run them as one matrix
  // product. Parts of different dtypes or widths stay as they are. The default keeps them apart.
  virtual void packWeights(Tensor* parts, int count) { (void)parts, (void)count; }
  // Reads rows of an activation as f32 (a bf16 one widened).
  virtual void download(const Tensor& t, int64_t rowStart, int64_t rowCount, float* host) = 0;
  // Writes host rows into an activation tensor, rounded to its dtype (tests and op checks).
  virtual void writeRows(Tensor& t, int64_t rowStart, int64_t rowCount, const float* host) = 0;
  // Fills a tensor (f32, or bf16 where a backend allocates it) with NaN, so a test can see
  // whether an op wrote every element.
  virtual void poison(Tensor& t) = 0;

  // out[r] = table[tokens[r]]  (+ posTable[positions[r]] when posTable is given)
  virtual void embed(const int32_t* tokens, const int32_t* positions, int n, const Tensor& table,
                     const Tensor* posTable, Tensor& out) = 0;
  // out = norm(x) * weight (+ bias)
  virtual void norm(NormKind kind, const Tensor& x, int n, const Tensor& weight, const Tensor* bias, float eps,
                    Tensor& out) = 0;
  // out[n, W.rows] = x[n, W.cols] @ W^T (+ bias)
  virtual void linear(const Tensor& x, int n, const Tensor& w, const Tensor* bias, Tensor& out) = 0;
  // x[n, ...] += y[n, ...]
  virtual void addInPlace(Tensor& x, const Tensor& y, int n) = 0;
  // h += delta, then out = norm(h): the residual add fused with the next norm (one pass on the
  // GPU instead of two). The default composes the two ops.
  virtual void addNorm(NormKind kind, Tensor& h, const Tensor& delta, int n, const Tensor& weight, const Tensor* bias,
                       float eps, Tensor& out) {
    addInPlace(h, delta, n);
    norm(kind, h, n, weight, bias, eps, out);
  }
  // Up to three linears of the same input (a layer's Q, K and V): targets[i].out = x @ w^T (+ bias).
  // A GPU reads x once and launches once; the default calls linear() for each.
  struct LinearTarget {
    const Tensor* w;
    const Tensor* bias;  // may be null
    Tensor* out;
  };
  virtual void linears(const Tensor& x, int n, const LinearTarget* targets, int count) {
    for (int i = 0; i < count; ++i) linear(x, n, *targets[i].w, targets[i].bias, *targets[i].out);
  }
  // out = silu(x @ gate^T + gateB) * (x @ up^T + upB), the input half of a SwiGLU MLP. A GPU
  // computes both products and the activation in one pass without storing them; the default
  // composes the ops and so allocates the up product itself, which callers then need not keep
  // for a backend that never reads it.
  virtual void linearSwiglu(const Tensor& x, int n, const Tensor& gate, const Tensor* gateB, const Tensor& up,
                            const Tensor* upB, Tensor& out) {
    Tensor upOut = alloc(n, up.rows);
    linear(x, n, gate, gateB, out);
    linear(x, n, up, upB, upOut);
    swiglu(out, upOut, n, out);
  }
  // Rotates heads of x[n, heads*headDim] (rotate-half layout) at positions[r].
  virtual void rope(Tensor& x, int n, int heads, int headDim, const int32_t* positions,
                    const std::vector<float>& invFreq, float attentionScale) = 0;
  // Writes K and V rows r at positions[r] into `slot` of the pages of sequence kv.rowSeq[r],
  // quantized to the layout's K/V type by kv_format.h's rule (every backend writes the same bytes).
  // Channel-key types: rows go to the residual, which must hold their page, and writing a page's
  // last row quantizes the page from it; a call's rows of one sequence lie in one page.
  virtual void kvWrite(const KvView& kv, int slot, const Tensor& k, const Tensor& v, int n, const int32_t* positions) = 0;
  // rope() of q, and for a layer that owns K/V (k given): rope() of k, then kvWrite() of k and v.
  // A GPU does it in one pass. k's contents afterwards are unspecified.
  virtual void ropeKvWrite(Tensor& q, int numHeads, Tensor* k, const Tensor* v, int numKvHeads, int headDim, int n,
                           const int32_t* positions, const std::vector<float>& invFreq, float attentionScale,
                           const KvView* kv, int slot) {
    rope(q, n, numHeads, headDim, positions, invFreq, attentionScale);
    if (!k) return;
    rope(*k, n, numKvHeads, headDim, positions, invFreq, attentionScale);
    kvWrite(*kv, slot, *k, *v, n, positions);
  }
  // Zeroes `slot`'s K and V at positions [start, start+n) of table row `seq` (for a channel-key
  // type, in the residual, which must hold their page).
  virtual void kvZero(const KvView& kv, int seq, int slot, int start, int n) = 0;
  // Copies `slot`'s K then V at positions [start, start+n) of table row `seq` to host memory
  // (the fixed-point check, context shift): 2 * n * kvDim floats, as attention reads them (for a
  // channel-key type, the residual's page from the residual, the others from their codes).
  virtual void kvRead(const KvView& kv, int seq, int slot, int start, int n, std::vector<float>& host) = 0;
  // The fixed-point prefill's convergence test: how far `slot`'s K and V at positions
  // [start, start+n) of table row `seq`, as kvRead gives them, moved since the last call with the
  // same `snapshot`, which then holds them (the backend's own memory, kept by the caller between
  // passes). A first call, with an empty snapshot, only takes them (and says same = false).
  struct KvMotion {
    bool same = false;   // every value == the snapshot's (a NaN never is)
    double moved = 0;    // the largest |value - snapshot's| in f64 (+inf where one is NaN)
    double largest = 0;  // the largest |value| (NaNs left out)
  };
  // The default reads the values to the host (kvRead) and compares them there; a GPU backend
  // compares on the device and reads back the three results.
  virtual KvMotion kvMotion(const KvView& kv, int seq, int slot, int start, int n, std::shared_ptr<void>& snapshot);
  // out[n, numHeads*headDim]: query r at positions[r] attends to `slot` of sequence
  // kv.rowSeq[r], keys 0..positions[r] under spec's diagonal and window rules. The op just
  // before may write K/V only at the rows' own positions (as kvWrite and ropeKvWrite of the
  // same rows do): a GPU backend reads the keys before positions[r] - (n - 1) while it runs.
  // Channel-key types: kv_format.h's rule decides which keys come from the residual.
  virtual void attention(const Tensor& q, int n, const int32_t* positions, const KvView& kv, int slot,
                         const AttentionSpec& spec, Tensor& out) = 0;
  // Why this backend's kernels cannot write a K/V cache of kvType and attend over it with heads
  // of `spec` ("" when they can), asked when a model is loaded so that a shape the kernels lack
  // is refused then rather than at the first step. The head size's multiple that kvType's codes
  // need is the cache layout's rule (kvHeadDimProblem), checked apart from this. The default
  // (the CPU backend) runs every shape.
  virtual std::string attentionProblem(const AttentionSpec& spec, KvType kvType) const {
    (void)spec, (void)kvType;
    return "";
  }
  // Why this backend's kernels cannot read a K/V pool of kvType in pages of pageTokens ("" when
  // they can), asked when the pool is created. The layout's own limits (KvPool) come first; the
  // default (the CPU backend) reads every page size they allow.
  virtual std::string kvPageProblem(KvType kvType, int pageTokens) const {
    (void)kvType, (void)pageTokens;
    return "";
  }
  // out[n, cols] = silu(gate) * up
  virtual void swiglu(const Tensor& gate, const Tensor& up, int n, Tensor& out) = 0;
  // x = gelu_tanh(x)
  virtual void geluTanh(Tensor& x, int n) = 0;
  // Copies rows [srcRow, srcRow+n) of src into rows [dstRow, ...) of dst (also copies a K/V
  // page for copy-on-write: the pool is a tensor with one page per row).
  virtual void copyRows(const Tensor& src, int srcRow, Tensor& dst, int dstRow, int n) = 0;

  // Picks the next token from one row of logits [1, vocab] (sampling.h has the rules). The
  // default copies the row to the host and runs the reference sampler; a GPU backend can keep
  // the work on the device so that only the token id crosses. `logprobs` (may be null) receives
  // the choice's log-probabilities when p.logprobs >= 0. (The same default argument in every
  // override: callers that want no log-probabilities leave it out.)
  virtual int32_t sample(const Tensor& logitsRow, int vocab, const SamplingParams& p, const std::vector<int32_t>& history,
                         uint64_t position, TokenLogprobs* logprobs = nullptr) {
    std::vector<float> row((size_t)vocab);
    download(logitsRow, 0, 1, row.data());
    return sampleToken(row.data(), vocab, p, history, position, logprobs);
  }

  // sample() for rows [0, rows) of logits [rows, vocab], row r with params[r], histories[r]
  // (read only when readsHistory(params[r])) and positions[r]; out[r] is its token, and
  // logprobs[r] (when logprobs is not null) its log-probabilities. A GPU chooses every row
  // before it synchronises once; the default calls sample() per row.
  virtual void sampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params,
                          const std::vector<int32_t>* histories, const uint64_t* positions, int32_t* out,
                          TokenLogprobs* logprobs = nullptr) {
    for (int r = 0; r < rows; ++r) {
      Tensor row = logits;
      row.data = static_cast<float*>(logits.data) + (int64_t)r * logits.cols;
      row.rows = 1;
      out[r] = sample(row, vocab, params[r], histories[r], positions[r], logprobs ? &logprobs[r] : nullptr);
    }
  }
};

// The CPU backend computes in f32 whatever dtype it keeps a weight in: a 16-bit weight is kept
// in 16 bits (half the memory) and widened, exactly, as an op reads it.
// weights: BF16 or F16 round each weight to that type, so the CPU is the exact reference for a
// GPU holding weights in that type; F32 widens every weight to f32, unless keepCheckpointDtype:
// then each weight stays in the dtype its checkpoint stores (the same values either way).
std::unique_ptr<Backend> createCpuBackend(int threads, DType weights = DType::F32, bool keepCheckpointDtype = false);
// For tests: CPU backends made after setCpuQueuedSampling(true) queue token choices as a GPU
// does (made at once, handed out by takeSampled), so that Model::decodeBatch's run-ahead page
// bookkeeping runs on the CPU; no step is replayed ahead.
void setCpuQueuedSampling(bool on);
#ifdef LCKV_WITH_CUDA
// weights: the dtype weights are kept in on the device (BF16, F16 or F32).
// graphs: record decode steps as CUDA graphs (LCKV_CUDA_GRAPHS=0 in the environment overrides).
std::unique_ptr<Backend> createCudaBackend(int device, DType weights, bool graphs = true);
// Empty when a CUDA device is usable, else why not.
std::string cudaDeviceProblem();
#endif

}  // namespace lckv
