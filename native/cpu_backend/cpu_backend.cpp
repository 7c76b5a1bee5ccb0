// The CPU backend: plain loops in f32 with f64 where a reduction is long. It is the reference
// every GPU kernel is tested against, so clarity wins over speed. Every output element is
// computed by the same sequential loop whatever the batch or thread count (batch invariance).
// A weight may be kept in bf16 or f16 (half the memory of f32): the ops widen what they read to
// f32, which is exact, so they compute the same values as from an f32 copy.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "../engine/backend.h"
#include "../engine/errors.h"
#include "../engine/sampling.h"
#include "../engine/weights.h"
#include "thread_pool.h"
#include "weight_reads.h"

namespace lckv {

namespace {

using cpu::dotRowsOf;
using cpu::weightF32;

float* F(const Tensor& t) { return static_cast<float*>(t.data); }

// Uninitialised host storage for [rows, cols] values of `dtype`.
Tensor hostTensor(int64_t rows, int64_t cols, DType dtype = DType::F32) {
  Tensor t;
  const size_t bytes = (size_t)(rows * cols) * dtypeSize(dtype);
  std::shared_ptr<uint8_t> buf(new uint8_t[bytes > 0 ? bytes : 1], std::default_delete<uint8_t[]>());
  t.storage = buf;
  t.data = buf.get();
  t.dtype = dtype;
  t.rows = rows;
  t.cols = cols;
  return t;
}

// Activations, K/V and outputs are f32; only weights come in other dtypes.
void requireF32(const Tensor& t, const char* op) {
  if (t.dtype != DType::F32) throw EngineError(kErrInvalidArgument, std::string(op) + ": the tensor must be f32");
}

// The bytes of the pool where K (v = 0) or V (v = 1) codes of `slot` at `pos` of table row
// `seq` start, checked; *scales (scaled types) gets that position's (K, V) scale words.
uint8_t* kvCodesAt(const KvView& kv, int seq, int slot, int v, int pos, const uint32_t** scales = nullptr) {
  if (slot < 0 || slot >= kv.layout.slots) throw EngineError(kErrInvalidArgument, "K/V slot out of range");
  const int page = kv.pageAt(seq, pos), off = pos % kv.layout.pageTokens;
  uint8_t* base = static_cast<uint8_t*>(kv.pool->data);
  if (scales) *scales = reinterpret_cast<const uint32_t*>(base + kv.layout.scaleOffset(page, slot, off, 0));
  return base + kv.layout.codeOffset(page, slot, v, off);
}

// Head kvh's values of K (v = 0) or V at `pos`, as attention reads them: decoded into buf
// [headDim], or for f32 read where they are. `residual` (a channel-key type): from the bf16
// residual, whose parts the caller has checked (kv.residualOf).
const float* kvHeadValues(const KvView& kv, int seq, int slot, int v, int pos, int kvh, const int32_t* residual, float* buf) {
  const KvLayout& L = kv.layout;
  const int hd = L.headDim();
  const uint8_t* pool = static_cast<const uint8_t*>(kv.pool->data);
  if (residual) {
    const uint8_t* row = pool + L.residualOffset(residual, slot, v, pos % L.pageTokens) + (int64_t)kvh * hd * 2;
    for (int i = 0; i < hd; ++i) buf[i] = kvDecode(KvType::BF16, kvCodeAt(KvType::BF16, row, i), 0.0f);
    return buf;
  }
  const bool channelKeys = kvTypeChannelKeys(L.type);
  const uint32_t* scales = nullptr;  // fp8, int8: the position's (K, V) scale words
  const uint8_t* codes = kvCodesAt(kv, seq, slot, v, pos, kvTypeScaled(L.type) && !channelKeys ? &scales : nullptr) +
                         (int64_t)kvh * hd * kvTypeBits(L.type) / 8;
  if (L.type == KvType::F32) return reinterpret_cast<const float*>(codes);
  if (channelKeys) {
    const int page = kv.pageAt(seq, pos);
    const uint16_t* s = reinterpret_cast<const uint16_t*>(
        pool + (v == 0 ? L.keyScaleOffset(page, slot, kvh * hd) : L.valueScaleOffset(page, slot, pos % L.pageTokens, kvh)));
    for (int i = 0; i < hd; ++i) buf[i] = kvDecode(L.type, kvCodeAt(L.type, codes, i), kvF16ToF32(s[v == 0 ? i : 0]));
    return buf;
  }
  const float s = scales ? kvF16ToF32((uint16_t)(scales[kvh] >> (16 * v))) : 0.0f;
  for (int i = 0; i < hd; ++i) buf[i] = kvDecode(L.type, kvCodeAt(L.type, codes, i), s);
  return buf;
}

// setCpuQueuedSampling()'s switch, read by each backend when it is made.
std::atomic<bool> cpuQueuedSampling{false};

class CpuBackend : public Backend {
 public:
  CpuBackend(int threads, DType weights, bool keepCheckpointDtype)
      : pool_(threads), weights_(weights), keepCheckpointDtype_(keepCheckpointDtype) {}
  std::string name() const override { return "cpu"; }

  // Run-ahead's bookkeeping on the CPU, for tests: after setCpuQueuedSampling(true), a backend
  // made from then on makes a queued token choice at once and hands it out by
  // takeSampled(), so Model::decodeBatch takes the paths a GPU takes when it queues a step (the
  // early pages, their rollback) and the CPU suite checks them. No step is replayed ahead (the
  // CPU records none), and the tokens are the ones sampleRows() gives.
  bool canQueueSampling(const SamplingParams* params, int rows) const override {
    if (!queuedSampling_) return false;
    for (int r = 0; r < rows; ++r)
      if (!choiceCanBeQueued(params[r])) return false;  // (so nothing needsHostSampling either)
    return true;
  }
  void queueSampleRows(const Tensor& logits, int rows, int vocab, const SamplingParams* params, const uint64_t* positions,
                       int slot) override {
    std::vector<std::vector<int32_t>> histories((size_t)rows);  // read by no row canQueueSampling() takes
    queued_[slot].assign((size_t)rows, 0);
    sampleRows(logits, rows, vocab, params, histories.data(), positions, queued_[slot].data());
  }
  void takeSampled(int slot, int rows, int32_t* out) override {
    std::copy(queued_[slot].begin(), queued_[slot].begin() + rows, out);
  }

  Tensor alloc(int64_t rows, int64_t cols) override { return hostTensor(rows, cols); }
  Tensor upload(const float* host, int64_t rows, int64_t cols) override {
    return uploadWeight(host, DType::F32, rows, cols);
  }
  DType keptWeightType(DType hostType) const override {
    return weights_ != DType::F32 ? weights_ : keepCheckpointDtype_ ? hostType : DType::F32;
  }
  Tensor uploadWeight(const void* host, DType hostType, int64_t rows, int64_t cols) override {
    const DType keep = keptWeightType(hostType);
    Tensor t = hostTensor(rows, cols, keep);
    const size_t n = (size_t)(rows * cols);
    if (keep == hostType) {
      std::memcpy(t.data, host, n * dtypeSize(keep));
    } else if (keep == DType::F32) {
      toF32(hostType, host, n, F(t));
    } else {  // rounded to the 16-bit weight dtype, one value at a time (no f32 copy of the tensor)
      uint16_t* o = static_cast<uint16_t*>(t.data);
      for (size_t i = 0; i < n; ++i) {
        float f;
        toF32(hostType, static_cast<const uint8_t*>(host) + i * dtypeSize(hostType), 1, &f);
        o[i] = keep == DType::BF16 ? f32ToBf16(f) : f32ToF16(f);
      }
    }
    return t;
  }
  void download(const Tensor& t, int64_t rowStart, int64_t rowCount, float* host) override {
    const size_t esize = dtypeSize(t.dtype);
    toF32(t.dtype, static_cast<const uint8_t*>(t.data) + (size_t)(rowStart * t.cols) * esize, (size_t)(rowCount * t.cols), host);
  }
  void writeRows(Tensor& t, int64_t rowStart, int64_t rowCount, const float* host) override {
    requireF32(t, "writeRows");
    std::memcpy(F(t) + rowStart * t.cols, host, sizeof(float) * (size_t)(rowCount * t.cols));
  }
  void poison(Tensor& t) override {
    requireF32(t, "poison");
    for (int64_t i = 0; i < t.numel(); ++i) F(t)[i] = NAN;
  }
  void embed(const int32_t* tokens, const int32_t* positions, int n, const Tensor& table, const Tensor* posTable,
             Tensor& out) override {
    const int64_t E = table.cols;
    std::vector<float> eBuf, pBuf;
    for (int r = 0; r < n; ++r) {
      const float* e = weightF32(table, (int64_t)tokens[r] * E, E, eBuf);
      float* o = F(out) + (int64_t)r * E;
      if (posTable) {
        const float* p = weightF32(*posTable, (int64_t)positions[r] * E, E, pBuf);
        for (int64_t j = 0; j < E; ++j) o[j] = e[j] + p[j];
      } else {
        std::memcpy(o, e, sizeof(float) * (size_t)E);
      }
    }
  }

  void norm(NormKind kind, const Tensor& x, int n, const Tensor& weight, const Tensor* bias, float eps,
            Tensor& out) override {
    const int64_t E = x.cols;
    std::vector<float> wBuf, bBuf;
    const float* W = weightF32(weight, 0, E, wBuf);
    const float* B = bias ? weightF32(*bias, 0, E, bBuf) : nullptr;
    for (int r = 0; r < n; ++r) {
      const float* xi = F(x) + r * E;
      float* o = F(out) + r * E;
      if (kind == NormKind::Rms) {
        double ss = 0;
        for (int64_t j = 0; j < E; ++j) ss += (double)xi[j] * xi[j];
        const float inv = (float)(1.0 / std::sqrt(ss / (double)E + (double)eps));
        for (int64_t j = 0; j < E; ++j) o[j] = (xi[j] * inv) * W[j];
      } else {
        double mean = 0, var = 0;
        for (int64_t j = 0; j < E; ++j) mean += xi[j];
        mean /= (double)E;
        for (int64_t j = 0; j < E; ++j) var += ((double)xi[j] - mean) * ((double)xi[j] - mean);
        var /= (double)E;
        const double inv = 1.0 / std::sqrt(var + (double)eps);
        for (int64_t j = 0; j < E; ++j)
          o[j] = (float)(((double)xi[j] - mean) * inv) * W[j] + (B ? B[j] : 0.0f);
      }
    }
  }

  void linear(const Tensor& x, int n, const Tensor& w, const Tensor* bias, Tensor& out) override {
    const int64_t in = w.cols, outF = w.rows;
    if (x.cols != in || out.cols != outF) throw EngineError(kErrInvalidArgument, "linear: shape mismatch");
    const float* X = F(x);
    std::vector<float> bBuf;
    const float* B = bias ? weightF32(*bias, 0, outF, bBuf) : nullptr;
    float* O = F(out);
    // Parallel over output features; each dot product runs in one fixed order, widening a 16-bit
    // weight as it reads it. Rows go four at a time (their sums interleaved, each in its own
    // order): a batch of rows costs less per row than one, with the same result per row.
    pool_.parallelFor(outF, [&](int64_t b, int64_t e) {
      const float* x[4];
      float d[4];
      for (int64_t j = b; j < e; ++j) {
        const float bj = B ? B[j] : 0.0f;
        for (int r = 0; r < n; r += 4) {
          const int rows = std::min(4, n - r);
          for (int i = 0; i < rows; ++i) x[i] = X + (int64_t)(r + i) * in;
          switch (rows) {
            case 4: dotRowsOf<4>(x, w, j, d); break;
            case 3: dotRowsOf<3>(x, w, j, d); break;
            case 2: dotRowsOf<2>(x, w, j, d); break;
            default: dotRowsOf<1>(x, w, j, d); break;
          }
          for (int i = 0; i < rows; ++i) O[(int64_t)(r + i) * outF + j] = d[i] + bj;
        }
      }
    }, 16);
  }

  void addInPlace(Tensor& x, const Tensor& y, int n) override {
    const int64_t m = (int64_t)n * x.cols;
    for (int64_t i = 0; i < m; ++i) F(x)[i] += F(y)[i];
  }

  void rope(Tensor& x, int n, int heads, int headDim, const int32_t* positions, const std::vector<float>& invFreq,
            float attentionScale) override {
    const int half = headDim / 2;
    std::vector<float> c((size_t)half), s((size_t)half);
    for (int r = 0; r < n; ++r) {
      for (int j = 0; j < half; ++j) {
        // Angle rounded to f32 as Hugging Face computes it (inv_freq[f32] * position[f32]).
        const float ang = (float)positions[r] * invFreq[(size_t)j];
        c[(size_t)j] = (float)std::cos((double)ang) * attentionScale;
        s[(size_t)j] = (float)std::sin((double)ang) * attentionScale;
      }
      for (int h = 0; h < heads; ++h) {
        float* v = F(x) + (int64_t)r * x.cols + (int64_t)h * headDim;
        for (int j = 0; j < half; ++j) {
          const float a = v[j], b = v[j + half];
          v[j] = a * c[(size_t)j] - b * s[(size_t)j];
          v[j + half] = b * c[(size_t)j] + a * s[(size_t)j];
        }
      }
    }
  }

  void kvWrite(const KvView& kv, int slot, const Tensor& k, const Tensor& v, int n, const int32_t* positions) override {
    const KvLayout& L = kv.layout;
    if (kvTypeChannelKeys(L.type)) return residualWrite(kv, slot, k, v, n, positions);
    const int hd = L.headDim();
    const int64_t headBytes = (int64_t)hd * kvTypeBits(L.type) / 8;
    const bool scaled = kvTypeScaled(L.type);
    for (int r = 0; r < n; ++r) {
      const uint32_t* scaleWords = nullptr;
      uint8_t* kCodes = kvCodesAt(kv, kv.rowSeq[r], slot, 0, positions[r], scaled ? &scaleWords : nullptr);
      uint8_t* vCodes = kvCodesAt(kv, kv.rowSeq[r], slot, 1, positions[r]);
      for (int h = 0; h < L.kvHeads; ++h) {
        const int64_t at = (int64_t)r * L.kvDim + (int64_t)h * hd;
        const uint16_t ks = kvQuantizeHead(L.type, F(k) + at, hd, kCodes + h * headBytes);
        const uint16_t vs = kvQuantizeHead(L.type, F(v) + at, hd, vCodes + h * headBytes);
        if (scaled) const_cast<uint32_t*>(scaleWords)[h] = (uint32_t)ks | (uint32_t)vs << 16;
      }
    }
  }

  // Zero codes and zero scales read back as zeros in every type; a channel-key type's rows are
  // zeroed in the residual.
  void kvZero(const KvView& kv, int seq, int slot, int start, int n) override {
    const KvLayout& L = kv.layout;
    uint8_t* pool = static_cast<uint8_t*>(kv.pool->data);
    for (int p = start; p < start + n; ++p) {
      if (kvTypeChannelKeys(L.type)) {
        kvCodesAt(kv, seq, slot, 0, p);  // checks the slot and the page
        const int32_t* parts = kv.residualOf(seq, p);
        for (int v = 0; v < 2; ++v) std::memset(pool + L.residualOffset(parts, slot, v, p % L.pageTokens), 0, (size_t)L.kvDim * 2);
        continue;
      }
      const uint32_t* scaleWords = nullptr;
      for (int v = 0; v < 2; ++v)
        std::memset(kvCodesAt(kv, seq, slot, v, p, kvTypeScaled(L.type) ? &scaleWords : nullptr), 0, (size_t)L.rowBytes());
      if (scaleWords) std::memset(const_cast<uint32_t*>(scaleWords), 0, sizeof(uint32_t) * (size_t)L.kvHeads);
    }
  }

  void kvRead(const KvView& kv, int seq, int slot, int start, int n, std::vector<float>& host) override {
    const KvLayout& L = kv.layout;
    const size_t d = (size_t)L.kvDim;
    if (slot < 0 || slot >= L.slots) throw EngineError(kErrInvalidArgument, "K/V slot out of range");
    host.resize(2 * (size_t)n * d);
    const uint8_t* pool = static_cast<const uint8_t*>(kv.pool->data);
    for (int p = start; p < start + n; ++p) {
      for (int v = 0; v < 2; ++v) {
        float* out = &host[((size_t)v * n + (size_t)(p - start)) * d];
        if (kv.inResidual(seq, p)) {
          kvDecodeResidualRow(L, pool, kv.residualOf(seq, p), slot, v, p % L.pageTokens, out);
        } else {
          kvDecodeRow(L, pool + L.codeOffset(kv.pageAt(seq, p), slot, 0, 0), v, p % L.pageTokens, out);
        }
      }
    }
  }

  void attention(const Tensor& q, int n, const int32_t* positions, const KvView& kv, int slot, const AttentionSpec& sp,
                 Tensor& out) override {
    const int group = sp.numHeads / sp.numKvHeads;
    const int hd = sp.headDim;
    // Check every page a query reads before the parallel region (which must not throw), and
    // note the residual each reads its last page from (channel-key types).
    const int P = kv.layout.pageTokens;
    std::vector<const int32_t*> residual((size_t)n);
    for (int r = 0; r < n; ++r) {
      const int first = sp.window > 0 ? std::max(0, positions[r] - sp.window + 1) : 0;
      for (int j = first; j <= positions[r]; j += P) kvCodesAt(kv, kv.rowSeq[r], slot, 0, j);
      kvCodesAt(kv, kv.rowSeq[r], slot, 0, positions[r]);
      residual[(size_t)r] = kv.queryResidual(kv.rowSeq[r], sp.strict ? positions[r] - 1 : positions[r]);
    }
    pool_.parallelFor((int64_t)n * sp.numHeads, [&](int64_t b, int64_t e) {
      std::vector<float> score, row((size_t)hd);
      for (int64_t idx = b; idx < e; ++idx) {
        const int r = (int)(idx / sp.numHeads), h = (int)(idx % sp.numHeads);
        const int p = positions[r], seq = kv.rowSeq[r];
        const int kvh = h / group;
        const float* qv = F(q) + (int64_t)r * q.cols + (int64_t)h * hd;
        float* o = F(out) + (int64_t)r * out.cols + (int64_t)h * hd;
        const int last = sp.strict ? p - 1 : p;
        const int first = sp.window > 0 ? std::max(0, p - sp.window + 1) : 0;
        if (last < first) {  // no visible key (position 0 of a strict layer): zero output
          std::memset(o, 0, sizeof(float) * (size_t)hd);
          continue;
        }
        score.resize((size_t)(last - first + 1));
        float mx = -INFINITY;
        for (int j = first; j <= last; ++j) {
          const float* kr = kvHeadValues(kv, seq, slot, 0, j, kvh, j / P == last / P ? residual[(size_t)r] : nullptr, row.data());
          float d = 0;
          for (int t = 0; t < hd; ++t) d += qv[t] * kr[t];
          d *= sp.scale;
          score[(size_t)(j - first)] = d;
          mx = std::max(mx, d);
        }
        double sum = 0;
        for (float& sc : score) sum += (sc = std::exp(sc - mx));
        const float inv = (float)(1.0 / sum);
        for (int t = 0; t < hd; ++t) o[t] = 0;
        for (int j = first; j <= last; ++j) {
          const float w = score[(size_t)(j - first)] * inv;
          const float* vv = kvHeadValues(kv, seq, slot, 1, j, kvh, j / P == last / P ? residual[(size_t)r] : nullptr, row.data());
          for (int t = 0; t < hd; ++t) o[t] += w * vv[t];
        }
      }
    });
  }

  void swiglu(const Tensor& gate, const Tensor& up, int n, Tensor& out) override {
    const int64_t m = (int64_t)n * gate.cols;
    for (int64_t i = 0; i < m; ++i) {
      const float g = F(gate)[i];
      F(out)[i] = (g / (1.0f + std::exp(-g))) * F(up)[i];
    }
  }

  void geluTanh(Tensor& x, int n) override {
    const int64_t m = (int64_t)n * x.cols;
    const double c = std::sqrt(2.0 / M_PI);
    for (int64_t i = 0; i < m; ++i) {
      const double v = F(x)[i];
      F(x)[i] = (float)(0.5 * v * (1.0 + std::tanh(c * (v + 0.044715 * v * v * v))));
    }
  }

  void copyRows(const Tensor& src, int srcRow, Tensor& dst, int dstRow, int n) override {
    requireF32(src, "copyRows");
    requireF32(dst, "copyRows");
    std::memcpy(F(dst) + (int64_t)dstRow * dst.cols, F(src) + (int64_t)srcRow * src.cols,
                sizeof(float) * (size_t)(n * src.cols));
  }


 private:
  const bool queuedSampling_ = cpuQueuedSampling.load();
  std::vector<int32_t> queued_[2];  // queueSampleRows()'s tokens by slot

  // kvWrite for a channel-key type: each row into the residual in bf16; then each page whose
  // last row was written is quantized from the residual (kvQuantizePage).
  void residualWrite(const KvView& kv, int slot, const Tensor& k, const Tensor& v, int n, const int32_t* positions) {
    const KvLayout& L = kv.layout;
    const int P = L.pageTokens, D = L.kvDim;
    uint8_t* pool = static_cast<uint8_t*>(kv.pool->data);
    for (int r = 0; r < n; ++r) {
      kvCodesAt(kv, kv.rowSeq[r], slot, 0, positions[r]);  // checks the slot and the page
      kv.residualOf(kv.rowSeq[r], positions[r]);
    }
    for (int r = 0; r < n; ++r) {
      const int32_t* parts = kv.residualOf(kv.rowSeq[r], positions[r]);
      for (int which = 0; which < 2; ++which) {
        const float* x = F(which ? v : k) + (int64_t)r * D;
        uint8_t* row = pool + L.residualOffset(parts, slot, which, positions[r] % P);
        for (int i = 0; i < D; ++i) kvPutCode(KvType::BF16, row, i, kvEncode(KvType::BF16, x[i], 0.0f));
      }
    }
    std::vector<uint16_t> kRows((size_t)P * D), vRows((size_t)P * D);
    for (int r = 0; r < n; ++r) {
      if (positions[r] % P != P - 1) continue;
      const int seq = kv.rowSeq[r];
      const int32_t* parts = kv.residualOf(seq, positions[r]);
      for (int t = 0; t < P; ++t) {
        std::memcpy(&kRows[(size_t)t * D], pool + L.residualOffset(parts, slot, 0, t), (size_t)D * 2);
        std::memcpy(&vRows[(size_t)t * D], pool + L.residualOffset(parts, slot, 1, t), (size_t)D * 2);
      }
      kvQuantizePage(L, kRows.data(), vRows.data(), pool + L.codeOffset(kv.pageAt(seq, positions[r]), slot, 0, 0));
    }
  }

  ThreadPool pool_;
  DType weights_;
  bool keepCheckpointDtype_;
};

}  // namespace

void setCpuQueuedSampling(bool on) { cpuQueuedSampling.store(on); }

std::unique_ptr<Backend> createCpuBackend(int threads, DType weights, bool keepCheckpointDtype) {
  return std::make_unique<CpuBackend>(threads, weights, keepCheckpointDtype);
}

}  // namespace lckv
