// Device memory of the CUDA backend: plain allocations, the block cache that activations come
// from, the staging buffers that carry small host arrays (token ids, positions, page tables)
// to the device, and the RoPE frequencies kept there.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace lckv {

// cudaMalloc'd memory (at least 16 bytes), freed when the last holder lets go.
std::shared_ptr<void> deviceAlloc(size_t bytes);

// Activations are allocated per forward; cudaMalloc/cudaFree per call would synchronise the
// device each time. Freed blocks go back to a per-size free list instead. All work runs on the
// backend's one stream, so a block freed by the host is reused only by work queued after the
// work that last used it.
class BlockCache {
 public:
  std::shared_ptr<void> get(size_t bytes);
  // cudaMalloc'd memory of its own (freed, not cached, when the last holder lets go), for buffers
  // kept and grown outside the cache; it may take the room of cached blocks as get() does.
  std::shared_ptr<void> uncached(size_t bytes);
  void release();
  ~BlockCache() { release(); }

 private:
  // cudaMalloc; when the device is out of memory, the cached blocks are given back and it tries
  // once more (std::bad_alloc when that fails too), so an allocation fails only when the cache
  // could not have made room for it.
  void* allocate(size_t bytes);

  struct State {
    std::mutex mu;
    std::map<size_t, std::vector<void*>> free;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

// The host arrays the ops copy to the device, one staging buffer each. While a decode step is
// recorded, all but PenalisedTokens and LogitAdjustments are read from the recording's inputs
// instead (StepGraph).
enum class Staging {
  Tokens,           // token ids of the rows (embedding)
  Positions,        // positions of the rows (embedding, RoPE, K/V writes, attention)
  PenalisedTokens,  // the distinct tokens one row's repetition penalty applies to (sampling)
  PageTables,       // the K/V page tables of the op's sequences (KvView::tables)
  RowToSequence,    // for each row, its sequence's row in the page tables (KvView::rowSeq)
  LogitAdjustments,  // one row's presence/frequency penalties and logit bias (sampling; floats as bits)
  Residuals,        // a channel-key K/V type's residual parts of the op's sequences (KvView::residuals)
};
constexpr int kStagingBuffers = 7;

class StagingBuffers {
 public:
  // Copies a small host array (token ids, positions) to a device staging buffer, skipping the
  // copy when the buffer already holds the same values (positions repeat across a forward's
  // layers). The copy is stream-ordered after earlier readers of the buffer, and a copy from
  // pageable memory returns once the host data is taken, so no synchronisation is needed.
  const int32_t* upload(Staging which, const int32_t* host, int n, cudaStream_t stream);

 private:
  struct Buffer {
    std::shared_ptr<void> mem;
    size_t cap = 0;
    std::vector<int32_t> shadow;  // what the device buffer holds
  };
  Buffer buffers_[kStagingBuffers];  // by Staging
};

class RopeFrequencies {
 public:
  // The frequencies on the device, uploaded once per host array (a model's config holds its
  // own for the model's life); the host copy kept beside them catches a different array that
  // reuses a freed one's address. recording: a decode step is being recorded (no upload then).
  const float* device(const std::vector<float>& f, bool recording, cudaStream_t stream);

 private:
  struct Frequencies {
    std::vector<float> host;
    std::shared_ptr<void> device;
  };
  std::map<const float*, Frequencies> invFreq_;
  std::vector<std::shared_ptr<void>> retiredInvFreq_;
};

}  // namespace lckv
