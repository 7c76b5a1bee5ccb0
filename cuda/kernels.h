// Launchers of every kernel in cuda/. Plain C++ signatures (no CUDA types), so the backend
// (native/cuda_backend/cuda_backend.cpp) compiles with the host compiler. Each launcher checks its
// shapes, opens an NVTX range, launches on `stream` and checks the launch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

typedef struct CUstream_st* cudaStream_t;

namespace lckv {
struct KvLayout;  // engine/kv_format.h
}

namespace lckv::cuda {

// One K/V slot of the paged cache (native/engine/kv_pool.h, kv_format.h): page p starts at byte
// p * pageBytes of `pool`; inside it, the slot's K codes of offset o are at slotOffset + o *
// rowBytes, its V codes pageTokens rows further, and (scaled types) the (K, V) scale word of K/V
// head h at slotOffset + 2 * pageTokens * rowBytes + (o * kvHeads + h) * 4. Row r of an op
// belongs to the sequence whose page table is tables[rowSeq[r] * stride ...]. pageTokens is a
// power of two. `type` is a KvType (kv_format.h); the launchers pick the kernels built for it.
// A channel-key type (int4) also gives each sequence a residual, the bf16 rows of the page being
// written, in pool pages of its own (kv_format.h): residuals[rowSeq[r] * (pageTokens >>
// residualShift) ...] are row r's parts, each holding 1 << residualShift positions of the page.
struct PagedKv {
  uint8_t* pool;
  const int32_t* tables;  // device
  const int32_t* rowSeq;  // device
  int stride;
  int pageShift;  // log2(pageTokens)
  int64_t pageBytes;
  int64_t slotOffset;
  int rowBytes;
  int kvDim;
  int kvHeads;
  int type;
  const int32_t* residuals;  // device; null for the other types
  int residualShift;         // log2(positions per residual part)
};

// The residual of a channel-key cache as a bf16 paged cache of its own: its "page table" is each
// sequence's parts and its positions are offsets in the page being written (0 .. pageTokens - 1),
// so that the bf16 kernels' addressing lands on KvLayout::residualOffset.
inline PagedKv residualView(const PagedKv& kv) {
  PagedKv r = kv;
  r.tables = kv.residuals;
  r.stride = 1 << (kv.pageShift - kv.residualShift);
  r.pageShift = kv.residualShift;
  r.rowBytes = kv.kvDim * 2;
  r.type = 1;  // KvType::BF16
  r.residuals = nullptr;
  r.residualShift = 0;
  return r;
}

// Lets each kernel start while the one before it in the stream finishes (sm_90+ only; see
// waitForPrecedingKernels in common.cuh). Off until a backend turns it on; one setting for the
// process, on only while every backend made so far asked for it.
void enableProgrammaticLaunch(bool enabled);
// Whether the kernels loaded for the current device can take it (built from sm_90+ code).
bool programmaticLaunchSupported();

// out[r] = table[tokens[r]] (+ posTable[positions[r]]). table: [vocab, E] of wtype.
void launchEmbed(const int32_t* tokens, const int32_t* positions, int n, const void* table, const void* posTable,
                 int wtype, int E, float* out, cudaStream_t stream);

// RMSNorm (bias == nullptr, rms = true) or LayerNorm over rows of x[n, E]. out is f32, or bf16
// with outBf16 (an output that only feeds cuBLASLt, which reads bf16).
void launchNorm(bool rms, const float* x, int n, int E, const void* weight, const void* bias, int wtype, float eps,
                void* out, bool outBf16, cudaStream_t stream);

// x += delta, then out = norm(x): the residual add fused into the norm's pass over the row.
void launchAddNorm(bool rms, float* x, const float* delta, int n, int E, const void* weight, const void* bias, int wtype,
                   float eps, void* out, bool outBf16, cudaStream_t stream);

// One matrix of a GEMV launch: out[n, features] = x[n, I] @ weight[features, I]^T (+ bias).
constexpr int kGemvMaxTargets = 3;
struct GemvTarget {
  const void* weight;
  const void* bias;  // may be null
  int features;
  float* out;
};
// Small-batch products (n <= 16 rows read W once; decode): 1 to 8 warps per output feature (by
// the length of its row), all n rows at once, for up to kGemvMaxTargets matrices of the same input in one launch (Q, K, V).
// Larger n goes through cuBLASLt. All weights of one launch share wtype.
void launchGemv(const float* x, int n, int I, const GemvTarget* targets, int count, int wtype, cudaStream_t stream);
// out = silu(x @ gate^T + b) * (x @ up^T + b), written to gate.out (up.out is not used): the
// SwiGLU MLP's input half in one pass, never storing the gate and up products.
void launchGemvSwiglu(const float* x, int n, int I, const GemvTarget& gate, const GemvTarget& up, int wtype,
                      cudaStream_t stream);
// x[i] (f32) -> y[i] (bf16), for cuBLASLt inputs.
void launchToBf16(const float* x, int64_t count, void* y, cudaStream_t stream);
// out[r, :] += bias (wtype), for the cuBLASLt path.
void launchAddBias(float* out, int n, int O, const void* bias, int wtype, cudaStream_t stream);
// Zeroes `count` byte ranges of `base`: runs (on the device) holds each range's offset and
// length, two int64 apiece. One launch for what would be a memset per range.
void launchZeroRanges(uint8_t* base, const int64_t* runs, int count, cudaStream_t stream);
// Columns of src[n, cols] to the targets in order: target i gets the next targets[i].cols
// columns as its own [n, cols] rows (the output of a packed product, split). Up to
// kGemvMaxTargets targets.
struct SplitColumnsTarget {
  float* out;
  int cols;
};
void launchSplitColumns(const float* src, int n, int cols, const SplitColumnsTarget* targets, int count,
                        cudaStream_t stream);

// x += y over count elements.
void launchAdd(float* x, const float* y, int64_t count, cudaStream_t stream);
// out = silu(gate) * up over count elements (out may alias gate).
void launchSwiglu(const float* gate, const float* up, int64_t count, float* out, cudaStream_t stream);
// The SwiGLU of the large-batch path's products: out[r, c] = silu(gate[r, c] + gateBias[c]) *
// (up[r, c] + upBias[c]) for n rows of I columns, where row r of gate and of up starts at r *
// stride (the two halves of one packed product, stride 2I, or two products, stride I). Biases
// (wtype) may be null; out[n, I] is f32, or bf16 with outBf16 (the input of the down product).
void launchSwigluRows(const float* gate, const float* up, int64_t stride, int n, int I, const void* gateBias,
                      const void* upBias, int wtype, void* out, bool outBf16, cudaStream_t stream);
// x = gelu_tanh(x).
void launchGeluTanh(float* x, int64_t count, cudaStream_t stream);

// Rotate-half RoPE of x[n, heads*headDim] at positions[r] (device array), invFreq[headDim/2] (device).
void launchRope(float* x, int n, int heads, int headDim, const int32_t* positions, const float* invFreq,
                float attentionScale, cudaStream_t stream);
// launchRope of q, and with k (then v and kv are given): launchRope of k written straight into
// the cache with v, as launchKvWrite would. One launch instead of three (int4: and the page
// quantization after it); k itself is not changed.
void launchRopeKvWrite(float* q, int numHeads, const float* k, const float* v, int numKvHeads, int headDim, int n,
                       const int32_t* positions, const float* invFreq, float attentionScale, const PagedKv* kv,
                       cudaStream_t stream);
// Writes rows of k and v [n, kvDim] into the cache at positions[r] of sequence kv.rowSeq[r].
// A channel-key type (int4) writes them to the residual in bf16, then quantizes each page whose
// last row was written (launchKvQuantizePages); the rows of one sequence lie in one page.
void launchKvWrite(const float* k, const float* v, int n, const int32_t* positions, const PagedKv& kv,
                   cudaStream_t stream);
// Channel-key types: for each row r whose position ends a page, quantizes that page of sequence
// kv.rowSeq[r] from its residual into its pool page (keys per channel, values per token), as
// kv_format.h's kvQuantizePage does on the host, bit for bit. Rows of other positions do nothing,
// so a recorded step may launch it at every position.
void launchKvQuantizePages(int n, const int32_t* positions, const PagedKv& kv, cudaStream_t stream);

// The fixed-point prefill's convergence test (Backend::kvMotion, kv_motion.cu): what the kernel
// leaves for the host, each a maximum over the rows (a double's bits where a double is meant).
struct KvMotionResult {
  unsigned long long movedBits;    // the largest |value - snapshot's|, +inf where one is NaN
  unsigned long long largestBits;  // the largest |value|, NaNs left out
  unsigned int differ;             // 1 when any value != the snapshot's
};
// Decodes K then V of `slot` at positions [start, start+n) of one sequence (kvRead's values) from
// the pool (token t's slot block at byte rowBlock[t]; -1 where the residual, whose pool pages are
// residualParts, holds its page) into scratch [2n, kvDim] and snapshot [2n, kvDim]: the first
// call (first) only fills the snapshot (scratch may be the snapshot then), each later one
// compares with it into `result` first.
void launchKvMotion(const KvLayout& L, int slot, const uint8_t* pool, const int64_t* rowBlock, const int32_t* residualParts,
                    int start, int n, float* scratch, float* snapshot, bool first, KvMotionResult* result,
                    cudaStream_t stream);

// The largest head size the kernels take. Attention's decode keeps up to kMaxHeadDim / 32 dims in
// each lane of a warp (kMaxDimsPerLane, attention_common.cuh) and a compact type's K/V write
// holds one head of at most kMaxHeadDim values per warp in shared memory (rope.cu): both are
// defined from this one number, so a model that passes attentionProblem is one the write takes.
constexpr int kMaxHeadDim = 128;

// Attention of n queries (positions[r], of sequence kv.rowSeq[r]) over one slot of the paged
// cache. q: [n, numHeads*headDim]; out like q, f32 or (outBf16) bf16; headDim <= kMaxHeadDim.
// strict: keys < p only (no key -> zero output); window > 0: keys with p - j < window.
// maxVisible: the most keys any query sees (sets the split-K chunking); workspace holds the
// per-chunk partial results, attentionWorkspaceFloats() of them (less means no split).
// prefill: every row belongs to the same sequence (an AttentionPart's prefill), so a tile of
// queries shares each key tile (the tiled prefill kernel); else the split-K decode kernel. An
// int4 cache (keys per channel, kv_format.h) always takes the decode kernel, whatever `prefill`
// says, twice (its complete pages, then each row's partial page from the residual) into the
// workspace, which it therefore needs.
// The kernel launched just before may write K/V only at the rows' own positions: the decode
// kernel loads keys before positions[r] - (n - 1) while that kernel still runs (a sequence's
// rows are consecutive, and all in this call).
void launchAttention(const float* q, int n, const int32_t* positions, int maxVisible, const PagedKv& kv, int numHeads,
                     int numKvHeads, int headDim, bool strict, int window, float scale, bool prefill, void* out,
                     bool outBf16, float* workspace, int64_t workspaceFloats, cudaStream_t stream);
// Below this many queries of one sequence the split-K decode kernel takes them (it fills the
// GPU better than the prefill kernel's few query tiles).
constexpr int kPrefillMinQueries = 16;
// Rows [first, first + rows) of an attention call, for one launchAttention: prefill (one
// sequence's run of rows, for the prefill kernel) or decode (the rows between such runs).
struct AttentionPart {
  int first, rows;
  bool prefill;
};
// The parts of n rows (rowSeq: each row's sequence, host array; a sequence's rows consecutive):
// a run of kPrefillMinQueries or more rows of one sequence is a prefill part, and the rows
// between such runs make decode parts. A decode step is one decode part, a prefill chunk one
// part, and a mixed step (Model::decodeBatch with prompts' chunks beside decode rows) a prefill
// part per chunk that long and decode parts for the rows between: a chunk's queries then share
// the prefill kernel's key tiles instead of each reading its whole context in the decode kernel.
// An int4 cache (kvType) has no prefill kernel: its n rows are one decode part, since the two
// int4 decode launches take rows of any sequences together.
std::vector<AttentionPart> attentionParts(const int32_t* rowSeq, int n, int kvType);
int64_t attentionWorkspaceFloats(int n, int numHeads, int numKvHeads, int headDim, int maxVisible, int kvType);
// Why launchAttention (and the K/V write before it) cannot run heads of this shape over a cache
// of kvType ("" when it can): the limits launchAttention enforces, for the backend to check at
// load.
std::string attentionProblem(int numHeads, int numKvHeads, int headDim, int kvType);
// Why launchAttention cannot read a K/V pool of kvType in pages of pageTokens ("" when it can),
// for the backend to check when the pool is created rather than at the first decode step.
std::string kvPageProblem(int kvType, int pageTokens);
// The fewest tokens a channel-key type's page may hold here: the decode kernels' tile of 32 keys
// reads the scales of at most kDecodeTilePages pages, and a tensor-core warp's 16 keys lie in one.
constexpr int kMinChannelKeyPageTokens = 16;

// The most top tokens whose log-probabilities the device gives per row (OpenAI's limit).
constexpr int kMaxTopLogprobs = 20;

// One row's log-probabilities as the device writes them (TokenLogprobs, fixed size): the
// chosen token's, and the first min(k, V) of the top tokens (most likely first, ties to the
// lower id).
struct RowLogprobs {
  double chosen;
  double top[kMaxTopLogprobs];
  int32_t topTokens[kMaxTopLogprobs];
};

// What a row asks of the sampler besides the repetition penalty (which comes first). For each
// of `count` distinct token ids t = tokens[i]: x[t] = (x[t] - subtract[i]) + add[i], the
// presence and frequency penalties then the logit bias, in the order and roundings of the CPU
// reference. Then, when logprobs >= 0 (at most kMaxTopLogprobs), the log-softmax of the row
// so processed into *logprobsOut. Device arrays; the default asks for nothing.
struct RowExtras {
  const int32_t* tokens = nullptr;
  const float* subtract = nullptr;
  const float* add = nullptr;
  int count = 0;
  int logprobs = -1;
  RowLogprobs* logprobsOut = nullptr;
};

// Greedy choice over logits[V] after the repetition penalty on `penalized` (distinct token ids,
// device array) and the extras; scratch holds V floats. Writes the token id to outToken (device).
void launchGreedy(const float* logits, int V, float* scratch, const int32_t* penalized, int penalizedCount, float penalty,
                  const RowExtras& extras, int32_t* outToken, cudaStream_t stream);

// Greedy choice for each row of logits [rows, ld] (the first V of each row) without a repetition
// penalty, in one launch (a block per row): outTokens[r] (device).
void launchGreedyRows(const float* logits, int rows, int V, int64_t ld, int32_t* outTokens, cudaStream_t stream);

// Sampling with temperature (> 0), top-k, top-p, min-p, the repetition penalty and the extras,
// as the CPU reference does it; workspace holds sampleWorkspaceBytes(V).
size_t sampleWorkspaceBytes(int V);
void launchSample(const float* logits, int V, const int32_t* penalized, int penalizedCount, float penalty,
                  float temperature, int topK, float topP, float minP, uint64_t seed, uint64_t position,
                  const RowExtras& extras, void* workspace, int32_t* outToken, cudaStream_t stream);

}  // namespace lckv::cuda
