// What the model's source files share and the addon does not see: the activations of one
// forward (Model::Scratch), the commit-or-rollback of a forward's page writes, and opt().
#pragma once
#include <cstdint>
#include <vector>

#include "model.h"

namespace lckv {

// Activations of one chunk of n tokens. Allocated per append: the CPU backend's allocations are
// cheap next to the forward, and a GPU backend replaces this with a preallocated arena.
struct Model::Scratch {
  Tensor h, x, q, k, v, a, o, g, u, h0;
  // The pages this forward reads and writes (kv.tables, kv.rowSeq and the residual's arrays
  // point into the vectors).
  KvView kv;
  std::vector<int32_t> tables, rowSeq, residuals, residualPage;
  // The last MLP output waits in `o` to be added to `h` by the next layer's fused add + norm.
  bool pendingResidual = false;
};

// The page writes of one forward, undone unless committed: on any failure each sequence gives
// back the pages past its (unchanged) length and the reservation they used, so a failed call
// leaves every sequence as it was.
struct PendingWrites {
  std::vector<SequenceState*> seqs;
  bool committed = false;
  ~PendingWrites() {
    if (!committed)
      for (SequenceState* q : seqs) q->kv->rollbackWrite(q->length());
  }
  void commit() {
    for (SequenceState* q : seqs) q->kv->commitWrite();
    committed = true;
  }
};

// An optional weight (a bias, GPT-2's position table): null when the config has none.
inline const Tensor* opt(const Tensor& t) { return t.empty() ? nullptr : &t; }

}  // namespace lckv
