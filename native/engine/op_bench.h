// Times one backend op alone on a synthetic shape, for the benchmarks (scripts/bench/run.js):
// the attention of a decode step against the bytes it has to read, so that its achieved
// bandwidth can be set beside the card's copy bandwidth.
#pragma once
#include "backend.h"

namespace lckv {

struct AttentionBenchShape {
  int sequences = 1;  // one query each, at position context - 1 of its own pages
  int context = 1;    // tokens of K/V each sequence holds (all visible)
  int numHeads = 1, numKvHeads = 1, headDim = 1;
  KvType kvType = KvType::F32;  // the cache's value type: what the kernel reads
  int iterations = 1;  // timed calls, after one warm-up call
};

struct AttentionBenchResult {
  double ms = 0;     // mean per call: host clock around the calls, closed by a synchronising download
  double bytes = 0;  // what one call must move: K and V of every visible key (codes and scales), the queries and the output
};

AttentionBenchResult benchAttention(Backend& be, const AttentionBenchShape& shape);

}  // namespace lckv
