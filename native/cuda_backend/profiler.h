// The CUDA backend's per-op profiler (LCKV_PROFILE=1): GPU time per op, from CUDA events.
#pragma once
#include <cuda_runtime.h>

#include <map>
#include <string>
#include <vector>

namespace lckv {

// LCKV_PROFILE=1: every op is bracketed by CUDA events; times are gathered at the next host
// synchronisation and a per-op summary is printed to stderr when the backend is destroyed
// (model.dispose() or process exit). Nsight Systems shows the same ops as NVTX ranges.
class OpProfiler {
 public:
  OpProfiler();
  ~OpProfiler();
  bool enabled() const { return enabled_; }
  void begin(const char* name, cudaStream_t s);
  void end(cudaStream_t s);
  void collect();
  void report();

 private:
  struct Pending {
    const char* name;
    cudaEvent_t start, stop;
  };
  struct Stat {
    long long calls = 0;
    double ms = 0;
  };
  cudaEvent_t event();
  bool enabled_ = false;
  std::vector<Pending> open_, pending_;
  std::vector<cudaEvent_t> free_;
  std::map<std::string, Stat> stats_;
};

}  // namespace lckv
