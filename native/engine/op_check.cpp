// The cases of checkBackendOps (op_check.h), one function per group of ops that run together,
// and the filter's choice of groups; op_check_runner.h runs and compares each case.
#include "op_check.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "op_check_runner.h"

namespace lckv {

namespace {

using op_check::dims;
using op_check::Runner;
using op_check::checkSample;
using op_check::checkSampleRows;
using op_check::selects;

// FNV-1a: a group's name as a number, the same on every platform (std::hash need not be).
uint64_t nameHash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// The relative error a case may show unless it says otherwise, by the dtype the test backend
// keeps weights in (that of a tensor it uploads): 1e-5 for f32; 1e-2 for bf16, since the GPU's
// large-batch GEMM rounds its input activations to bf16. f16 takes the 16-bit bound too (the GPU
// test project checks f32 and bf16 weights). The CPU backend computes in f32 whatever dtype it
// keeps weights in, so it takes the f32 bound.
double dtypeTolerance(Backend& test) {
  const float one = 1.0f;
  return test.name() == "cpu" || test.upload(&one, 1, 1).dtype == DType::F32 ? 1e-5 : 1e-2;
}

// A two-slot cache layout of 16-token pages in `type`.
KvLayout checkLayout(KvType type, int kvHeads, int hd) {
  KvLayout L;
  L.slots = 2;
  L.kvDim = kvHeads * hd;
  L.kvHeads = kvHeads;
  L.pageTokens = 16;
  L.type = type;
  return L;
}

// Whether both pools hold the same bytes where rows (rowSeq, positions) of `slot` were written:
// their K and V codes and, for fp8 and int8, their scale words; for a channel-key type, the rows
// the residual holds and each page a written row completed (its codes and scales). 0 when they
// do, else infinity.
double codeMismatch(Backend& ref, Backend& test, const Tensor& poolA, const Tensor& poolB, const KvView& kv, int slot,
                    const int32_t* positions, int rows) {
  std::vector<float> wa((size_t)poolA.numel()), wb((size_t)poolB.numel());
  ref.download(poolA, 0, poolA.rows, wa.data());
  test.download(poolB, 0, poolB.rows, wb.data());
  const uint8_t* a = reinterpret_cast<const uint8_t*>(wa.data());
  const uint8_t* b = reinterpret_cast<const uint8_t*>(wb.data());
  const KvLayout& L = kv.layout;
  if (kvTypeChannelKeys(L.type)) {
    const int P = L.pageTokens;
    for (int i = 0; i < rows; ++i) {
      const int seq = kv.rowSeq[i], p = positions[i];
      if (kv.inResidual(seq, p))
        for (int v = 0; v < 2; ++v) {
          const int64_t at = L.residualOffset(kv.residuals + (int64_t)seq * L.residualParts(), slot, v, p % P);
          if (std::memcmp(a + at, b + at, (size_t)L.kvDim * 2)) return INFINITY;
        }
      if (p % P == P - 1) {
        const int64_t at = L.codeOffset(kv.pageAt(seq, p), slot, 0, 0);
        if (std::memcmp(a + at, b + at, (size_t)(2 * P * L.rowBytes() + L.scaleBytes()))) return INFINITY;
      }
    }
    return 0.0;
  }
  for (int i = 0; i < rows; ++i) {
    const int page = kv.pageAt(kv.rowSeq[i], positions[i]), off = positions[i] % L.pageTokens;
    for (int v = 0; v < 2; ++v) {
      const int64_t at = L.codeOffset(page, slot, v, off);
      if (std::memcmp(a + at, b + at, (size_t)L.rowBytes())) return INFINITY;
    }
    const int64_t sc = L.scaleOffset(page, slot, off, 0);
    if (kvTypeScaled(L.type) && std::memcmp(a + sc, b + sc, 4 * (size_t)L.kvHeads)) return INFINITY;
  }
  return 0.0;
}

// linear: decode shapes (GEMV) and prefill shapes (the large-batch path), with and without bias.
void checkLinear(Runner& r, Backend& ref, Backend& test) {
  for (auto [n, I, O, bias] : std::vector<std::tuple<int, int, int, bool>>{
           {1, 64, 96, false}, {1, 64, 301, false}, {1, 2048, 5632, false}, {3, 2048, 256, true}, {8, 512, 1000, false},
           {9, 256, 384, true}, {64, 2048, 2048, false}, {33, 100, 36, true},
           // rows split over 4 and 8 warps (aligned and not), at 1 and 16 input rows
           {1, 5632, 2048, true}, {16, 5632, 300, false}, {2, 8200, 40, false}, {4, 4099, 33, true}}) {
    auto x = r.act(r.random((size_t)n * I), n, I);
    auto w = r.weight(r.random((size_t)O * I, 0.05f), O, I);
    auto b = r.weight(r.random((size_t)O), 1, O);
    auto o = r.outputs(n, O);
    ref.linear(x.first, n, w.first, bias ? &b.first : nullptr, o.first);
    test.linear(x.second, n, w.second, bias ? &b.second : nullptr, o.second);
    r.compare("linear", dims({{"n", n}, {"in", I}, {"out", O}, {"bias", bias}}), o.first, o.second, n);
  }
}

// norms
// E % 4 != 0 (scalar loads), several chunks per thread, and rows past the register path.
void checkNorm(Runner& r, Backend& ref, Backend& test) {
  for (auto [n, E] : std::vector<std::pair<int, int>>{{1, 64}, {5, 2048}, {33, 100}, {3, 99}, {2, 4098}, {2, 8192}, {1, 16384}, {2, 20000},
                                                                       // more than 16 rows (a bf16 output on the GPU): scalar loads, the loop
                                                                       {33, 99}, {17, 20000}}) {
    for (NormKind kind : {NormKind::Rms, NormKind::Layer}) {
      auto x = r.act(r.random((size_t)n * E, 2.0f), n, E);
      auto w = r.weight(r.random((size_t)E), 1, E);
      auto b = r.weight(r.random((size_t)E), 1, E);
      auto o = r.linearOutputs(n, E);  // a norm's output feeds the linear products
      const bool layer = kind == NormKind::Layer;
      ref.norm(kind, x.first, n, w.first, layer ? &b.first : nullptr, 1e-5f, o.first);
      test.norm(kind, x.second, n, w.second, layer ? &b.second : nullptr, 1e-5f, o.second);
      r.compare(layer ? "layer_norm" : "rms_norm", dims({{"n", n}, {"E", E}}), o.first, o.second, n);
    }
  }
}

// the residual add fused into the norm: both the updated residual and the normalised output
void checkAddNorm(Runner& r, Backend& ref, Backend& test) {
  for (auto [n, E] : std::vector<std::pair<int, int>>{{1, 2048}, {17, 96}, {3, 99}, {2, 8192}, {2, 20000}, {17, 4098}, {17, 20000}}) {
    for (NormKind kind : {NormKind::Rms, NormKind::Layer}) {
      auto h = r.act(r.random((size_t)n * E, 2.0f), n, E);
      auto d = r.act(r.random((size_t)n * E), n, E);
      auto w = r.weight(r.random((size_t)E), 1, E);
      auto b = r.weight(r.random((size_t)E), 1, E);
      auto o = r.linearOutputs(n, E);
      const bool layer = kind == NormKind::Layer;
      ref.addNorm(kind, h.first, d.first, n, w.first, layer ? &b.first : nullptr, 1e-5f, o.first);
      test.addNorm(kind, h.second, d.second, n, w.second, layer ? &b.second : nullptr, 1e-5f, o.second);
      const std::string name = layer ? "add_layer_norm" : "add_rms_norm";
      r.compare(name, dims({{"n", n}, {"E", E}}), o.first, o.second, n);
      r.compare(name + " residual", dims({{"n", n}, {"E", E}}), h.first, h.second, n);
    }
  }
}

// rope at positions up to 4095, several head sizes
void checkRope(Runner& r, Backend& ref, Backend& test) {
  for (auto [n, heads, hd] : std::vector<std::tuple<int, int, int>>{{1, 4, 16}, {7, 32, 64}, {3, 2, 128}}) {
    std::vector<float> inv((size_t)hd / 2);
    for (int j = 0; j < hd / 2; ++j) inv[(size_t)j] = (float)(1.0 / std::pow(10000.0, 2.0 * j / hd));
    std::vector<int32_t> pos((size_t)n);
    for (auto& p : pos) p = (int32_t)(r.rng() % 4096);
    auto x = r.act(r.random((size_t)n * heads * hd), n, (int64_t)heads * hd);
    ref.rope(x.first, n, heads, hd, pos.data(), inv, 1.0f);
    test.rope(x.second, n, heads, hd, pos.data(), inv, 1.0f);
    r.compare("rope", dims({{"n", n}, {"heads", heads}, {"headDim", hd}}), x.first, x.second, n);
  }
}

// fused products of one input: Q, K and V in one GEMV launch (unequal heights, biases on some),
// and the SwiGLU MLP's gate and up with the activation applied as they are written.
void checkFusedLinears(Runner& r, Backend& ref, Backend& test) {
  for (auto [n, I, O0, O1] : std::vector<std::tuple<int, int, int, int>>{
           {1, 2048, 2048, 256}, {5, 64, 96, 32}, {16, 512, 300, 8}, {40, 128, 64, 64}, {16, 2048, 512, 64}, {3, 4100, 70, 6},
           {64, 2048, 2048, 256}, {24, 96, 70, 6}}) {
    // ({24, 96, 70, 6}: above 16 rows, a SwiGLU width that is no multiple of 4, the GPU's one-column path.)
    auto x = r.linearInput(r.random((size_t)n * I), n, I);  // as a norm writes it
    auto wq = r.weight(r.random((size_t)O0 * I, 0.05f), O0, I);
    auto wk = r.weight(r.random((size_t)O1 * I, 0.05f), O1, I);
    auto wv = r.weight(r.random((size_t)O1 * I, 0.05f), O1, I);
    auto bk = r.weight(r.random((size_t)O1), 1, O1);
    auto oq = r.outputs(n, O0), ok = r.outputs(n, O1), ov = r.outputs(n, O1);
    const Backend::LinearTarget ta[3] = {{&wq.first, nullptr, &oq.first}, {&wk.first, &bk.first, &ok.first}, {&wv.first, nullptr, &ov.first}};
    const Backend::LinearTarget tb[3] = {{&wq.second, nullptr, &oq.second}, {&wk.second, &bk.second, &ok.second}, {&wv.second, nullptr, &ov.second}};
    ref.linears(x.first, n, ta, 3);
    test.linears(x.second, n, tb, 3);
    const std::string shape = dims({{"n", n}, {"in", I}, {"out", O0}, {"out2", O1}});
    r.compare("linears q", shape, oq.first, oq.second, n);
    r.compare("linears k", shape, ok.first, ok.second, n);
    r.compare("linears v", shape, ov.first, ov.second, n);
    // Q, K and V packed into one allocation, as a model's layers are (packWeights): the GPU's
    // large-batch path runs one product and splits it into the three outputs.
    Tensor pa[3] = {wq.first, wk.first, wv.first}, pb[3] = {wq.second, wk.second, wv.second};
    ref.packWeights(pa, 3);
    test.packWeights(pb, 3);
    auto pq = r.outputs(n, O0), pk = r.outputs(n, O1), pv = r.outputs(n, O1);
    const Backend::LinearTarget pta[3] = {{&pa[0], nullptr, &pq.first}, {&pa[1], &bk.first, &pk.first}, {&pa[2], nullptr, &pv.first}};
    const Backend::LinearTarget ptb[3] = {{&pb[0], nullptr, &pq.second}, {&pb[1], &bk.second, &pk.second}, {&pb[2], nullptr, &pv.second}};
    ref.linears(x.first, n, pta, 3);
    test.linears(x.second, n, ptb, 3);
    r.compare("linears packed", shape + " q", pq.first, pq.second, n);
    r.compare("linears packed", shape + " k", pk.first, pk.second, n);
    r.compare("linears packed", shape + " v", pv.first, pv.second, n);

    auto wg = r.weight(r.random((size_t)O0 * I, 0.05f), O0, I);
    auto bu = r.weight(r.random((size_t)O0), 1, O0);
    auto o = r.linearOutputs(n, O0);  // the down product's input
    ref.linearSwiglu(x.first, n, wg.first, nullptr, wq.first, &bu.first, o.first);
    test.linearSwiglu(x.second, n, wg.second, nullptr, wq.second, &bu.second, o.second);
    r.compare("linear_swiglu", dims({{"n", n}, {"in", I}, {"out", O0}}), o.first, o.second, n);
    // Gate and up packed, as a model's layers are: the large-batch path runs one product of
    // twice the height, and the SwiGLU reads its halves; with a bias on the gate this time.
    Tensor ga[2] = {wg.first, wq.first}, gb[2] = {wg.second, wq.second};
    ref.packWeights(ga, 2);
    test.packWeights(gb, 2);
    auto po = r.linearOutputs(n, O0);
    ref.linearSwiglu(x.first, n, ga[0], &bu.first, ga[1], nullptr, po.first);
    test.linearSwiglu(x.second, n, gb[0], &bu.second, gb[1], nullptr, po.second);
    r.compare("linear_swiglu packed", dims({{"n", n}, {"in", I}, {"out", O0}}), po.first, po.second, n);
  }
}

// RoPE of q with K rotated into the cache and V beside it (a layer that owns K/V), for rows of
// two sequences at scattered positions; and q alone (a layer that reads another's K/V). One
// frequency array, refilled for each head size at the same address: a backend that keeps
// frequencies by address must notice that they changed.
void checkRopeKvWrite(Runner& r, Backend& ref, Backend& test) {
  std::vector<float> inv;
  inv.reserve(64);
  for (int t = 0; t < kKvTypeCount; ++t)
  for (auto [n, heads, kvHeads, hd] : std::vector<std::tuple<int, int, int, int>>{{1, 32, 4, 64}, {6, 4, 2, 16}, {3, 2, 2, 128}}) {
    const KvType type = (KvType)t;
    inv.resize((size_t)hd / 2);  // within the reserved capacity up to head size 128: the same address
    for (int j = 0; j < hd / 2; ++j) inv[(size_t)j] = (float)(1.0 / std::pow(10000.0, 2.0 * j / hd));
    const KvLayout L = checkLayout(type, kvHeads, hd);
    // A channel-key type's sequences each have a residual too: its parts follow the table pages.
    const int R = L.residualParts();
    const int pagesPerSeq = 8, seqs = 2, pages = (pagesPerSeq + R) * seqs;
    std::vector<int32_t> order((size_t)pages);
    for (int i = 0; i < pages; ++i) order[(size_t)i] = i;
    std::shuffle(order.begin(), order.end(), r.rng);
    const std::vector<int32_t> tables(order.begin(), order.begin() + pagesPerSeq * seqs), residuals(order.begin() + pagesPerSeq * seqs, order.end());
    const std::vector<int32_t> residualPage((size_t)seqs, pagesPerSeq - 1);
    // Distinct positions (a later row would overwrite an earlier one's K/V); for a channel-key
    // type, in the residual's page, none its last (which would quantize a page of poison).
    std::vector<int32_t> pos((size_t)n), seq((size_t)n);
    for (int i = 0; i < n; ++i) {
      seq[(size_t)i] = i % seqs;
      pos[(size_t)i] = R > 0 ? (pagesPerSeq - 1) * L.pageTokens + i / seqs * 5 + (int)(r.rng() % 4)
                             : (int32_t)(i / seqs * 37 + (int)(r.rng() % 16)) % (pagesPerSeq * L.pageTokens);
    }
    Tensor poolA = ref.alloc(pages, L.pageBytes() / 4), poolB = test.alloc(pages, L.pageBytes() / 4);
    ref.poison(poolA);
    test.poison(poolB);
    KvView va{&poolA, L, tables.data(), pagesPerSeq, seqs, seq.data(), residuals.data(), residualPage.data()};
    KvView vb{&poolB, L, tables.data(), pagesPerSeq, seqs, seq.data(), residuals.data(), residualPage.data()};
    auto q = r.act(r.random((size_t)n * heads * hd), n, (int64_t)heads * hd);
    auto q2 = r.act(r.random((size_t)n * heads * hd), n, (int64_t)heads * hd);
    auto k = r.act(r.random((size_t)n * L.kvDim), n, L.kvDim);
    auto v = r.act(r.random((size_t)n * L.kvDim), n, L.kvDim);
    ref.ropeKvWrite(q.first, heads, &k.first, &v.first, kvHeads, hd, n, pos.data(), inv, 1.0f, &va, 1);
    test.ropeKvWrite(q.second, heads, &k.second, &v.second, kvHeads, hd, n, pos.data(), inv, 1.0f, &vb, 1);
    ref.ropeKvWrite(q2.first, heads, nullptr, nullptr, kvHeads, hd, n, pos.data(), inv, 1.0f, nullptr, 0);
    test.ropeKvWrite(q2.second, heads, nullptr, nullptr, kvHeads, hd, n, pos.data(), inv, 1.0f, nullptr, 0);
    const std::string shape = dims({{"n", n}, {"heads", heads}, {"kvHeads", kvHeads}, {"headDim", hd}}) + " kv=" + kvTypeName(type);
    if (type == KvType::F32) {  // q does not depend on the cache's type
      r.compare("rope_kv_write q", shape, q.first, q.second, n);
      r.compare("rope_kv_write q alone", shape, q2.first, q2.second, n);
    }
    // The cache rows each wrote: K (rotated) then V, read back position by position. The two
    // backends' rotations agree to an ulp or two, not bit for bit, so a compact type's code may
    // round the other way now and then: one step of one code, a relative error of a few 1e-3.
    std::vector<float> ka, kb, all_a, all_b;
    for (int i = 0; i < n; ++i) {
      ref.kvRead(va, seq[(size_t)i], 1, pos[(size_t)i], 1, ka);
      test.kvRead(vb, seq[(size_t)i], 1, pos[(size_t)i], 1, kb);
      all_a.insert(all_a.end(), ka.begin(), ka.end());
      all_b.insert(all_b.end(), kb.begin(), kb.end());
    }
    auto written = r.act(all_a, 2 * n, L.kvDim);
    test.writeRows(written.second, 0, 2 * n, all_b.data());
    const double saved = r.tolerance;
    if (type != KvType::F32) r.tolerance = std::max(saved, type == KvType::INT4 ? 5e-2 : 1e-2);
    r.compare("rope_kv_write cache", shape, written.first, written.second, 2 * n);
    r.tolerance = saved;
  }
}

// A channel-key type's page written whole by ropeKvWrite (a prefill piece of a page, the fused
// path of a layer that owns K/V): its rows go to the residual in bf16, and the last one quantizes
// the page from it. Read back from the residual and then from the page's codes. The rotations
// agree to an ulp or two, so a bf16 row or a code may round the other way now and then (as in
// rope_kv_write cache); kv_write codes (checkAttention) compares the bytes of unrotated pages.
void checkRopeKvWritePage(Runner& r, Backend& ref, Backend& test) {
  std::vector<float> inv;
  for (int t = 0; t < kKvTypeCount; ++t) {
    const KvType type = (KvType)t;
    if (!kvTypeChannelKeys(type)) continue;
    for (auto [heads, kvHeads, hd] : std::vector<std::tuple<int, int, int>>{{4, 2, 16}, {32, 4, 64}, {8, 1, 128}}) {
      inv.resize((size_t)hd / 2);
      for (int j = 0; j < hd / 2; ++j) inv[(size_t)j] = (float)(1.0 / std::pow(10000.0, 2.0 * j / hd));
      const KvLayout L = checkLayout(type, kvHeads, hd);
      const int P = L.pageTokens, R = L.residualParts(), pagesPerSeq = 3, pages = pagesPerSeq + R;
      std::vector<int32_t> order((size_t)pages);
      for (int i = 0; i < pages; ++i) order[(size_t)i] = i;
      std::shuffle(order.begin(), order.end(), r.rng);
      const std::vector<int32_t> table(order.begin(), order.begin() + pagesPerSeq), residual(order.begin() + pagesPerSeq, order.end());
      std::vector<int32_t> residualPage(1, 1), seq((size_t)P, 0), pos((size_t)P);
      for (int i = 0; i < P; ++i) pos[(size_t)i] = P + i;  // page 1, whole
      Tensor poolA = ref.alloc(pages, L.pageBytes() / 4), poolB = test.alloc(pages, L.pageBytes() / 4);
      ref.poison(poolA);
      test.poison(poolB);
      KvView va{&poolA, L, table.data(), pagesPerSeq, 1, seq.data(), residual.data(), residualPage.data()};
      KvView vb{&poolB, L, table.data(), pagesPerSeq, 1, seq.data(), residual.data(), residualPage.data()};
      auto q = r.act(r.random((size_t)P * heads * hd), P, (int64_t)heads * hd);
      auto k = r.act(r.random((size_t)P * L.kvDim), P, L.kvDim);
      auto v = r.act(r.random((size_t)P * L.kvDim), P, L.kvDim);
      ref.ropeKvWrite(q.first, heads, &k.first, &v.first, kvHeads, hd, P, pos.data(), inv, 1.0f, &va, 1);
      test.ropeKvWrite(q.second, heads, &k.second, &v.second, kvHeads, hd, P, pos.data(), inv, 1.0f, &vb, 1);
      const std::string shape = dims({{"rows", P}, {"heads", heads}, {"kvHeads", kvHeads}, {"headDim", hd}}) + " kv=" + kvTypeName(type);
      const double saved = r.tolerance;
      for (const bool fromCodes : {false, true}) {
        residualPage[0] = fromCodes ? -1 : 1;  // kvRead takes the residual's page from the residual
        std::vector<float> a, b;
        ref.kvRead(va, 0, 1, P, P, a);
        test.kvRead(vb, 0, 1, P, P, b);
        auto read = r.act(a, 2 * P, L.kvDim);
        test.writeRows(read.second, 0, 2 * P, b.data());
        r.tolerance = std::max(saved, fromCodes ? 5e-2 : 1e-2);
        r.compare(fromCodes ? "rope_kv_write page" : "rope_kv_write residual", shape, read.first, read.second, 2 * P);
      }
      r.tolerance = saved;
    }
  }
}

// attention over paged K/V: decode (one query per sequence, several sequences of different
// lengths in one call) and prefill (many queries of one sequence); causal/strict, windows,
// GQA. Pages are handed out in a shuffled order, so a kernel that assumes contiguous pages
// fails. Sequence s holds ctx - 7 s tokens (at least one) unless `lengths` lists them.
// The decode cases cover the GPU's split-K kernel: 1 to 32 query heads per K/V head (8 is
// TinyLlama's; 12 and 32 take several blocks per group), head sizes that are not multiples of
// 32 (or of 4), contexts long enough to be cut into many chunks, a row with no visible key
// (strict, position 0) beside long rows, and rows of 1 and 3000 keys in one call. Mixed calls
// (`queries`: query rows per sequence, at its last positions) give some sequences a run of rows
// beside others' single rows, as a mixed decode step does: the GPU takes each run of 16 or more
// in its prefill kernel and the rows between in its decode kernel (an int4 cache's runs end at
// their sequence's page, and all its rows take its two decode launches).
void checkAttention(Runner& r, Backend& ref, Backend& test) {
  struct AttnCase {
    int ctx, n, heads, kvHeads, hd;
    bool strict;
    int window, seqs;
    std::vector<int> lengths = {};
    std::vector<int> queries = {};
    // Key channels d of a head with d % 8 == 3 times 2^16 and d % 8 == 5 times 2^-20: per-channel
    // int4 scales past 2^12 (codes times scales beyond f16's range: the tensor-core kernel's
    // guard) and down among f16's subnormals. The queries are zero in the large channels, so the
    // scores stay of order one and the output, V random, checks the guarded pages' scores to the
    // case's tolerance.
    bool wideKeys = false;
  };
  const std::vector<AttnCase> cases{{1, 1, 4, 4, 16, true, 0, 1}, {1, 1, 4, 2, 16, false, 0, 1},
                                          {300, 1, 32, 4, 64, false, 0, 1}, {4096, 1, 32, 4, 64, true, 0, 1},
                                          {4096, 1, 8, 8, 128, false, 512, 1}, {33, 33, 4, 2, 32, true, 0, 1},
                                          {200, 64, 32, 4, 64, false, 16, 1}, {96, 96, 2, 1, 32, true, 4, 1},
                                          {700, 1, 8, 2, 64, false, 0, 5}, {40, 1, 4, 4, 128, true, 0, 16},
                                          {300, 48, 8, 2, 128, false, 0, 1}, {64, 20, 4, 4, 16, true, 0, 1},
                                          {2048, 512, 32, 4, 64, true, 0, 1},
                                          // prefill: head sizes padded inside the tensor-core kernel (50: scalar
                                          // loads; 80: padded to 128), a query count that is not a multiple of 64
                                          {500, 200, 12, 2, 50, false, 0, 1}, {1000, 130, 8, 2, 80, true, 300, 1},
                                          // decode: GQA 8 (TinyLlama), one row and 16 rows of 2048 - 7 s keys
                                          {2048, 1, 32, 4, 64, false, 0, 1}, {2048, 1, 32, 4, 64, true, 0, 16},
                                          // MHA (G = 1), G = 4 with head size 128
                                          {1500, 1, 6, 6, 64, false, 0, 3}, {2048, 1, 16, 4, 128, false, 0, 6},
                                          // sliding windows shorter and longer than some rows
                                          {3000, 1, 32, 4, 64, false, 1000, 8}, {600, 1, 16, 2, 64, true, 100, 4},
                                          // strict: rows at position 0 beside long rows
                                          {2500, 1, 32, 4, 64, true, 0, 4, {1, 2500, 1, 700}},
                                          // very different lengths in one call
                                          {3000, 1, 32, 4, 64, false, 0, 4, {1, 3000, 17, 2999}},
                                          // G = 12 and 32 (several blocks per group), head sizes 80, 100, 50
                                          {1200, 1, 24, 2, 80, false, 0, 3}, {1200, 1, 32, 1, 64, true, 0, 2},
                                          {900, 1, 8, 2, 100, false, 0, 3}, {500, 1, 12, 2, 50, false, 0, 2},
                                          // a few queries of one sequence (below the prefill kernel's 16)
                                          {700, 8, 32, 4, 64, true, 0, 1},
                                          // head size 32 (the default model's), G = 2; and 8 query rows of
                                          // one sequence at G = 8 beside a window (one tile each)
                                          {900, 1, 8, 4, 32, false, 0, 3}, {130, 8, 32, 4, 64, false, 40, 1},
                                          // more than 16 decode rows (the GPU writes them in bf16 for a
                                          // bf16 model): the tensor-core kernel with its split-K merge, and
                                          // the CUDA-core kernel at head size 80
                                          {700, 1, 8, 2, 64, false, 0, 20}, {300, 1, 8, 2, 80, true, 0, 24},
                                          // mixed: runs of one sequence's rows (200, 40, 64, 17: prefill
                                          // parts; 5, 15: decode) between single rows, first and last
                                          {1200, 1, 8, 2, 64, false, 0, 6, {}, {1, 1, 200, 1, 5, 40}},
                                          {900, 1, 8, 4, 32, true, 100, 4, {}, {64, 1, 15, 17}},
                                          {400, 1, 4, 2, 16, true, 0, 3, {}, {2, 30, 1}},
                                          // a 512-row chunk beside 16 decode rows (the GPU's chunk in a
                                          // mixed step), head size 128
                                          {700, 1, 8, 2, 128, false, 0, 17, {}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 512}},
                                          // decode at G = 8 with windows that start inside a page, beside rows
                                          // whose last visible key ends a page (lengths 2000, 1600, 48; strict:
                                          // 1297, 17) or lies inside one: an int4 cache's complete pages then
                                          // start and end anywhere in a page's 16 keys (head sizes 128 and 32),
                                          // and a window of 10 leaves some rows no complete page at all
                                          {2000, 1, 16, 2, 128, false, 333, 5, {2000, 1999, 1600, 1041, 48}},
                                          {1300, 1, 16, 2, 32, true, 257, 5, {1300, 1297, 1024, 17, 700}},
                                          {500, 1, 8, 1, 64, false, 10, 4, {500, 497, 300, 31}},
                                          // keys across f16's range (wideKeys), head sizes 64 and 32
                                          {600, 1, 8, 2, 64, false, 0, 3, {600, 593, 40}, {}, true},
                                          {300, 1, 16, 2, 32, true, 100, 2, {300, 257}, {}, true}};
  // Every case in f32; in the compact types, a decode and a prefill case of each head size
  // class they take (multiples of 8), windows, strict rows, GQA 1 to 32 and several sequences.
  // Decode at head sizes 32, 64 and 128 runs on the tensor-core kernel (int4: its complete
  // pages), other sizes (16 and 80 here) on the CUDA-core kernel.
  const std::vector<int> compactCases = {1, 3, 4, 5, 6, 7, 8, 9, 11, 16, 18, 19, 20, 21, 22, 23, 24, 27, 28, 29, 30, 31,
                                         32, 33, 34, 35, 36, 37, 38, 39, 40};
  for (int t = 0; t < kKvTypeCount; ++t)
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const KvType type = (KvType)t;
    if (type != KvType::F32 && std::find(compactCases.begin(), compactCases.end(), (int)ci) == compactCases.end()) continue;
    AttnCase c = cases[ci];
    if (!c.queries.empty()) c.seqs = (int)c.queries.size();
    if (!c.lengths.empty()) {
      c.seqs = (int)c.lengths.size();
      c.ctx = *std::max_element(c.lengths.begin(), c.lengths.end());
    }
    const KvLayout L = checkLayout(type, c.kvHeads, c.hd);
    const int P = L.pageTokens, R = L.residualParts();
    const int pagesPerSeq = (c.ctx + P - 1) / P;
    const int pages = (pagesPerSeq + R) * c.seqs + 3;
    std::vector<int32_t> order((size_t)pages);
    for (int i = 0; i < pages; ++i) order[(size_t)i] = i;
    std::shuffle(order.begin(), order.end(), r.rng);
    std::vector<int32_t> tables((size_t)(pagesPerSeq * c.seqs));
    std::copy(order.begin(), order.begin() + (int64_t)tables.size(), tables.begin());
    // A channel-key type's residuals (after the table pages), each holding its sequence's last page.
    const std::vector<int32_t> residuals(order.begin() + (int64_t)tables.size(), order.begin() + (int64_t)tables.size() + R * c.seqs);
    std::vector<int32_t> residualPage((size_t)c.seqs, -1);
    Tensor poolA = ref.alloc(pages, L.pageBytes() / 4), poolB = test.alloc(pages, L.pageBytes() / 4);
    ref.poison(poolA);
    test.poison(poolB);
    // One query per sequence (decode) or the last n positions of sequence 0 (prefill).
    std::vector<int32_t> len((size_t)c.seqs);
    for (int q = 0; q < c.seqs; ++q) len[(size_t)q] = c.lengths.empty() ? std::max(1, c.ctx - 7 * q) : c.lengths[(size_t)q];
    std::vector<int32_t> wpos, wseq;
    for (int q = 0; q < c.seqs; ++q)
      for (int i = 0; i < len[(size_t)q]; ++i) {
        wpos.push_back(i);
        wseq.push_back(q);
      }
    const int rows = (int)wpos.size();
    KvView va{&poolA, L, tables.data(), pagesPerSeq, c.seqs, wseq.data(), residuals.data(), residualPage.data()};
    KvView vb{&poolB, L, tables.data(), pagesPerSeq, c.seqs, wseq.data(), residuals.data(), residualPage.data()};
    std::vector<float> kHost = r.random((size_t)rows * L.kvDim), vHost = r.random((size_t)rows * L.kvDim);
    auto wideChannel = [&](size_t i) { return (int)(i % (size_t)c.hd) % 8; };  // a K or Q element's channel class
    if (c.wideKeys)
      for (size_t i = 0; i < kHost.size(); ++i)
        kHost[i] *= wideChannel(i) == 3 ? 65536.0f : wideChannel(i) == 5 ? std::ldexp(1.0f, -20) : 1.0f;
    auto k = r.act(kHost, rows, L.kvDim);
    auto v = r.act(vHost, rows, L.kvDim);
    if (R == 0) {
      ref.kvWrite(va, 1, k.first, v.first, rows, wpos.data());
      test.kvWrite(vb, 1, k.second, v.second, rows, wpos.data());
    } else {
      // A page of a sequence at a time, through its residual (each full page is quantized from it).
      for (int first = 0; first < rows;) {
        int end = first + 1;
        while (end < rows && wseq[(size_t)end] == wseq[(size_t)first] && wpos[(size_t)end] / P == wpos[(size_t)first] / P) ++end;
        residualPage[(size_t)wseq[(size_t)first]] = wpos[(size_t)first] / P;
        va.rowSeq = vb.rowSeq = wseq.data() + first;
        ref.kvWrite(va, 1, tensorRows(k.first, first, end - first), tensorRows(v.first, first, end - first), end - first, wpos.data() + first);
        test.kvWrite(vb, 1, tensorRows(k.second, first, end - first), tensorRows(v.second, first, end - first), end - first, wpos.data() + first);
        first = end;
      }
      va.rowSeq = vb.rowSeq = wseq.data();
    }
    const std::string kvName = std::string(" kv=") + kvTypeName(type);
    // The same values quantize to the same bytes on every backend (exact: a mismatch reports an
    // infinite error, which no tolerance passes).
    r.report(OpCheck{"kv_write codes", dims({{"rows", rows}, {"kvHeads", c.kvHeads}, {"headDim", c.hd}}) + kvName,
                     codeMismatch(ref, test, poolA, poolB, va, 1, wpos.data(), rows), true, 1e-12});
    std::vector<int32_t> qpos, qseq;
    // The first of a sequence's last `count` positions that a query takes: a channel-key type's
    // queries of one sequence lie in the residual's page (kv_format.h), so its runs are cut there.
    auto firstQuery = [&](int q, int count) {
      const int from = len[(size_t)q] - count;
      return R > 0 ? std::max(from, (len[(size_t)q] - 1) / P * P) : from;
    };
    if (!c.queries.empty()) {
      for (int q = 0; q < c.seqs; ++q)
        for (int i = firstQuery(q, c.queries[(size_t)q]); i < len[(size_t)q]; ++i) {
          qpos.push_back(i);
          qseq.push_back(q);
        }
    } else if (c.seqs == 1) {
      for (int i = firstQuery(0, c.n); i < c.ctx; ++i) {
        qpos.push_back(i);
        qseq.push_back(0);
      }
    } else {
      for (int q = 0; q < c.seqs; ++q) {
        qpos.push_back(len[(size_t)q] - 1);
        qseq.push_back(q);
      }
    }
    const int nq = (int)qpos.size();
    va.rowSeq = vb.rowSeq = qseq.data();
    std::vector<float> qHost = r.random((size_t)nq * c.heads * c.hd);
    if (c.wideKeys)
      for (size_t i = 0; i < qHost.size(); ++i)
        if (wideChannel(i) == 3) qHost[i] = 0.0f;
    auto qa = r.act(qHost, nq, (int64_t)c.heads * c.hd);
    auto o = r.outputs(nq, (int64_t)c.heads * c.hd);
    AttentionSpec sp{c.heads, c.kvHeads, c.hd, c.strict, c.window, 1.0f / std::sqrt((float)c.hd)};
    ref.attention(qa.first, nq, qpos.data(), va, 1, sp, o.first);
    test.attention(qa.second, nq, qpos.data(), vb, 1, sp, o.second);
    const std::string shape = dims({{"ctx", c.ctx}, {"queries", nq}, {"seqs", c.seqs}, {"heads", c.heads},
                                    {"kvHeads", c.kvHeads}, {"headDim", c.hd}, {"strict", c.strict}, {"window", c.window}}) +
                              (c.wideKeys ? " wideKeys" : "") + kvName;
    r.compare("attention", shape, o.first, o.second, nq);
    if (test.linearInputType(nq) != DType::F32) {
      // Rows that feed the output projection's bf16 product are written in bf16 (the engine's
      // large-batch path): the same result, rounded once.
      auto ob = r.linearOutputs(nq, (int64_t)c.heads * c.hd);
      test.attention(qa.second, nq, qpos.data(), vb, 1, sp, ob.second);
      const double saved = r.tolerance;
      r.tolerance = std::max(saved, 1e-2);
      r.compare("attention", shape + " out=" + dtypeName(ob.second.dtype), o.first, ob.second, nq);
      r.tolerance = saved;
    }
    // kvRead sees what kvWrite wrote; kvZero clears exactly its range (a channel-key type's in
    // the residual's page, whose rows kvRead reads from the residual, the others from codes,
    // across a page boundary where the sequence is long enough), and the rows after it stay.
    const int zeroFrom = R > 0 ? (len[0] - 1) / P * P : 3;
    const int zeroN = std::max(0, std::min(R > 0 ? 5 : P + 5, len[0] - zeroFrom));
    const int n0 = R > 0 ? len[0] : std::min(len[0], zeroFrom + zeroN + 4);
    std::vector<float> ka, kb;
    ref.kvZero(va, 0, 1, zeroFrom, zeroN);
    test.kvZero(vb, 0, 1, zeroFrom, zeroN);
    ref.kvRead(va, 0, 1, 0, n0, ka);
    test.kvRead(vb, 0, 1, 0, n0, kb);
    double num = 0, den = 0;
    for (size_t i = 0; i < ka.size(); ++i) {
      num += ((double)kb[i] - ka[i]) * ((double)kb[i] - ka[i]);
      den += (double)ka[i] * ka[i];
    }
    r.report(OpCheck{"kv_write+zero+read", dims({{"tokens", n0}, {"kvDim", L.kvDim}}) + kvName,
                     std::isfinite(num) ? std::sqrt(num / std::max(den, 1e-30)) : INFINITY, ka.size() == kb.size(), r.tolerance});
  }
}

// kv_write at the edges of a scaled type's range: heads whose largest |value| lies past what a
// finite f16 scale covers (up to 3e38 and infinity) beside ordinary heads, in every type. Both
// backends must write the same bytes, and reading back must give finite values of each input's
// sign: saturated at codeMax x 65504 where the input was larger, within the type's rounding of
// the input elsewhere. The error reported is the read-back's worst relative error against the
// input clamped to what the type holds (infinite on a NaN, an inf or a sign flip).
void checkKvRange(Runner& r, Backend& ref, Backend& test) {
  const int kvHeads = 2, hd = 64, magnitudeCount = 6;
  const float magnitudes[magnitudeCount] = {1.0f, 1e6f, 1e9f, 3e38f, INFINITY, 1e-30f};
  for (int t = 0; t < kKvTypeCount; ++t) {
    const KvType type = (KvType)t;
    const KvLayout L = checkLayout(type, kvHeads, hd);
    // A channel-key type scales a key channel over a page: each magnitude fills a page of its own
    // (16 rows), read back from the page's codes; the other types take a row each.
    const int R = L.residualParts(), perMagnitude = R > 0 ? L.pageTokens : 1;
    const int rows = magnitudeCount * perMagnitude, pages = R > 0 ? magnitudeCount : 1;
    Tensor poolA = ref.alloc(pages + R, L.pageBytes() / 4), poolB = test.alloc(pages + R, L.pageBytes() / 4);
    ref.poison(poolA);
    test.poison(poolB);
    // Row i: head 0 at magnitudes[i / perMagnitude], head 1 ordinary (it must not be disturbed by head 0).
    std::vector<float> k = r.random((size_t)rows * L.kvDim), v = r.random((size_t)rows * L.kvDim);
    for (int i = 0; i < rows; ++i)
      for (int d = 0; d < hd; ++d) {
        k[(size_t)i * L.kvDim + d] *= magnitudes[i / perMagnitude];
        v[(size_t)i * L.kvDim + d] *= magnitudes[i / perMagnitude];
      }
    std::vector<int32_t> table((size_t)pages), residual((size_t)R), residualPage(1, -1);
    for (int p = 0; p < pages; ++p) table[(size_t)p] = p;
    for (int p = 0; p < R; ++p) residual[(size_t)p] = pages + p;
    std::vector<int32_t> pos(rows), seqs(rows, 0);
    for (int i = 0; i < rows; ++i) pos[(size_t)i] = i;
    KvView va{&poolA, L, table.data(), pages, 1, seqs.data(), residual.data(), residualPage.data()};
    KvView vb{&poolB, L, table.data(), pages, 1, seqs.data(), residual.data(), residualPage.data()};
    auto ka = r.act(k, rows, L.kvDim), vv = r.act(v, rows, L.kvDim);
    for (int first = 0; first < rows; first += rows / pages) {  // a page at a time for a channel-key type
      const int n = rows / pages;
      residualPage[0] = first / L.pageTokens;
      ref.kvWrite(va, 1, tensorRows(ka.first, first, n), tensorRows(vv.first, first, n), n, pos.data() + first);
      test.kvWrite(vb, 1, tensorRows(ka.second, first, n), tensorRows(vv.second, first, n), n, pos.data() + first);
    }
    residualPage[0] = -1;  // every row read back from its page's codes
    const std::string name = dims({{"rows", rows}, {"kvHeads", kvHeads}, {"headDim", hd}}) + " kv=" + kvTypeName(type);
    const double codes = codeMismatch(ref, test, poolA, poolB, va, 1, pos.data(), rows);
    // The largest value the type holds: f32 and bf16 hold everything finite (bf16 rounds 3e38
    // to the nearest, inf stays inf); a scaled type holds codeMax x 65504.
    const double held = kvTypeScaled(type) ? (double)kvTypeCodeMax(type) * 65504.0 : INFINITY;
    constexpr double kBf16Max = 3.3895313892515355e38;  // 0x7f7f
    double worst = codes;
    std::vector<float> back;  // K then V of the rows
    test.kvRead(vb, 0, 1, 0, rows, back);
    for (int which = 0; which < 2; ++which) {
      const std::vector<float>& in = which ? v : k;
      for (int i = 0; i < rows; ++i) {
        double num = 0, den = 0;
        for (int d = 0; d < L.kvDim; ++d) {
          const double x = in[(size_t)i * L.kvDim + d], y = back[((size_t)which * rows + i) * L.kvDim + d];
          // bf16 rounds a finite value within half a unit of its largest finite one up to inf, as
          // IEEE rounding does; anything else that reads back inf or NaN is an error.
          const bool roundsToInf = type == KvType::BF16 && std::fabs(x) > kBf16Max;
          if (std::isnan(y) || (std::isinf(y) && !std::isinf(x) && !roundsToInf) || (x != 0 && y != 0 && (x < 0) != (y < 0)))
            worst = INFINITY;
          if (std::isinf(x) || std::isinf(y)) continue;  // f32 and bf16 keep an infinite input as it is
          const double want = std::max(-held, std::min(held, x));
          num += (y - want) * (y - want);
          den += want * want;
        }
        if (den > 0) worst = std::max(worst, std::sqrt(num / den));
      }
    }
    // Within the coarsest rounding of a saturated or ordinary head (int4: 1/7 of amax per value).
    r.report(OpCheck{"kv_write range", name, worst, true, 0.25});
  }
}

// kv_motion: the fixed-point prefill's convergence test (Backend::kvMotion) of the test backend
// against the reference's, from the same bytes: 120 positions across eight pages (a channel-key
// type's last one partial, read from its residual; 240 rows, more than one block of the GPU's
// kernel), first unchanged, then rewritten, then (f32 and bf16, which keep them) with a NaN and
// an infinity. Whether they moved, how far and the largest value
// are maxima of the same values, so they must be the same numbers, and unchanged must be `same`.
void checkKvMotion(Runner& r, Backend& ref, Backend& test) {
  const int kvHeads = 2, hd = 64, start = 3, n = 120, rows = start + n, pages = (rows + 15) / 16;
  for (int t = 0; t < kKvTypeCount; ++t) {
    const KvType type = (KvType)t;
    const KvLayout L = checkLayout(type, kvHeads, hd);
    const int R = L.residualParts(), P = L.pageTokens;
    Tensor poolA = ref.alloc(pages + R, L.pageBytes() / 4), poolB = test.alloc(pages + R, L.pageBytes() / 4);
    ref.poison(poolA);
    test.poison(poolB);
    std::vector<int32_t> table((size_t)pages), residual((size_t)R), residualPage(1, -1), pos(rows), seqs(rows, 0);
    for (int p = 0; p < pages; ++p) table[(size_t)p] = p;
    for (int j = 0; j < R; ++j) residual[(size_t)j] = pages + j;
    for (int i = 0; i < rows; ++i) pos[(size_t)i] = i;
    KvView va{&poolA, L, table.data(), pages, 1, seqs.data(), residual.data(), residualPage.data()};
    KvView vb{&poolB, L, table.data(), pages, 1, seqs.data(), residual.data(), residualPage.data()};
    // Rows 0..rows-1 of slot 1, a page at a time (a channel-key type's residual holds one page).
    auto write = [&](const std::vector<float>& k, const std::vector<float>& v) {
      auto ka = r.act(k, rows, L.kvDim), vv = r.act(v, rows, L.kvDim);
      for (int first = 0; first < rows; first += P) {
        const int m = std::min(P, rows - first);
        residualPage[0] = first / P;
        ref.kvWrite(va, 1, tensorRows(ka.first, first, m), tensorRows(vv.first, first, m), m, pos.data() + first);
        test.kvWrite(vb, 1, tensorRows(ka.second, first, m), tensorRows(vv.second, first, m), m, pos.data() + first);
      }
    };
    std::shared_ptr<void> snapA, snapB;
    auto motion = [&](const std::string& what, bool wantSame) {
      const Backend::KvMotion a = ref.kvMotion(va, 0, 1, start, n, snapA), b = test.kvMotion(vb, 0, 1, start, n, snapB);
      const bool equal = a.same == b.same && a.same == wantSame && a.moved == b.moved && a.largest == b.largest;
      r.report(OpCheck{"kv_motion", dims({{"start", start}, {"n", n}, {"kvHeads", kvHeads}, {"headDim", hd}}) + " kv=" +
                                        kvTypeName(type) + " " + what,
                       equal ? 0.0 : INFINITY, true, 1e-12});
    };
    std::vector<float> k = r.random((size_t)rows * L.kvDim), v = r.random((size_t)rows * L.kvDim);
    write(k, v);
    ref.kvMotion(va, 0, 1, start, n, snapA);  // the first call takes the values
    test.kvMotion(vb, 0, 1, start, n, snapB);
    motion("unchanged", true);
    for (size_t i = 0; i < k.size(); i += 3) k[i] *= 1.5f, v[i] -= 0.25f;
    write(k, v);
    motion("rewritten", false);
    if (type == KvType::F32 || type == KvType::BF16) {
      k[(size_t)(start + 5) * L.kvDim + 7] = NAN;
      v[(size_t)(start + 30) * L.kvDim + 1] = INFINITY;
      write(k, v);
      motion("nan and inf", false);
    }
  }
}

// e4m3fn by its definition (OCP 8-bit floating point): a sign, 4 exponent bits of bias 7 and 3
// mantissa bits; exponent 0 holds the subnormals m/8 x 2^-6; S.1111.111 is NaN; no infinities.
// Written apart from kv_format.h's bit tricks, so that the cases below check them.
double e4m3fnValue(int c) {
  const int e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return NAN;
  const double magnitude = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (c & 0x80) ? -magnitude : magnitude;
}

// The code an fp8 cache writes for x at scale 1: the nearest finite e4m3fn value, ties to the
// even code, of x's sign; magnitudes past 448 saturate, and a NaN writes +448 (0x7e), as the
// integer types clamp a NaN to +codeMax.
int e4m3fnCodeOf(double x) {
  if (std::isnan(x)) return 0x7e;
  int best = 0;
  for (int c = 1; c <= 0x7e; ++c) {
    const double d = std::fabs(std::fabs(x) - e4m3fnValue(c)), b = std::fabs(std::fabs(x) - e4m3fnValue(best));
    if (d < b || (d == b && (c & 1) == 0)) best = c;
  }
  return (std::signbit(x) ? 0x80 : 0) | best;
}

// fp8 (e4m3fn) codes, exhaustively: every one of the 256 codes read back by attention (each
// kernel path: the tensor-core decode at head size 128, the CUDA-core decode at 16, prefill) and
// by kvRead, against e4m3fnValue (NaN exactly for 0x7f and 0xff, which the GPU's conversion
// reads as NaN); and kvWrite of every finite value, the midpoints between neighbours and the
// values beside them, and NaN, against e4m3fnCodeOf, never writing a NaN code. Each op reports
// 0 when every value matches and infinity otherwise, except attention, which averages its keys'
// (equal) values and may round: its worst relative error, within 1e-5 (neighbouring codes lie
// 6% or more apart), infinite where a NaN is missing or extra.
void checkFp8Codes(Runner& r, Backend& ref, Backend& test) {
  // kv_write: heads of 128 values whose first is 448, so that the head's scale is exactly 1 and
  // a value's code is e4m3fnCodeOf(value).
  {
    std::vector<double> values;
    for (int c = 0; c < 256; ++c)
      if ((c & 0x7f) != 0x7f) values.push_back(e4m3fnValue(c));
    for (int c = 0; c < 0x7e; ++c)
      for (double sign : {1.0, -1.0}) {
        const float mid = (float)((e4m3fnValue(c) + e4m3fnValue(c + 1)) / 2);  // exact in f32
        for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f)}) values.push_back(sign * x);
      }
    values.push_back(NAN);
    values.push_back(-NAN);
    const int hd = 128, kvHeads = 2, perHead = hd - 1;
    const KvLayout L = checkLayout(KvType::FP8, kvHeads, hd);
    const int heads = (int)((values.size() + perHead - 1) / perHead), rows = (heads + kvHeads - 1) / kvHeads;
    std::vector<float> k((size_t)rows * L.kvDim, 0.0f);
    for (int h = 0; h < rows * kvHeads; ++h) k[(size_t)h * hd] = 448.0f;
    for (size_t i = 0; i < values.size(); ++i) k[(i / perHead) * hd + 1 + i % perHead] = (float)values[i];
    const int pages = (rows + L.pageTokens - 1) / L.pageTokens;
    std::vector<int32_t> table((size_t)pages), pos((size_t)rows), seqs((size_t)rows, 0);
    for (int i = 0; i < pages; ++i) table[(size_t)i] = i;
    for (int i = 0; i < rows; ++i) pos[(size_t)i] = i;
    Tensor poolA = ref.alloc(pages, L.pageBytes() / 4), poolB = test.alloc(pages, L.pageBytes() / 4);
    KvView va{&poolA, L, table.data(), pages, 1, seqs.data()}, vb{&poolB, L, table.data(), pages, 1, seqs.data()};
    auto ka = r.act(k, rows, L.kvDim);
    ref.kvWrite(va, 1, ka.first, ka.first, rows, pos.data());
    test.kvWrite(vb, 1, ka.second, ka.second, rows, pos.data());
    double err = codeMismatch(ref, test, poolA, poolB, va, 1, pos.data(), rows);
    std::vector<float> words((size_t)poolB.numel());
    test.download(poolB, 0, poolB.rows, words.data());
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words.data());
    for (int row = 0; row < rows; ++row)
      for (int h = 0; h < kvHeads; ++h) {
        const uint8_t* codes = bytes + L.codeOffset(pos[(size_t)row] / L.pageTokens, 1, 0, row % L.pageTokens) + h * hd;
        for (int i = 0; i < hd; ++i) {
          const float x = k[(size_t)row * L.kvDim + h * hd + i];
          if (codes[i] != e4m3fnCodeOf(x) || (codes[i] & 0x7f) == 0x7f) err = INFINITY;
        }
      }
    r.report(OpCheck{"kv_write fp8 codes", dims({{"values", (int64_t)values.size()}}), err, true, 1e-12});
  }
  // Reading: one sequence of `ctx` tokens whose V rows each hold the 256 codes in order (K head
  // after head), K codes zero, every scale 1. Every score is 0, so each query's output is the
  // decoded V row: query head h, channel d reads code (h / G) x hd + d.
  struct ReadCase {
    int kvHeads, hd, group, ctx, queries;
  };
  for (const ReadCase c : {ReadCase{2, 128, 2, 100, 1}, ReadCase{16, 16, 1, 40, 1}, ReadCase{2, 128, 2, 40, 20},
                           ReadCase{16, 16, 2, 40, 20}}) {
    const KvLayout L = checkLayout(KvType::FP8, c.kvHeads, c.hd);
    const int pages = (c.ctx + L.pageTokens - 1) / L.pageTokens, heads = c.kvHeads * c.group;
    std::vector<float> host((size_t)(pages * L.pageBytes() / 4), 0.0f);
    uint8_t* bytes = reinterpret_cast<uint8_t*>(host.data());
    const uint32_t unitScales = 0x3c003c00u;  // f16 1.0 for K and V
    for (int p = 0; p < c.ctx; ++p) {
      const int page = p / L.pageTokens, off = p % L.pageTokens;
      for (int code = 0; code < 256; ++code) bytes[L.codeOffset(page, 1, 1, off) + code] = (uint8_t)code;
      for (int h = 0; h < c.kvHeads; ++h) std::memcpy(bytes + L.scaleOffset(page, 1, off, h), &unitScales, 4);
    }
    Tensor poolA = ref.alloc(pages, L.pageBytes() / 4), poolB = test.alloc(pages, L.pageBytes() / 4);
    ref.writeRows(poolA, 0, pages, host.data());
    test.writeRows(poolB, 0, pages, host.data());
    std::vector<int32_t> table((size_t)pages), qpos, qseq((size_t)c.queries, 0);
    for (int i = 0; i < pages; ++i) table[(size_t)i] = i;
    for (int i = c.ctx - c.queries; i < c.ctx; ++i) qpos.push_back(i);
    KvView va{&poolA, L, table.data(), pages, 1, qseq.data()}, vb{&poolB, L, table.data(), pages, 1, qseq.data()};
    const std::string shape = dims({{"ctx", c.ctx}, {"queries", c.queries}, {"heads", heads}, {"kvHeads", c.kvHeads},
                                    {"headDim", c.hd}});
    // An output no value decodes to: a NaN code's channel left unwritten reads as this, not NaN.
    const float unwritten = -1e30f;
    const int64_t cols = (int64_t)heads * c.hd;
    auto qa = r.act(r.random((size_t)(c.queries * cols)), c.queries, cols);
    auto o = r.act(std::vector<float>((size_t)(c.queries * cols), unwritten), c.queries, cols);
    AttentionSpec sp{heads, c.kvHeads, c.hd, false, 0, 1.0f / std::sqrt((float)c.hd)};
    ref.attention(qa.first, c.queries, qpos.data(), va, 1, sp, o.first);
    test.attention(qa.second, c.queries, qpos.data(), vb, 1, sp, o.second);
    double worst = 0;
    for (Backend* b : {&ref, &test}) {
      std::vector<float> out((size_t)(c.queries * cols));
      b->download(b == &ref ? o.first : o.second, 0, c.queries, out.data());
      for (int q = 0; q < c.queries; ++q)
        for (int h = 0; h < heads; ++h)
          for (int d = 0; d < c.hd; ++d) {
            const double want = e4m3fnValue((h / c.group) * c.hd + d), y = out[(size_t)(q * cols + h * c.hd + d)];
            if (std::isnan(want) != std::isnan(y)) worst = INFINITY;
            else if (!std::isnan(want)) worst = std::max(worst, std::fabs(y - want) / std::max(std::fabs(want), 1e-3));
          }
    }
    r.report(OpCheck{"attention fp8 codes", shape, worst, true, 1e-5});
    if (c.queries > 1) continue;  // kvRead reads the same pages in every case
    double readErr = 0;
    for (Backend* b : {&ref, &test}) {
      std::vector<float> back;
      b->kvRead(b == &ref ? va : vb, 0, 1, 0, c.ctx, back);
      for (int p = 0; p < c.ctx; ++p)
        for (int code = 0; code < 256; ++code) {
          const double want = e4m3fnValue(code), y = back[((size_t)c.ctx + p) * L.kvDim + code];
          if (std::isnan(want) ? !std::isnan(y) : y != want) readErr = INFINITY;
        }
    }
    r.report(OpCheck{"kv_read fp8 codes", shape, readErr, true, 1e-12});
  }
}

// elementwise ops
void checkElementwise(Runner& r, Backend& ref, Backend& test) {
  const int n = 5, m = 1000;
  auto g = r.act(r.random((size_t)n * m), n, m);
  auto u = r.act(r.random((size_t)n * m), n, m);
  auto o = r.outputs(n, m);
  ref.swiglu(g.first, u.first, n, o.first);
  test.swiglu(g.second, u.second, n, o.second);
  r.compare("swiglu", dims({{"n", n}, {"cols", m}}), o.first, o.second, n);
  ref.geluTanh(g.first, n);
  test.geluTanh(g.second, n);
  r.compare("gelu_tanh", dims({{"n", n}, {"cols", m}}), g.first, g.second, n);
  ref.addInPlace(u.first, g.first, n);
  test.addInPlace(u.second, g.second, n);
  r.compare("residual_add", dims({{"n", n}, {"cols", m}}), u.first, u.second, n);
}

// the embedding lookup, with and without learned positions
void checkEmbed(Runner& r, Backend& ref, Backend& test) {
  const int V = 300, E = 64, P = 128, n = 9;
  auto table = r.weight(r.random((size_t)V * E), V, E);
  auto pos = r.weight(r.random((size_t)P * E), P, E);
  std::vector<int32_t> tok((size_t)n), at((size_t)n);
  for (int i = 0; i < n; ++i) {
    tok[(size_t)i] = (int32_t)(r.rng() % V);
    at[(size_t)i] = (int32_t)(r.rng() % P);
  }
  for (bool withPos : {false, true}) {
    auto o = r.outputs(n, E);
    ref.embed(tok.data(), at.data(), n, table.first, withPos ? &pos.first : nullptr, o.first);
    test.embed(tok.data(), at.data(), n, table.second, withPos ? &pos.second : nullptr, o.second);
    r.compare("embed", dims({{"n", n}, {"E", E}, {"positions", withPos}}), o.first, o.second, n);
  }
}

// The groups of cases, each with the ops it reports. Cases in one group share inputs or outputs
// (the elementwise ops run on each other's results), so a group runs whole when the filter
// selects any of its ops; the results are those of the selected ops.
struct Group {
  std::vector<std::string> ops;
  void (*run)(Runner&, Backend&, Backend&);
};
const std::vector<Group>& groups() {
  static const std::vector<Group> all = {
      {{"linear"}, checkLinear},
      {{"rms_norm", "layer_norm"}, checkNorm},
      {{"add_rms_norm", "add_rms_norm residual", "add_layer_norm", "add_layer_norm residual"}, checkAddNorm},
      {{"rope"}, checkRope},
      {{"linears q", "linears k", "linears v", "linears packed", "linear_swiglu", "linear_swiglu packed"}, checkFusedLinears},
      {{"rope_kv_write q", "rope_kv_write q alone", "rope_kv_write cache"}, checkRopeKvWrite},
      {{"rope_kv_write residual", "rope_kv_write page"}, checkRopeKvWritePage},
      {{"attention", "kv_write codes", "kv_write+zero+read"}, checkAttention},
      {{"kv_write range"}, checkKvRange},
      {{"kv_motion"}, checkKvMotion},
      {{"kv_write fp8 codes", "attention fp8 codes", "kv_read fp8 codes"}, checkFp8Codes},
      {{"swiglu", "gelu_tanh", "residual_add"}, checkElementwise},
      {{"embed"}, checkEmbed},
      {{"sample", "sample logprobs"}, checkSample},
      {{"sample_rows", "sample_rows logprobs"}, checkSampleRows},
  };
  return all;
}

}  // namespace

std::vector<OpCheck> checkBackendOps(Backend& ref, Backend& test, uint64_t seed, const std::vector<std::string>& ops) {
  for (const std::string& e : ops) {
    bool found = false;
    std::string names;
    for (const Group& g : groups())
      for (const std::string& op : g.ops) {
        found = found || selects(e, op);
        names += (names.empty() ? "" : ", ") + op;
      }
    if (!found) throw EngineError(kErrInvalidArgument, "checkBackendOps: no op is named '" + e + "' (the ops: " + names + ")");
  }
  Runner r{ref, test, ops, dtypeTolerance(test), std::mt19937_64(seed), {}, {}};
  for (const Group& g : groups()) {
    r.groupOps = g.ops;
    if (std::none_of(g.ops.begin(), g.ops.end(), [&](const std::string& op) { return r.selected(op); })) continue;
    // Each group draws from its own stream, seeded by the run's seed and the group's first op:
    // its cases see the same inputs whether every group runs or it alone, so a failure of a full
    // run reproduces with the same seed and its op as the filter.
    r.rng.seed(seed ^ nameHash(g.ops[0]));
    g.run(r, ref, test);
  }
  return r.out;
}

}  // namespace lckv
