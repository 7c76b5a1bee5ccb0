/*
 * A CUPTI injection library: records the start and end of every GPU kernel of a CUDA program,
 * including each kernel replayed inside a CUDA graph (events around a graph launch time only the
 * whole graph), and at exit writes a per-kernel summary of the run's last kernels: what a timed
 * decode step spends in each kernel and between kernels.
 *
 *   nvcc -std=c++17 -shared -Xcompiler -fPIC -o /tmp/libkerneltrace.so \
 *     scripts/bench/kernel-trace.cpp -I/usr/local/cuda/include -L/usr/local/cuda/lib64 -lcupti
 *   CUDA_INJECTION64_PATH=/tmp/libkerneltrace.so LCKV_TRACE_OUT=/tmp/trace.txt \
 *     node scripts/bench/profile-step.js --context 128 --batch 1
 *
 * LCKV_TRACE_OUT: the report's file (default stderr). LCKV_TRACE_LAST: kernels reported, the
 * last ones of the run (default 2000). LCKV_TRACE_SKIP_MS: drop kernels starting within this
 * many ms of the first one (load and prefill) before taking the last. LCKV_TRACE_RAW=1: also
 * one line per kernel. The CUDA driver calls InitializeInjection when it loads the library.
 */
#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// CUDA 13's record for CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL.
using KernelRecord = CUpti_ActivityKernel10;

struct Kernel { uint64_t start, end; uint32_t stream, graph, name; };

std::mutex mu;
std::vector<Kernel> kernels;
std::vector<std::string> names;                    // short names, indexed by Kernel::name
std::unordered_map<std::string, uint32_t> nameIds;  // mangled name -> index

bool ok(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return true;
  const char* s = "?";
  cuptiGetResultString(r, &s);
  fprintf(stderr, "kernel-trace: %s: %s\n", what, s);
  return false;
}

void erase_all(std::string& s, const char* what) {
  for (size_t p; (p = s.find(what)) != std::string::npos;) s.erase(p, strlen(what));
}

// "void lckv::cuda::(anonymous namespace)::gemv<128>(float const*, ...)" -> "gemv<128>".
std::string shorten(const char* mangled) {
  int status = 1;
  char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : mangled;
  free(d);
  erase_all(s, "(anonymous namespace)::");
  erase_all(s, "lckv::cuda::");
  if (s.compare(0, 5, "void ") == 0) s.erase(0, 5);
  if (!s.empty() && s.back() == ')') {  // drop the argument list: the ')' back to its '('
    int depth = 0;
    for (size_t i = s.size(); i-- > 0;) {
      if (s[i] == ')') depth++;
      else if (s[i] == '(' && --depth == 0) { s.erase(i); break; }
    }
  }
  return s;
}

void CUPTIAPI requested(uint8_t** buffer, size_t* size, size_t* maxRecords) {
  *size = 8 << 20;
  *buffer = static_cast<uint8_t*>(aligned_alloc(8, *size));
  *maxRecords = 0;  // as many as fit
  if (!*buffer) { fprintf(stderr, "kernel-trace: out of memory\n"); *size = 0; }
}

void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t, size_t valid) {
  {
    std::lock_guard<std::mutex> lock(mu);
    CUpti_Activity* rec = nullptr;
    while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
      if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
      auto* k = reinterpret_cast<const KernelRecord*>(rec);
      const char* raw = k->name ? k->name : "?";
      auto it = nameIds.find(raw);
      if (it == nameIds.end()) {
        it = nameIds.emplace(raw, uint32_t(names.size())).first;
        names.push_back(shorten(raw));
      }
      kernels.push_back({k->start, k->end, k->streamId, k->graphId, it->second});
    }
  }
  size_t dropped = 0;
  if (ok(cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped), "dropped records") && dropped)
    fprintf(stderr, "kernel-trace: %zu records dropped\n", dropped);
  free(buffer);
}

long env_long(const char* name, long fallback) {
  const char* v = getenv(name);
  return v && *v ? strtol(v, nullptr, 10) : fallback;
}

void report() {
  ok(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "cuptiActivityFlushAll");
  std::lock_guard<std::mutex> lock(mu);
  std::vector<Kernel>& ks = kernels;
  std::sort(ks.begin(), ks.end(),
            [](const Kernel& a, const Kernel& b) { return a.start < b.start; });
  // Gap before each kernel on its stream, over the whole run, so the window's first kernel has
  // one too. Measured from the latest end so far: with programmatic dependent launch a kernel
  // may start before its predecessor ends, which counts as no gap.
  std::vector<uint64_t> gap(ks.size(), 0);
  std::unordered_map<uint32_t, uint64_t> lastEnd;
  for (size_t i = 0; i < ks.size(); i++) {
    auto it = lastEnd.find(ks[i].stream);
    if (it != lastEnd.end()) {
      if (ks[i].start > it->second) gap[i] = ks[i].start - it->second;
      it->second = std::max(it->second, ks[i].end);
    } else {
      lastEnd[ks[i].stream] = ks[i].end;
    }
  }
  size_t first = 0;
  long skipMs = env_long("LCKV_TRACE_SKIP_MS", 0);
  if (skipMs > 0 && !ks.empty())
    while (first < ks.size() && ks[first].start < ks[0].start + uint64_t(skipMs) * 1000000) first++;
  long last = env_long("LCKV_TRACE_LAST", 2000);
  if (last > 0 && ks.size() - first > size_t(last)) first = ks.size() - last;

  const char* path = getenv("LCKV_TRACE_OUT");
  FILE* out = path && *path ? fopen(path, "w") : stderr;
  if (!out) { fprintf(stderr, "kernel-trace: cannot write %s\n", path); return; }
  if (first == ks.size()) {
    fprintf(out, "kernel-trace: no kernels to report (%zu recorded)\n", ks.size());
    if (out != stderr) fclose(out);
    return;
  }

  struct Row { size_t calls = 0; uint64_t total = 0, min = UINT64_MAX, gap = 0; };
  std::map<uint32_t, Row> rows;
  uint64_t span0 = ks[first].start, spanEnd = 0, busy = 0, gaps = 0, curStart = 0, curEnd = 0;
  std::set<uint32_t> graphs;
  for (size_t i = first; i < ks.size(); i++) {
    const Kernel& k = ks[i];
    uint64_t d = k.end > k.start ? k.end - k.start : 0;
    Row& r = rows[k.name];
    r.calls++, r.total += d, r.min = std::min(r.min, d), r.gap += gap[i];
    gaps += gap[i];
    spanEnd = std::max(spanEnd, k.end);
    if (k.graph) graphs.insert(k.graph);
    // Busy time is the union of the intervals: overlapping kernels are counted once.
    if (i == first || k.start > curEnd) {
      busy += curEnd - curStart;
      curStart = k.start, curEnd = k.end;
    } else {
      curEnd = std::max(curEnd, k.end);
    }
  }
  busy += curEnd - curStart;

  std::vector<std::pair<uint32_t, Row>> sorted(rows.begin(), rows.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.second.total > b.second.total; });
  size_t n = ks.size() - first;
  size_t inGraphs = std::count_if(ks.begin() + first, ks.end(), [](const Kernel& k) { return k.graph != 0; });
  fprintf(out, "kernel-trace: last %zu of %zu kernels (%zu in %zu graphs)\n", n, ks.size(),
          inGraphs, graphs.size());
  fprintf(out, "%8s %12s %10s %10s %12s  %s\n", "calls", "total_us", "mean_us", "min_us", "gap_us",
          "kernel");
  for (auto& [id, r] : sorted)
    fprintf(out, "%8zu %12.2f %10.2f %10.2f %12.2f  %s\n", r.calls, r.total / 1e3,
            r.total / 1e3 / r.calls, r.min / 1e3, r.gap / 1e3, names[id].c_str());
  fprintf(out, "span %.2f us, busy %.2f us (%.1f%%), gaps %.2f us, kernels %zu\n",
          (spanEnd - span0) / 1e3, busy / 1e3, spanEnd > span0 ? 100.0 * busy / (spanEnd - span0) : 0.0,
          gaps / 1e3, n);
  if (env_long("LCKV_TRACE_RAW", 0) == 1) {
    fprintf(out, "%12s %10s %10s %6s  %s\n", "start_us", "dur_us", "gap_us", "stream", "kernel");
    for (size_t i = first; i < ks.size(); i++) {
      const Kernel& k = ks[i];
      fprintf(out, "%12.2f %10.2f %10.2f %6u  %s\n", (k.start - span0) / 1e3,
              (k.end > k.start ? k.end - k.start : 0) / 1e3, gap[i] / 1e3, k.stream,
              names[k.name].c_str());
    }
  }
  if (out != stderr) fclose(out);
}

}  // namespace

extern "C" int InitializeInjection(void) {
  static bool done = false;  // in case the driver calls it again
  if (done) return 1;
  done = true;
  if (!ok(cuptiActivityRegisterCallbacks(requested, completed), "cuptiActivityRegisterCallbacks")) return 0;
  // CONCURRENT_KERNEL, not KERNEL: it does not serialize kernels, and gives each kernel of a
  // replayed graph its own record.
  if (!ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable")) return 0;
  atexit(report);
  return 1;
}
