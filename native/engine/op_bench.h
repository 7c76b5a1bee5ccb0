// Times one backend op alone on a synthetic shape, for the benchmarks (scripts/bench/run.js):
// the attention of a decode step against the bytes it has to read, so that its achieved
// bandwidth can be set beside the card's copy bandwidth; or of a prompt's chunk (queries > 1)
// against the products it has to do, beside the tensor cores' rate.
#pragma once
#include "backend.h"

namespace lckv {

struct AttentionBenchShape {
  int sequences = 1;  // `queries` queries each, at the last positions of its own pages
  int context = 1;    // tokens of K/V each sequence holds (the last query sees them all)
  int queries = 1;    // rows of each sequence, causal: 1 is a decode step, more a prompt's chunk
  int numHeads = 1, numKvHeads = 1, headDim = 1;
  KvType kvType = KvType::F32;  // the cache's value type: what the kernel reads
  int iterations = 1;  // timed calls, after one warm-up call
  // The backend's weight type: with bf16 weights a call of more than 16 rows writes its output in
  // bf16, as the engine's does (it feeds the output projection's bf16 product).
  DType weights = DType::F32;
};

struct AttentionBenchResult {
  double ms = 0;     // mean per call: host clock around the calls, closed by a synchronising download
  double bytes = 0;  // what one call must move: K and V of every visible key (codes and scales), the queries and the output
  double flops = 0;  // the products one call must do: 4 x head size per visible (query, key) pair and query head
};

AttentionBenchResult benchAttention(Backend& be, const AttentionBenchShape& shape);

}  // namespace lckv
