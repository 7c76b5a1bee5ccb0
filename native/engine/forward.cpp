// The forward, written once over the Backend interface: the page view of the sequences a
// forward reads and writes, its activations, one layer, a range of layers, and the logits.
#include <algorithm>
#include <cmath>
#include <string>

#include "model_internal.h"

namespace lckv {

// Points s.kv at the page tables of seqs; rowSeq[r] is the sequence of row r of the forward.
void Model::viewPages(Scratch& s, const std::vector<SequenceState*>& seqs, const std::vector<int32_t>& rowSeq, bool roundStride) {
  size_t stride = 1;
  for (SequenceState* q : seqs) stride = std::max(stride, q->kv->table().size());
  // A recorded decode step has its table stride built in: a power of two changes rarely.
  if (roundStride)
    while (stride & (stride - 1)) stride += stride & (~stride + 1);
  s.tables.assign(seqs.size() * stride, -1);
  for (size_t i = 0; i < seqs.size(); ++i) std::copy(seqs[i]->kv->table().begin(), seqs[i]->kv->table().end(), s.tables.begin() + (int64_t)(i * stride));
  s.rowSeq = rowSeq;
  s.kv.pool = &pool_->storage();
  s.kv.layout = pool_->layout();
  s.kv.tables = s.tables.data();
  s.kv.stride = (int)stride;
  s.kv.numSeqs = (int)seqs.size();
  s.kv.rowSeq = s.rowSeq.data();
  // A channel-key type's residuals (a sequence that has not written yet has none: -1 parts).
  const int R = pool_->layout().residualParts();
  s.residuals.assign(seqs.size() * (size_t)R, -1);
  s.residualPage.assign(seqs.size(), -1);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const std::vector<int32_t>& parts = seqs[i]->kv->residual();
    std::copy(parts.begin(), parts.end(), s.residuals.begin() + (int64_t)(i * R));
    s.residualPage[i] = seqs[i]->kv->residualPage();
  }
  s.kv.residuals = s.residuals.data();
  s.kv.residualPage = s.residualPage.data();
}

void Model::runLayer(Scratch& s, int n, const int32_t* pos, int i, LayerPart part, bool zeroKv) {
  Backend& be = *backend_;
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (int k = 0; k < 1024; ++k) v.push_back("layer " + std::to_string(k));
    return v;
  }();
  BackendRange range(be, i < 1024 ? names[(size_t)i].c_str() : "layer");
  const ModelConfig& c = cfg_;
  const Layer& L = layers_[(size_t)i];
  const NormKind nk = c.style == BlockStyle::Gpt2 ? NormKind::Layer : NormKind::Rms;
  const bool rope = c.style == BlockStyle::Llama;

  if (part != LayerPart::AfterKv) {
    if (s.pendingResidual) be.addNorm(nk, s.h, s.o, n, L.attnNormW, opt(L.attnNormB), c.normEps, s.x);
    else be.norm(nk, s.h, n, L.attnNormW, opt(L.attnNormB), c.normEps, s.x);
    s.pendingResidual = false;
    const int ownSlot = c.plan.kvSlot[i];
    if (ownSlot >= 0) {
      const Backend::LinearTarget qkv[3] = {{&L.q, opt(L.qB), &s.q}, {&L.k, opt(L.kB), &s.k}, {&L.v, opt(L.vB), &s.v}};
      be.linears(s.x, n, qkv, 3);
    } else {
      be.linear(s.x, n, L.q, opt(L.qB), s.q);
    }
    if (rope)
      be.ropeKvWrite(s.q, c.numHeads, ownSlot >= 0 ? &s.k : nullptr, &s.v, c.numKvHeads, c.headDim, n, pos, c.ropeInvFreq,
                     c.ropeAttentionScale, &s.kv, ownSlot);
    else if (ownSlot >= 0)
      be.kvWrite(s.kv, ownSlot, s.k, s.v, n, pos);
    if (part == LayerPart::UpToKv) return;
  }
  if (zeroKv && L.oB.empty()) {
    // Every key this layer's rows can see is zero, values too: each row's output is a weighted
    // sum of zeros, exactly 0 (no visible key gives 0 too), and so is the output projection's.
    // The residual gains nothing; only the MLP norm of h remains. (A query overflowed to inf
    // would score 0 x inf = NaN against a zero key; skipped, its row stays finite here and
    // meets the NaN, if at all, in a later pass.)
    be.norm(nk, s.h, n, L.mlpNormW, opt(L.mlpNormB), c.normEps, s.x);
  } else {
    AttentionSpec spec;
    spec.numHeads = c.numHeads;
    spec.numKvHeads = c.numKvHeads;
    spec.headDim = c.headDim;
    spec.strict = c.plan.strict[i];
    spec.window = c.plan.window[i];
    spec.scale = 1.0f / std::sqrt((float)c.headDim);
    // Every row of every sequence in one call: K/V is read where its owner wrote it, never copied.
    be.attention(s.q, n, pos, s.kv, c.plan.kvSlot[c.plan.target[i]], spec, s.a);
    be.linear(s.a, n, L.o, opt(L.oB), s.o);
    be.addNorm(nk, s.h, s.o, n, L.mlpNormW, opt(L.mlpNormB), c.normEps, s.x);
  }
  if (c.style == BlockStyle::Llama) {
    be.linearSwiglu(s.x, n, L.gate, opt(L.gateB), L.up, opt(L.upB), s.g);
    be.linear(s.g, n, L.down, opt(L.downB), s.o);
  } else {
    be.linear(s.x, n, L.up, opt(L.upB), s.u);
    be.geluTanh(s.u, n);
    be.linear(s.u, n, L.down, opt(L.downB), s.o);
  }
  s.pendingResidual = true;
}

void Model::settleResidual(Scratch& s, int n) {
  if (s.pendingResidual) backend_->addInPlace(s.h, s.o, n);
  s.pendingResidual = false;
}

void Model::runLayers(Scratch& s, int n, const int32_t* pos, int first, int last, bool settle) {
  for (int i = first; i <= last; ++i) runLayer(s, n, pos, i);
  // Callers read or copy h next: settle the last residual.
  if (settle) settleResidual(s, n);
}

Tensor Model::computeLogits(Scratch& s, int n, int rowStart, int rows) {
  Backend& be = *backend_;
  const NormKind nk = cfg_.style == BlockStyle::Gpt2 ? NormKind::Layer : NormKind::Rms;
  Tensor xr = be.allocLinearInput(rows, cfg_.hidden);
  if (rowStart == 0 && rows == n) {
    // Every row (a decode step): the final norm reads h where it is, with the last layer's
    // residual add in the same pass: two launches (an add and a copy) fewer per step.
    if (s.pendingResidual) be.addNorm(nk, s.h, s.o, n, finalNormW_, opt(finalNormB_), cfg_.normEps, xr);
    else be.norm(nk, s.h, n, finalNormW_, opt(finalNormB_), cfg_.normEps, xr);
    s.pendingResidual = false;
  } else {
    settleResidual(s, n);
    Tensor hr = be.alloc(rows, cfg_.hidden);
    be.copyRows(s.h, rowStart, hr, 0, rows);
    be.norm(nk, hr, rows, finalNormW_, opt(finalNormB_), cfg_.normEps, xr);
  }
  Tensor lg = be.alloc(rows, cfg_.vocab);
  be.linear(xr, rows, lmHead_, nullptr, lg);
  return lg;
}

void Model::allocScratch(Scratch& s, int n) {
  Backend& be = *backend_;
  const ModelConfig& c = cfg_;
  const int qd = c.numHeads * c.headDim, kvd = c.numKvHeads * c.headDim;
  s.h = be.alloc(n, c.hidden);
  s.x = be.allocLinearInput(n, c.hidden);  // a norm's output, read only by linear products
  s.q = be.alloc(n, qd);
  s.a = be.allocLinearInput(n, qd);  // attention's output, read only by the output projection
  s.k = be.alloc(n, kvd);
  s.v = be.alloc(n, kvd);
  s.o = be.alloc(n, c.hidden);
  // Llama: g is the SwiGLU's output, read only by the down product (linearSwiglu needs no buffer
  // of ours for the up product); GPT-2: u is the up product, which the GELU rewrites in place.
  if (c.style == BlockStyle::Llama) s.g = be.allocLinearInput(n, c.intermediate);
  else s.u = be.alloc(n, c.intermediate);
}

}  // namespace lckv
