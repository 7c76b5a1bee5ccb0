// How op_check.cpp runs a case on both backends: the same inputs on each, poisoned outputs, the
// comparison of what each wrote, and the op filter that decides which results are kept.
#pragma once
#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "op_check.h"

namespace lckv::op_check {

// An op name is selected by an entry of the filter that is its name, or its name's first words
// ("linears" selects "linears q").
inline bool selects(const std::string& entry, const std::string& op) {
  return op == entry || (op.size() > entry.size() && op.compare(0, entry.size(), entry) == 0 && op[entry.size()] == ' ');
}

struct Runner {
  Backend& ref;
  Backend& test;
  const std::vector<std::string>& filter;
  double tolerance;  // what a case passes with unless it sets its own
  std::mt19937_64 rng;
  std::vector<OpCheck> out;
  std::vector<std::string> groupOps;  // the ops the running group reports

  bool selected(const std::string& op) const {
    return filter.empty() || std::any_of(filter.begin(), filter.end(), [&](const std::string& e) { return selects(e, op); });
  }
  // Whether a case of `op` is kept: the filter selects it. An op its group does not list is a
  // mistake in this file (the filter would never select it), refused whether selected or not.
  bool keep(const std::string& op) const {
    if (std::find(groupOps.begin(), groupOps.end(), op) == groupOps.end())
      throw std::logic_error("op check: '" + op + "' is not among the ops of its group");
    return selected(op);
  }
  void report(OpCheck c) {
    if (keep(c.op)) out.push_back(std::move(c));
  }

  std::vector<float> random(size_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng);
    return v;
  }
  // The same f32 activation on both backends.
  std::pair<Tensor, Tensor> act(const std::vector<float>& host, int64_t rows, int64_t cols) {
    return written({ref.alloc(rows, cols), test.alloc(rows, cols)}, host, rows);
  }
  std::pair<Tensor, Tensor> outputs(int64_t rows, int64_t cols) {
    return poisoned({ref.alloc(rows, cols), test.alloc(rows, cols)});
  }
  // An activation that only feeds linear products, in each backend's linearInputType (the GPU's
  // large-batch path takes bf16): as input, the same values rounded to it; as output, poisoned.
  std::pair<Tensor, Tensor> linearInput(const std::vector<float>& host, int64_t rows, int64_t cols) {
    return written({ref.allocLinearInput(rows, cols), test.allocLinearInput(rows, cols)}, host, rows);
  }
  std::pair<Tensor, Tensor> linearOutputs(int64_t rows, int64_t cols) {
    return poisoned({ref.allocLinearInput(rows, cols), test.allocLinearInput(rows, cols)});
  }
  std::pair<Tensor, Tensor> written(std::pair<Tensor, Tensor> t, const std::vector<float>& host, int64_t rows) {
    ref.writeRows(t.first, 0, rows, host.data());
    test.writeRows(t.second, 0, rows, host.data());
    return t;
  }
  std::pair<Tensor, Tensor> poisoned(std::pair<Tensor, Tensor> t) {
    ref.poison(t.first);
    test.poison(t.second);
    return t;
  }
  std::pair<Tensor, Tensor> weight(const std::vector<float>& host, int64_t rows, int64_t cols) {
    return {ref.upload(host.data(), rows, cols), test.upload(host.data(), rows, cols)};
  }
  void compare(const std::string& op, const std::string& shape, const Tensor& a, const Tensor& b, int64_t rows) {
    if (!keep(op)) return;
    std::vector<float> x((size_t)(rows * a.cols)), y((size_t)(rows * b.cols));
    ref.download(a, 0, rows, x.data());
    test.download(b, 0, rows, y.data());
    OpCheck c{op, shape, 0.0, true, tolerance};
    double num = 0, den = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      if (std::isnan(y[i])) c.allWritten = false;
      const double d = (double)y[i] - (double)x[i];
      num += d * d;
      den += (double)x[i] * x[i];
    }
    c.relErr = c.allWritten && std::isfinite(num) ? std::sqrt(num / std::max(den, 1e-30)) : INFINITY;
    report(c);
  }
};

inline std::string dims(std::initializer_list<std::pair<const char*, int64_t>> d) {
  std::string s;
  for (auto& p : d) s += (s.empty() ? "" : " ") + std::string(p.first) + "=" + std::to_string(p.second);
  return s;
}

// The token-choice cases (op_check_sampling.cpp).
void checkSample(Runner& r, Backend& ref, Backend& test);
void checkSampleRows(Runner& r, Backend& ref, Backend& test);

}  // namespace lckv::op_check
