// Device memory of the CUDA backend: plain allocations, the block cache, the staging buffers and
// the RoPE frequencies (device_memory.h).
#include "device_memory.h"

#include <algorithm>
#include <cstring>

#include "../engine/errors.h"
#include "cuda_check.h"

namespace lckv {

std::shared_ptr<void> deviceAlloc(size_t bytes) {
  void* p = nullptr;
  cudaOk(cudaMalloc(&p, bytes > 0 ? bytes : 16), "cudaMalloc");
  return std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
}

std::shared_ptr<void> BlockCache::get(size_t bytes) {
  bytes = (bytes + 255) & ~size_t(255);
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lk(state_->mu);
    auto& list = state_->free[bytes];
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
    }
  }
  if (!p) p = allocate(bytes);
  auto st = state_;
  return std::shared_ptr<void>(p, [st, bytes](void* q) {
    std::lock_guard<std::mutex> lk(st->mu);
    st->free[bytes].push_back(q);
  });
}

std::shared_ptr<void> BlockCache::uncached(size_t bytes) {
  return std::shared_ptr<void>(allocate(bytes > 0 ? bytes : 16), [](void* q) { cudaFree(q); });
}

void* BlockCache::allocate(size_t bytes) {
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    release();
    e = cudaMalloc(&p, bytes);
  }
  cudaOk(e, "cudaMalloc");
  return p;
}

void BlockCache::release() {
  std::lock_guard<std::mutex> lk(state_->mu);
  for (auto& kv : state_->free)
    for (void* q : kv.second) cudaFree(q);
  state_->free.clear();
}

const int32_t* StagingBuffers::upload(Staging which, const int32_t* host, int n, cudaStream_t stream) {
  auto& buf = buffers_[(int)which];
  if ((int)buf.cap < n) {
    buf.mem = deviceAlloc(sizeof(int32_t) * (size_t)std::max(n, 256));
    buf.cap = std::max(n, 256);
    buf.shadow.clear();
  }
  if ((int)buf.shadow.size() != n || std::memcmp(buf.shadow.data(), host, sizeof(int32_t) * (size_t)n) != 0) {
    cudaOk(cudaMemcpyAsync(buf.mem.get(), host, sizeof(int32_t) * (size_t)n, cudaMemcpyHostToDevice, stream), "stage");
    buf.shadow.assign(host, host + n);
  }
  return (const int32_t*)buf.mem.get();
}

const float* RopeFrequencies::device(const std::vector<float>& f, bool recording, cudaStream_t stream) {
  auto it = invFreq_.find(f.data());
  if (it != invFreq_.end() && it->second.host == f) return (const float*)it->second.device.get();
  if (recording) throw EngineError(kErrCuda, "RoPE frequencies first uploaded inside a recorded step");
  auto mem = deviceAlloc(f.size() * sizeof(float));
  cudaOk(cudaMemcpyAsync(mem.get(), f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice, stream), "invFreq");
  // (A replaced upload stays allocated: a recorded step may have baked its address in.)
  if (it != invFreq_.end()) retiredInvFreq_.push_back(it->second.device);
  invFreq_[f.data()] = {f, mem};  // the copy above is stream-ordered before any reader
  return (const float*)mem.get();
}

}  // namespace lckv
