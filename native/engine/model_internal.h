// What the model's source files share and the addon does not see: the activations of one
// forward (Model::Scratch), the commit-or-rollback of a forward's page writes and of a residual
// it moves, and opt().
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
// back the pages this forward took past its (unchanged) length and the reservation they used
// (KvPages::rollbackWrite; pages it held before, such as a committed step's early page, stay), so
// a failed call leaves every sequence as it was.
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

// A copy of seq's residual parts (a channel-key type's bf16 rows of the page it holds), a row per
// part, and its writing back: what a backup and a checkpoint of the residual keep.
inline Tensor copyResidualRows(Backend& be, KvPool& pool, const SequenceState& seq) {
  const std::vector<int32_t>& parts = seq.kv->residual();
  Tensor rows = be.alloc((int64_t)parts.size(), pool.storage().cols);
  for (size_t i = 0; i < parts.size(); ++i) be.copyRows(pool.storage(), parts[i], rows, (int)i, 1);
  return rows;
}
inline void putResidualRows(Backend& be, KvPool& pool, SequenceState& seq, const Tensor& rows) {
  const std::vector<int32_t>& parts = seq.kv->residual();
  for (size_t i = 0; i < parts.size(); ++i) be.copyRows(rows, (int)i, pool.storage(), parts[i], 1);
}

// The residual's bytes while a write (an append, a decode step) moves it past the page its
// sequence ends in: a failed write puts them back, so the rows before its start read as they did
// (a channel-key type).
class ResidualBackup {
 public:
  ResidualBackup(Model& m, SequenceState& seq) : model_(m), seq_(seq) {}
  ResidualBackup(const ResidualBackup&) = delete;
  ResidualBackup& operator=(const ResidualBackup&) = delete;
  void save() {
    copy_ = copyResidualRows(model_.backend(), model_.pool(), seq_);
    page_ = seq_.kv->residualPage();
  }
  void release() { copy_ = Tensor{}; }
  ~ResidualBackup() {
    if (copy_.empty()) return;
    try {
      putResidualRows(model_.backend(), model_.pool(), seq_, copy_);
      seq_.kv->setResidualPage(page_);
    } catch (...) {
      // A device error: the rows are lost, and the next write reads them back from their codes.
      seq_.kv->setResidualPage(-1);
    }
  }

 private:
  Model& model_;
  SequenceState& seq_;
  Tensor copy_;
  int page_ = -1;
};

// An optional weight (a bias, GPT-2's position table): null when the config has none.
inline const Tensor* opt(const Tensor& t) { return t.empty() ? nullptr : &t; }

}  // namespace lckv
