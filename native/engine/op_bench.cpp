#include "op_bench.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace lckv {

namespace {

// The engine's page size (lib/admission.ts KV_PAGE_TOKENS).
constexpr int kPageTokens = 16;

void checkPositive(int v, const char* what) {
  if (v <= 0) throw EngineError(kErrInvalidArgument, std::string("benchAttention: '") + what + "' must be a positive integer");
}

}  // namespace

AttentionBenchResult benchAttention(Backend& be, const AttentionBenchShape& s) {
  checkPositive(s.sequences, "sequences");
  checkPositive(s.context, "context");
  checkPositive(s.numHeads, "numHeads");
  checkPositive(s.numKvHeads, "numKvHeads");
  checkPositive(s.headDim, "headDim");
  checkPositive(s.iterations, "iterations");
  checkPositive(s.queries, "queries");
  if (s.queries > s.context)
    throw EngineError(kErrInvalidArgument, "benchAttention: 'queries' (" + std::to_string(s.queries) + ") must be at most 'context' (" +
                                               std::to_string(s.context) + ")");
  if (s.numHeads % s.numKvHeads) throw EngineError(kErrInvalidArgument, "benchAttention: numHeads must be a multiple of numKvHeads");

  KvLayout layout;
  layout.slots = 1;
  layout.kvDim = s.numKvHeads * s.headDim;
  layout.kvHeads = s.numKvHeads;
  layout.pageTokens = kPageTokens;
  layout.type = s.kvType;
  const std::string headDimProblem = kvHeadDimProblem(s.kvType, s.headDim);
  if (!headDimProblem.empty()) throw EngineError(kErrInvalidArgument, "benchAttention: kvCacheDtype " + headDimProblem);
  const int pagesPerSeq = (s.context + kPageTokens - 1) / kPageTokens;
  // A channel-key type (int4) also gives each sequence its residual (kv_format.h), after the
  // table pages.
  const int R = layout.residualParts();
  const int64_t pages = (int64_t)(pagesPerSeq + R) * s.sequences;
  if (pages > INT32_MAX) throw EngineError(kErrInvalidArgument, "benchAttention: too many pages for 32-bit page ids");

  // The pool: one page per row, holding random normal values encoded in the K/V type (a chunk of
  // random pages written over and over: the values do not change what the kernels read).
  const int64_t pageWords = layout.pageBytes() / 4;
  Tensor pool = be.alloc(pages, pageWords);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t chunkPages = std::min<int64_t>(pages, std::max<int64_t>(1, (16 << 20) / layout.pageBytes()));
  std::vector<float> chunk((size_t)(chunkPages * pageWords), 0.0f);
  {
    uint8_t* bytes = reinterpret_cast<uint8_t*>(chunk.data());
    std::vector<float> head((size_t)s.headDim);
    const int64_t headBytes = (int64_t)s.headDim * kvTypeBits(layout.type) / 8;
    const bool channelKeys = kvTypeChannelKeys(layout.type);
    std::vector<uint16_t> kRows(channelKeys ? (size_t)kPageTokens * layout.kvDim : 0), vRows(kRows.size());
    for (int page = 0; page < chunkPages && channelKeys; ++page) {
      // A quantized page from random bf16 rows, which also serve as a residual's rows.
      for (size_t i = 0; i < kRows.size(); ++i) kRows[i] = kvF32ToBf16(normal(rng)), vRows[i] = kvF32ToBf16(normal(rng));
      kvQuantizePage(layout, kRows.data(), vRows.data(), bytes + layout.codeOffset(page, 0, 0, 0));
    }
    for (int page = 0; page < chunkPages && !channelKeys; ++page)
      for (int off = 0; off < kPageTokens; ++off)
        for (int h = 0; h < s.numKvHeads; ++h) {
          uint16_t scales[2];
          for (int v = 0; v < 2; ++v) {
            for (float& x : head) x = normal(rng);
            scales[v] = kvQuantizeHead(layout.type, head.data(), s.headDim, bytes + layout.codeOffset(page, 0, v, off) + h * headBytes);
          }
          if (kvTypeScaled(layout.type)) {
            const uint32_t word = (uint32_t)scales[0] | (uint32_t)scales[1] << 16;
            std::memcpy(bytes + layout.scaleOffset(page, 0, off, h), &word, 4);
          }
        }
  }
  for (int64_t p = 0; p < pages; p += chunkPages) be.writeRows(pool, p, std::min(chunkPages, pages - p), chunk.data());

  // Page i of sequence s is page i * sequences + s: the sequences' pages interleave, as in a pool
  // where a batch of sequences grew together. Rows: each sequence's last `queries` positions.
  const int64_t rows64 = (int64_t)s.sequences * s.queries;
  if (rows64 > INT32_MAX) throw EngineError(kErrInvalidArgument, "benchAttention: too many query rows");
  const int rows = (int)rows64;
  std::vector<int32_t> tables((size_t)pagesPerSeq * s.sequences), rowSeq((size_t)rows), positions((size_t)rows);
  std::vector<int32_t> residuals((size_t)R * s.sequences), residualPage((size_t)s.sequences, (s.context - 1) / kPageTokens);
  for (int q = 0; q < s.sequences; ++q) {
    for (int i = 0; i < s.queries; ++i) {
      rowSeq[(size_t)q * s.queries + i] = q;
      positions[(size_t)q * s.queries + i] = s.context - s.queries + i;
    }
    for (int i = 0; i < pagesPerSeq; ++i) tables[(size_t)q * pagesPerSeq + i] = (int32_t)((int64_t)i * s.sequences + q);
    for (int i = 0; i < R; ++i) residuals[(size_t)q * R + i] = (int32_t)((int64_t)(pagesPerSeq + i) * s.sequences + q);
  }
  KvView view{&pool, layout, tables.data(), pagesPerSeq, s.sequences, rowSeq.data(), residuals.data(), residualPage.data()};

  const int64_t qCols = (int64_t)s.numHeads * s.headDim;
  std::vector<float> qHost((size_t)(rows * qCols));
  for (float& x : qHost) x = normal(rng);
  Tensor q = be.alloc(rows, qCols), out = be.allocLinearInput(rows, qCols);
  be.writeRows(q, 0, rows, qHost.data());
  AttentionSpec spec{s.numHeads, s.numKvHeads, s.headDim, false, 0, 1.0f / std::sqrt((float)s.headDim)};

  std::vector<float> row((size_t)qCols);
  be.attention(q, rows, positions.data(), view, 0, spec, out);
  be.download(out, 0, 1, row.data());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < s.iterations; ++i) be.attention(q, rows, positions.data(), view, 0, spec, out);
  be.download(out, 0, 1, row.data());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  AttentionBenchResult r;
  r.ms = ms / s.iterations;
  // Per key: K and V codes, and their scales (one word per K/V head). A channel-key type's
  // query reads the page of its position from the residual in bf16 unless that page is full,
  // and a page's K scales once per channel.
  double keyBytes = 2.0 * layout.rowBytes() + (kvTypeScaled(layout.type) ? 4.0 * s.numKvHeads : 0.0);
  int64_t quantizedKeys = s.context, residualKeys = 0;
  if (kvTypeChannelKeys(layout.type)) {
    keyBytes = 2.0 * layout.rowBytes() + 2.0 * s.numKvHeads + 2.0 * layout.kvDim / kPageTokens;
    if (s.context % kPageTokens) residualKeys = s.context % kPageTokens, quantizedKeys = s.context - residualKeys;
  }
  // The queries in f32; the output in its own type.
  r.bytes = (double)s.sequences * (quantizedKeys * keyBytes + residualKeys * 4.0 * layout.kvDim) +
            (4.0 + (double)dtypeSize(out.dtype)) * (double)rows * qCols;
  // Row i of a sequence's `queries` sees context - queries + i + 1 keys.
  const double pairs = (double)s.sequences * s.queries * (2.0 * s.context - s.queries + 1) / 2.0;
  r.flops = 4.0 * pairs * qCols;
  return r;
}

}  // namespace lckv
