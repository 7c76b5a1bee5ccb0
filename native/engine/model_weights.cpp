// The model's tensor registry: the tensors a config needs with their shapes, loading each one
// (checked against them), and finalize(), which hands them to the layers.
#include <new>
#include <string>

#include "errors.h"
#include "model.h"

namespace lckv {

namespace {
std::string layerName(int i, const char* what) { return "layers." + std::to_string(i) + "." + what; }
std::string shapeStr(int64_t r, int64_t c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; }
}  // namespace

std::map<std::string, std::pair<int64_t, int64_t>> Model::expectedTensors() const {
  const ModelConfig& c = cfg_;
  const int64_t E = c.hidden, qd = (int64_t)c.numHeads * c.headDim, kvd = (int64_t)c.numKvHeads * c.headDim;
  const int64_t I = c.intermediate;
  const bool gpt2 = c.style == BlockStyle::Gpt2;
  std::map<std::string, std::pair<int64_t, int64_t>> m;
  m["embed.weight"] = {c.vocab, E};
  if (gpt2) m["pos_embed.weight"] = {c.maxPositions, E};
  m["final_norm.weight"] = {1, E};
  if (gpt2) m["final_norm.bias"] = {1, E};
  if (!c.tiedEmbeddings) m["lm_head.weight"] = {c.vocab, E};
  for (int i = 0; i < c.numLayers; ++i) {
    const bool kv = c.plan.kvSlot[i] >= 0;
    m[layerName(i, "attn_norm.weight")] = {1, E};
    m[layerName(i, "mlp_norm.weight")] = {1, E};
    if (gpt2) {
      m[layerName(i, "attn_norm.bias")] = {1, E};
      m[layerName(i, "mlp_norm.bias")] = {1, E};
    }
    m[layerName(i, "q.weight")] = {qd, E};
    m[layerName(i, "o.weight")] = {E, qd};
    if (kv) {
      m[layerName(i, "k.weight")] = {kvd, E};
      m[layerName(i, "v.weight")] = {kvd, E};
    }
    if (c.attentionBias) {
      m[layerName(i, "q.bias")] = {1, qd};
      m[layerName(i, "o.bias")] = {1, E};
      if (kv) {
        m[layerName(i, "k.bias")] = {1, kvd};
        m[layerName(i, "v.bias")] = {1, kvd};
      }
    }
    if (!gpt2) m[layerName(i, "gate.weight")] = {I, E};
    m[layerName(i, "up.weight")] = {I, E};
    m[layerName(i, "down.weight")] = {E, I};
    if (c.mlpBias) {
      if (!gpt2) m[layerName(i, "gate.bias")] = {1, I};
      m[layerName(i, "up.bias")] = {1, I};
      m[layerName(i, "down.bias")] = {1, E};
    }
  }
  return m;
}

void Model::loadTensor(const TensorSource& src) {
  auto it = expected_.find(src.name);
  if (it == expected_.end())
    throw EngineError(kErrWeights, "tensor '" + src.sourceName + "' in " + src.file + " maps to '" + src.name +
                                       "', which this model's config does not use");
  Tensor t;
  {
    // The host copy lives only until the backend holds the tensor: one tensor's bytes at a time.
    const HostTensor host = readTensor(src);
    if (host.rows != it->second.first || host.cols != it->second.second)
      throw EngineError(kErrWeights, "tensor '" + src.sourceName + "' in " + src.file + " has shape " + shapeStr(host.rows, host.cols) +
                                         " after layout conversion; the config implies " +
                                         shapeStr(it->second.first, it->second.second));
    if (!allFinite(host))
      throw EngineError(kErrWeights, "tensor '" + src.sourceName + "' in " + src.file + " holds a NaN or infinite value");
    const DType kept = backend_->keptWeightType(host.dtype);
    if (!staysFiniteIn(host, kept)) {
      const bool f16 = kept == DType::F16;
      throw EngineError(kErrWeights, "tensor '" + src.sourceName + "' in " + src.file + " holds a value that rounds past the largest " +
                                         (f16 ? "f16 number (65504)" : "bf16 number (3.39e38)") + " to infinity in weights kept in " +
                                         (f16 ? "f16" : "bf16") + ": load it with dtype \"f32\"" + (f16 ? " or \"bf16\"" : ""));
    }
    try {
      t = backend_->uploadWeight(host.bytes.data(), host.dtype, host.rows, host.cols);
    } catch (const std::bad_alloc&) {
      throw EngineError(kErrOutOfMemory, "out of memory loading tensor '" + src.sourceName + "'");
    }
  }
  auto old = tensors_.find(src.name);
  if (old != tensors_.end()) weightBytes_ -= (size_t)old->second.numel() * dtypeSize(old->second.dtype);
  weightBytes_ += (size_t)t.numel() * dtypeSize(t.dtype);
  tensors_[src.name] = t;
  ready_ = false;
}

void Model::finalize() {
  for (const auto& kv : expected_)
    if (!tensors_.count(kv.first))
      throw EngineError(kErrWeights, "missing tensor for '" + kv.first + "'");
  auto get = [&](const std::string& n) -> Tensor {
    auto it = tensors_.find(n);
    return it == tensors_.end() ? Tensor{} : it->second;
  };
  embed_ = get("embed.weight");
  posEmbed_ = get("pos_embed.weight");
  finalNormW_ = get("final_norm.weight");
  finalNormB_ = get("final_norm.bias");
  lmHead_ = cfg_.tiedEmbeddings ? embed_ : get("lm_head.weight");
  for (int i = 0; i < cfg_.numLayers; ++i) {
    Layer& L = layers_[(size_t)i];
    L.attnNormW = get(layerName(i, "attn_norm.weight"));
    L.attnNormB = get(layerName(i, "attn_norm.bias"));
    L.q = get(layerName(i, "q.weight"));
    L.qB = get(layerName(i, "q.bias"));
    L.k = get(layerName(i, "k.weight"));
    L.kB = get(layerName(i, "k.bias"));
    L.v = get(layerName(i, "v.weight"));
    L.vB = get(layerName(i, "v.bias"));
    L.o = get(layerName(i, "o.weight"));
    L.oB = get(layerName(i, "o.bias"));
    L.mlpNormW = get(layerName(i, "mlp_norm.weight"));
    L.mlpNormB = get(layerName(i, "mlp_norm.bias"));
    L.gate = get(layerName(i, "gate.weight"));
    L.gateB = get(layerName(i, "gate.bias"));
    L.up = get(layerName(i, "up.weight"));
    L.upB = get(layerName(i, "up.bias"));
    L.down = get(layerName(i, "down.weight"));
    L.downB = get(layerName(i, "down.bias"));
    if (!L.k.empty()) {
      // One allocation for Q, K and V: the backend's large-batch path runs them as one product
      // (three small GEMMs cost about three times one of their summed size at decode batches).
      Tensor qkv[3] = {L.q, L.k, L.v};
      backend_->packWeights(qkv, 3);
      L.q = tensors_[layerName(i, "q.weight")] = qkv[0];
      L.k = tensors_[layerName(i, "k.weight")] = qkv[1];
      L.v = tensors_[layerName(i, "v.weight")] = qkv[2];
    }
    if (!L.gate.empty()) {
      // Gate and up likewise: one product of twice the height, whose halves the SwiGLU reads.
      Tensor gateUp[2] = {L.gate, L.up};
      backend_->packWeights(gateUp, 2);
      L.gate = tensors_[layerName(i, "gate.weight")] = gateUp[0];
      L.up = tensors_[layerName(i, "up.weight")] = gateUp[1];
    }
  }
  ready_ = true;
}

}  // namespace lckv
