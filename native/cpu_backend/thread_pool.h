// A fixed pool of worker threads for parallel loops. Each index is handled by exactly one
// thread with the same code path whatever the thread count, so results do not depend on it.
#pragma once
#include <algorithm>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "../engine/errors.h"

namespace lckv {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    const int n = std::max(1, threads);
    try {
      for (int t = 1; t < n; ++t) workers_.emplace_back([this] { workerLoop(); });
    } catch (const std::system_error& e) {
      // The system refused a thread: join the ones started (a joinable std::thread destroyed
      // would end the process) and report it as the engine's error.
      stopWorkers();
      throw EngineError(kErrOutOfMemory, "could not start " + std::to_string(n) + " CPU threads (" + e.what() + "): ask for fewer with the 'threads' option");
    }
  }
  ~ThreadPool() { stopWorkers(); }
  int size() const { return (int)workers_.size() + 1; }

  // Calls fn(begin, end) on disjoint chunks covering [0, n); the calling thread takes part.
  // An exception thrown by any chunk is rethrown here, after every chunk has finished.
  void parallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t minChunk = 1) {
    const int64_t parts = std::min<int64_t>(size(), std::max<int64_t>(1, n / std::max<int64_t>(1, minChunk)));
    if (parts <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    error_ = nullptr;
    std::unique_lock<std::mutex> lk(mu_);
    job_ = &fn;
    jobN_ = n;
    jobParts_ = parts;
    nextPart_ = 1;  // part 0 is ours
    pending_ = parts - 1;
    ++generation_;
    lk.unlock();
    cv_.notify_all();
    runPart(fn, 0, n, parts);
    lk.lock();
    // Help with parts no worker has taken yet, then wait for the rest.
    while (nextPart_ < jobParts_) {
      int64_t p = nextPart_++;
      lk.unlock();
      runPart(fn, p, n, parts);
      lk.lock();
      --pending_;
    }
    done_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

 private:
  void stopWorkers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }
  void runPart(const std::function<void(int64_t, int64_t)>& fn, int64_t p, int64_t n, int64_t parts) {
    const int64_t b = n * p / parts, e = n * (p + 1) / parts;
    if (e <= b) return;
    try {
      fn(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lk(errorMu_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void workerLoop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
      cv_.wait(lk, [&] { return stop_ || (generation_ != seen && job_ && nextPart_ < jobParts_); });
      if (stop_) return;
      seen = generation_;
      while (job_ && nextPart_ < jobParts_) {
        int64_t p = nextPart_++;
        const auto* fn = job_;
        const int64_t n = jobN_, parts = jobParts_;
        lk.unlock();
        runPart(*fn, p, n, parts);
        lk.lock();
        if (--pending_ == 0) done_.notify_all();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t jobN_ = 0, jobParts_ = 0, nextPart_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::mutex errorMu_;
  std::exception_ptr error_;
};

}  // namespace lckv
