// The CUDA backend's per-op profiler (profiler.h).
#include "profiler.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace lckv {

OpProfiler::OpProfiler() {
  const char* e = std::getenv("LCKV_PROFILE");
  enabled_ = e && *e && std::string(e) != "0";
}

void OpProfiler::begin(const char* name, cudaStream_t s) {
  Pending p{name, event(), event()};
  cudaEventRecord(p.start, s);
  open_.push_back(p);
}

void OpProfiler::end(cudaStream_t s) {
  Pending p = open_.back();
  open_.pop_back();
  cudaEventRecord(p.stop, s);
  pending_.push_back(p);
  if (pending_.size() > 4096) collect();
}

void OpProfiler::collect() {
  for (auto& p : pending_) {
    cudaEventSynchronize(p.stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, p.start, p.stop);
    auto& st = stats_[p.name];
    st.calls++;
    st.ms += ms;
    free_.push_back(p.start);
    free_.push_back(p.stop);
  }
  pending_.clear();
}

void OpProfiler::report() {
  if (!enabled_) return;
  collect();
  double total = 0;
  for (auto& kv : stats_) total += kv.second.ms;
  std::vector<std::pair<std::string, Stat>> rows(stats_.begin(), stats_.end());
  std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.ms > b.second.ms; });
  std::fprintf(stderr, "lckv profile (CUDA events, GPU time per op)\n%-16s %10s %12s %12s %7s\n", "op", "calls", "total ms",
               "mean us", "share");
  for (auto& r : rows)
    std::fprintf(stderr, "%-16s %10lld %12.3f %12.2f %6.1f%%\n", r.first.c_str(), (long long)r.second.calls, r.second.ms,
                 1e3 * r.second.ms / (double)r.second.calls, total > 0 ? 100.0 * r.second.ms / total : 0.0);
  std::fprintf(stderr, "%-16s %10s %12.3f\n", "total", "", total);
}

OpProfiler::~OpProfiler() {
  for (auto e : free_) cudaEventDestroy(e);
}

cudaEvent_t OpProfiler::event() {
  if (!free_.empty()) {
    cudaEvent_t e = free_.back();
    free_.pop_back();
    return e;
  }
  cudaEvent_t e;
  cudaEventCreate(&e);
  return e;
}

}  // namespace lckv
