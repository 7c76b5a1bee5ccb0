#!/usr/bin/env python3
"""Independent PyTorch reference for decoders with layer-condensed KV caches (LCKV).

This file is deliberately small and explicit: it is the oracle that the
C++/TypeScript engine is tested against, not a fast implementation.

Model formats (read from a Hugging Face style directory)
--------------------------------------------------------
* Llama style (model_type "llama" or "lckv-llama"): RMSNorm, RoPE (rope_theta,
  optional "llama3" rope scaling, HF "rotate_half" layout), GQA, SwiGLU MLP,
  tied or untied embeddings.  Weight names:
    model.embed_tokens.weight                       [V, E]
    model.layers.{i}.input_layernorm.weight         [E]
    model.layers.{i}.self_attn.q_proj.weight        [H*D, E]
    model.layers.{i}.self_attn.k_proj.weight        [KVH*D, E]   (KV layers only)
    model.layers.{i}.self_attn.v_proj.weight        [KVH*D, E]   (KV layers only)
    model.layers.{i}.self_attn.o_proj.weight        [E, H*D]
    model.layers.{i}.post_attention_layernorm.weight [E]
    model.layers.{i}.mlp.{gate,up}_proj.weight      [I, E]
    model.layers.{i}.mlp.down_proj.weight           [E, I]
    model.norm.weight                               [E]
    lm_head.weight                                  [V, E]  (absent when tied)
  Optional "*.bias" tensors next to any projection are used when present.
* GPT-2 style (model_type "gpt2"): LayerNorm with bias, learned absolute
  positions, GELU (tanh), Conv1D layout (weight is [in, out], y = x @ W + b).
    transformer.wte.weight [V, E], transformer.wpe.weight [P, E]
    transformer.h.{i}.ln_1.{weight,bias}
    transformer.h.{i}.attn.c_attn.{weight,bias}  [E, 3E], [3E]  (KV layers: q|k|v)
    transformer.h.{i}.attn.q_attn.{weight,bias}  [E, E], [E]    (non-KV layers: q only)
    transformer.h.{i}.attn.c_proj.{weight,bias}  [E, E]
    transformer.h.{i}.ln_2.{weight,bias}
    transformer.h.{i}.mlp.c_fc.{weight,bias}     [E, I]  (I = n_inner or 4E)
    transformer.h.{i}.mlp.c_proj.{weight,bias}   [I, E]
    transformer.ln_f.{weight,bias}; lm_head tied to wte.

Layer types (config "layer_types", a string such as "0_4_4_4_4_5" or "0s_4s_4_4_4_5")
------------------------------------------------------------------------------------
Entry i is t(i), the layer whose K/V the queries of layer i attend to; a
trailing "s" makes layer i a sliding-window layer (window W = sliding_window).
Only layers that are some layer's target ("KV layers") compute K/V.  Absent
(or not a string), every layer attends to itself: a standard decoder.

Attention of layer i for the query at position p sees the K/V of layer t(i) at
key positions j with
    j <= p        normally,
    j <  p        if t(i) > i or force_nodiag ("diagonal masked"),
    and p - j < W if layer i is a sliding-window layer.
A query with no visible key gets an attention output of exactly zero (this is
position 0 of every diagonal-masked layer); o_proj (and its bias) still apply.

Two ways of running a prompt:
* sequential (exact): token by token with a KV cache.  When layer i processes
  token p, the cache of layer t(i) holds tokens 0..p-1 from earlier steps, plus
  token p itself when t(i) <= i (layer t(i) already ran in this step).
* iterative(m, b): the parallel prefill of the LCKV paper.  With
  low = first i with t(i) > i and high = max t(i) over those layers: layers
  [0, low) run once over all tokens; layers [low, high] run m+b times over all
  tokens, each pass reading the K/V written by the previous pass (all zeros
  before the first pass) and writing new K/V; the hidden states out of the last
  pass feed layers (high, L), run once.  Positions 0..m+b-1 come out exact.

Usage:
    python lckv_reference.py MODEL_DIR --ids 5,6,7 [--iterative] [--generate N]
    python lckv_reference.py --self-test     # compare with transformers
"""

import argparse
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------

def parse_layer_types(spec, num_layers):
    """Return (targets, sliding) lists from a layer_types string."""
    if not isinstance(spec, str):
        # absent, or an unrelated HF "layer_types" list (e.g. ["full_attention", ...])
        return list(range(num_layers)), [False] * num_layers
    targets, sliding = [], []
    for part in spec.split("_"):
        m = re.match(r"^(\d+)(s)?$", part)
        if m is None:
            raise ValueError(f"bad layer_types entry {part!r} in {spec!r}")
        targets.append(int(m.group(1)))
        sliding.append(m.group(2) is not None)
    if len(targets) != num_layers:
        raise ValueError(f"layer_types {spec!r} has {len(targets)} entries, model has {num_layers} layers")
    for t in targets:
        if not 0 <= t < num_layers:
            raise ValueError(f"layer_types {spec!r}: target {t} out of range")
    return targets, sliding


def rope_settings(cfg):
    """(theta, scaling dict or None) from either the classic keys (rope_theta,
    rope_scaling) or the newer rope_parameters dict."""
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is None:
        theta = 10000.0
    scaling = cfg.get("rope_scaling")
    if scaling is None and isinstance(params, dict):
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise NotImplementedError(f"rope type {kind!r}")
    return float(theta), scaling


class Config:
    def __init__(self, cfg):
        self.raw = cfg
        self.style = "gpt2" if cfg.get("model_type") == "gpt2" else "llama"
        if self.style == "gpt2":
            self.hidden = cfg["n_embd"]
            self.num_layers = cfg["n_layer"]
            self.num_heads = cfg["n_head"]
            self.num_kv_heads = self.num_heads
            self.head_dim = self.hidden // self.num_heads
            self.inner = cfg.get("n_inner") or 4 * self.hidden
            self.eps = cfg.get("layer_norm_epsilon", 1e-5)
            self.act = cfg.get("activation_function", "gelu_new")
            self.tied = cfg.get("tie_word_embeddings", True)
            self.max_positions = cfg.get("n_positions", 1024)
        else:
            self.hidden = cfg["hidden_size"]
            self.num_layers = cfg["num_hidden_layers"]
            self.num_heads = cfg["num_attention_heads"]
            self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
            self.head_dim = cfg.get("head_dim") or self.hidden // self.num_heads
            self.inner = cfg["intermediate_size"]
            self.eps = cfg.get("rms_norm_eps", 1e-6)
            self.act = cfg.get("hidden_act", "silu")
            self.tied = cfg.get("tie_word_embeddings", False)
            self.rope_theta, self.rope_scaling = rope_settings(cfg)
        self.vocab = cfg["vocab_size"]
        self.targets, self.sliding = parse_layer_types(cfg.get("layer_types"), self.num_layers)
        self.window = cfg.get("sliding_window") or 4096  # LCKV default
        self.force_nodiag = bool(cfg.get("force_nodiag", False))
        self.forward_passes = cfg.get("forward_passes", 7)  # LCKV defaults
        self.backward_passes = cfg.get("backward_passes", 2)
        self.computes_kv = [i in self.targets for i in range(self.num_layers)]

    def attends_up(self, i):
        return self.targets[i] > i

    def masks_diagonal(self, i):
        return self.force_nodiag or self.attends_up(i)

    def upward_span(self):
        """(low, high) of the iterative plan, or None without upward targets."""
        up = [i for i in range(self.num_layers) if self.attends_up(i)]
        if not up:
            return None
        return up[0], max(self.targets[i] for i in up)


# ----------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------

def load_weights(model_dir):
    """All tensors of model.safetensors or of the shards named in
    model.safetensors.index.json, as stored (any dtype)."""
    from safetensors.torch import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(os.path.join(model_dir, name)))
    return weights


def rope_inv_freq(head_dim, theta, scaling):
    """RoPE inverse frequencies (float64), with HF's "llama3" scaling rule."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv
    factor = scaling["factor"]
    low_ff = scaling["low_freq_factor"]
    high_ff = scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen = old_len / low_ff
    high_wavelen = old_len / high_ff
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wavelen, inv / factor, inv)  # long waves: divide
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# ----------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------

class Reference:
    def __init__(self, cfg, weights, dtype=torch.float64):
        self.cfg = cfg if isinstance(cfg, Config) else Config(cfg)
        self.dtype = dtype
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        c = self.cfg
        if c.style == "llama":
            self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
            if c.tied or "lm_head.weight" not in self.w:
                self.lm_head = self.w["model.embed_tokens.weight"]
            else:
                self.lm_head = self.w["lm_head.weight"]
        else:
            self.lm_head = self.w["transformer.wte.weight"]

    @classmethod
    def from_dir(cls, model_dir, dtype=torch.float64):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        return cls(cfg, load_weights(model_dir), dtype)

    # -- small helpers -------------------------------------------------------
    def _p(self, i, name):
        c = self.cfg
        return f"model.layers.{i}.{name}" if c.style == "llama" else f"transformer.h.{i}.{name}"

    def _linear(self, x, name):
        """Llama nn.Linear: weight [out, in]."""
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def _conv1d(self, x, name):
        """GPT-2 Conv1D: weight [in, out]."""
        return x @ self.w[name + ".weight"] + self.w[name + ".bias"]

    def _rms_norm(self, x, name):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.cfg.eps) * self.w[name]

    def _layer_norm(self, x, name):
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w[name + ".bias"], self.cfg.eps)

    def _act(self, x):
        a = self.cfg.act
        if a == "silu":
            return F.silu(x)
        if a in ("gelu_new", "gelu_pytorch_tanh"):
            return F.gelu(x, approximate="tanh")
        if a == "gelu":
            return F.gelu(x)
        raise NotImplementedError(a)

    def _rope(self, x, pos):
        """x [heads, n, D]; pos [n] long."""
        ang = pos.to(torch.float64)[:, None] * self.inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)
        return x * cos + rotate_half(x) * sin

    def _heads(self, x, n_heads):
        """[n, n_heads*D] -> [n_heads, n, D]"""
        return x.view(x.shape[0], n_heads, self.cfg.head_dim).transpose(0, 1)

    # -- the pieces of a decoder layer -----------------------------------------
    def embed(self, ids, pos):
        if self.cfg.style == "llama":
            return self.w["model.embed_tokens.weight"][ids]
        return self.w["transformer.wte.weight"][ids] + self.w["transformer.wpe.weight"][pos]

    def attn_input(self, i, h):
        if self.cfg.style == "llama":
            return self._rms_norm(h, self._p(i, "input_layernorm.weight"))
        return self._layer_norm(h, self._p(i, "ln_1"))

    def query(self, i, x, pos):
        """Queries of layer i, [H, n, D] (RoPE applied)."""
        c = self.cfg
        if c.style == "llama":
            return self._rope(self._heads(self._linear(x, self._p(i, "self_attn.q_proj")), c.num_heads), pos)
        if c.computes_kv[i]:
            q = self._conv1d(x, self._p(i, "attn.c_attn"))[:, : c.hidden]
        else:
            q = self._conv1d(x, self._p(i, "attn.q_attn"))
        return self._heads(q, c.num_heads)

    def key_value(self, i, x, pos):
        """K, V of KV layer i, each [KVH, n, D] (keys RoPE'd at their own position)."""
        k, v = self.key_value_unrotated(i, x)
        return (self._rope(k, pos) if self.cfg.style == "llama" else k), v

    def key_value_unrotated(self, i, x):
        """K (before RoPE), V of KV layer i, each [KVH, n, D]."""
        c = self.cfg
        if c.style == "llama":
            k = self._heads(self._linear(x, self._p(i, "self_attn.k_proj")), c.num_kv_heads)
            v = self._heads(self._linear(x, self._p(i, "self_attn.v_proj")), c.num_kv_heads)
            return k, v
        qkv = self._conv1d(x, self._p(i, "attn.c_attn"))
        E = c.hidden
        return self._heads(qkv[:, E : 2 * E], c.num_kv_heads), self._heads(qkv[:, 2 * E :], c.num_kv_heads)

    def visible(self, i, q_pos, k_pos):
        """Boolean [nq, nk]: may the query at q_pos see the key at k_pos (layer i)?"""
        d = q_pos[:, None] - k_pos[None, :]
        ok = d > 0 if self.cfg.masks_diagonal(i) else d >= 0
        if self.cfg.sliding[i]:
            ok = ok & (d < self.cfg.window)
        return ok

    def attend(self, q, k, v, visible):
        """q [H, nq, D]; k, v [KVH, nk, D]; visible [nq, nk] -> [nq, H*D].
        Query head h uses KV head h // (H // KVH) (HF repeat_kv)."""
        c = self.cfg
        H, nq, D = q.shape
        out = torch.zeros(H, nq, D, dtype=self.dtype)
        if k.shape[1] > 0:
            group = H // c.num_kv_heads
            k = k.repeat_interleave(group, dim=0)
            v = v.repeat_interleave(group, dim=0)
            scores = (q @ k.transpose(1, 2)) / math.sqrt(D)
            scores = scores.masked_fill(~visible, float("-inf"))
            any_visible = visible.any(dim=1)  # [nq]
            probs = torch.softmax(scores[:, any_visible], dim=-1)
            out[:, any_visible] = probs @ v
        return out.transpose(0, 1).reshape(nq, H * D)

    def finish_layer(self, i, h, a):
        """Output projection, residual, MLP, residual."""
        c = self.cfg
        if c.style == "llama":
            h = h + self._linear(a, self._p(i, "self_attn.o_proj"))
            x = self._rms_norm(h, self._p(i, "post_attention_layernorm.weight"))
            gate = self._linear(x, self._p(i, "mlp.gate_proj"))
            up = self._linear(x, self._p(i, "mlp.up_proj"))
            return h + self._linear(self._act(gate) * up, self._p(i, "mlp.down_proj"))
        h = h + self._conv1d(a, self._p(i, "attn.c_proj"))
        x = self._layer_norm(h, self._p(i, "ln_2"))
        return h + self._conv1d(self._act(self._conv1d(x, self._p(i, "mlp.c_fc"))), self._p(i, "mlp.c_proj"))

    def logits(self, h):
        if self.cfg.style == "llama":
            h = self._rms_norm(h, "model.norm.weight")
        else:
            h = self._layer_norm(h, "transformer.ln_f")
        return h @ self.lm_head.T

    # -- sequential (exact) ----------------------------------------------------
    def new_state(self):
        return SequentialState(self)

    @torch.no_grad()
    def forward_sequential(self, ids):
        """Exact logits [n, V], token by token with a cache."""
        state = self.new_state()
        return torch.stack([state.step(t) for t in ids])

    # -- parallel / iterative --------------------------------------------------
    def run_layers(self, h, pos, layers, kv):
        """Run `layers` over all tokens at once.  kv maps a KV layer to its
        (K, V) over all positions; KV layers overwrite their entry before
        attending, so targets <= i are read fresh and targets > i are read as
        left by the previous pass."""
        for i in layers:
            x = self.attn_input(i, h)
            if self.cfg.computes_kv[i]:
                kv[i] = self.key_value(i, x, pos)
            k, v = kv[self.cfg.targets[i]]
            a = self.attend(self.query(i, x, pos), k, v, self.visible(i, pos, pos))
            h = self.finish_layer(i, h, a)
        return h

    @torch.no_grad()
    def forward_iterative(self, ids, passes=None):
        """Parallel prefill logits [n, V].  Without upward targets this is one
        plain pass (equal to the sequential result); otherwise the LCKV
        iteration plan with `passes` = m + b passes (config values by default)."""
        c = self.cfg
        ids = torch.as_tensor(ids, dtype=torch.long)
        n = ids.shape[0]
        pos = torch.arange(n)
        h = self.embed(ids, pos)
        kv = {}
        span = c.upward_span()
        if span is None:
            return self.logits(self.run_layers(h, pos, range(c.num_layers), kv))
        if passes is None:
            passes = c.forward_passes + c.backward_passes
        low, high = span
        h = self.run_layers(h, pos, range(low), kv)
        zeros = torch.zeros(c.num_kv_heads, n, c.head_dim, dtype=self.dtype)
        for i in range(c.num_layers):
            if c.attends_up(i):
                kv[c.targets[i]] = (zeros, zeros)
        for _ in range(passes):
            out = self.run_layers(h, pos, range(low, high + 1), kv)
        h = self.run_layers(out, pos, range(high + 1, c.num_layers), kv)
        return self.logits(h)

    # -- generation ------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, prompt_ids, max_new_tokens):
        """Greedy continuation (sequential; EOS does not stop it).
        Returns (new token ids, smallest top-1 minus top-2 logit gap)."""
        state = self.new_state()
        for t in prompt_ids:
            logits = state.step(t)
        tokens, min_gap = [], float("inf")
        for step in range(max_new_tokens):
            top = torch.topk(logits, 2).values
            min_gap = min(min_gap, float(top[0] - top[1]))
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            if step + 1 < max_new_tokens:
                logits = state.step(nxt)
        return tokens, min_gap


class SequentialState:
    """Per-layer K/V cache for token-by-token decoding (KV layers only)."""

    def __init__(self, ref):
        self.ref = ref
        self.k = {i: [] for i in range(ref.cfg.num_layers) if ref.cfg.computes_kv[i]}
        self.v = {i: [] for i in self.k}
        self.pos = 0

    def step(self, token):
        """Process one token at the next position; return its logits [V]."""
        ref, c = self.ref, self.ref.cfg
        p = torch.tensor([self.pos])
        h = ref.embed(torch.tensor([int(token)]), p)
        for i in range(c.num_layers):
            x = ref.attn_input(i, h)
            if c.computes_kv[i]:
                k, v = ref.key_value(i, x, p)
                self.k[i].append(k)
                self.v[i].append(v)
            t = c.targets[i]
            if self.k[t]:
                k, v = torch.cat(self.k[t], dim=1), torch.cat(self.v[t], dim=1)
            else:  # an upward target before its first token
                k = v = torch.zeros(c.num_kv_heads, 0, c.head_dim, dtype=ref.dtype)
            a = ref.attend(ref.query(i, x, p), k, v, ref.visible(i, p, torch.arange(k.shape[1])))
            h = ref.finish_layer(i, h, a)
        self.pos += 1
        return ref.logits(h)[0]


# ----------------------------------------------------------------------------
# lckv condense: the unfolded computation
# ----------------------------------------------------------------------------

def load_condense_maps(path):
    """condense-maps.safetensors as written by `lckv condense` (docs/condense.md): returns
    (metadata, {reader layer j: {"source": i, "k_map", "v_map"[, "k_offset", "v_offset"]}}),
    maps as float64 tensors with the K/V head first."""
    from safetensors import safe_open

    readers = {}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        for name in f.keys():
            m = re.match(r"^layers\.(\d+)\.(source|k_map|v_map|k_offset|v_offset)$", name)
            if m is None:
                raise ValueError(f"{path}: unexpected tensor {name!r}")
            entry = readers.setdefault(int(m.group(1)), {})
            t = f.get_tensor(name)
            entry[m.group(2)] = int(t[0]) if m.group(2) == "source" else t.to(torch.float64)
    return meta, readers


def map_keys(k, entry, style):
    """Layer i's keys [KVH, n, D] (before RoPE) mapped to the reader's: per frequency pair a
    complex scalar (rope style, pairs (f, f + D/2)), or K A + c (affine style)."""
    if style == "rope":
        half = k.shape[-1] // 2
        a = entry["k_map"].to(k.dtype)  # [KVH, half, 2]
        re_, im_ = a[..., 0][:, None, :], a[..., 1][:, None, :]
        lo, hi = k[..., :half], k[..., half:]
        return torch.cat([re_ * lo - im_ * hi, im_ * lo + re_ * hi], dim=-1)
    return k @ entry["k_map"].to(k.dtype) + entry["k_offset"].to(k.dtype)[:, None, :]


def map_values(v, entry):
    """Layer i's values [KVH, n, D] mapped to the reader's: V B (+ e)."""
    out = v @ entry["v_map"].to(v.dtype)
    if "v_offset" in entry:
        out = out + entry["v_offset"].to(v.dtype)[:, None, :]
    return out


@torch.no_grad()
def forward_unfolded(source, maps_path, ids):
    """Logits [n, V] of a condensed model computed without its folded weights: `source` is the
    Reference of the standard model that was condensed; a reader layer j keeps its own W_q and
    W_o and attends to layer i's K/V mapped explicitly, K_i A (+ c) before RoPE and V_i B (+ e).
    Equal to the folded model (the directory `lckv condense` wrote) up to the rounding of its
    stored weights."""
    meta, readers = load_condense_maps(maps_path)
    style = meta["style"]
    c = source.cfg
    assert c.targets == list(range(c.num_layers)), "the source of a condensed model is a standard model"
    ids = torch.as_tensor(ids, dtype=torch.long)
    pos = torch.arange(ids.shape[0])
    h = source.embed(ids, pos)
    kv = {}
    for i in range(c.num_layers):
        x = source.attn_input(i, h)
        if i in readers:
            k, v = kv[readers[i]["source"]]
            k, v = map_keys(k, readers[i], style), map_values(v, readers[i])
        else:
            k, v = kv[i] = source.key_value_unrotated(i, x)
        if c.style == "llama":
            k = source._rope(k, pos)
        a = source.attend(source.query(i, x, pos), k, v, source.visible(i, pos, pos))
        h = source.finish_layer(i, h, a)
    return source.logits(h)


# ----------------------------------------------------------------------------
# MiniCache's SLERP merge (a baseline for lckv condense; docs/condense.md)
# ----------------------------------------------------------------------------

def minicache_pairs(num_layers, kept):
    """The layer pairs MiniCache merges to keep `kept` layers' worth of K/V: adjacent pairs
    from the top down, (L-2, L-1), (L-4, L-3), ... (the deep layers are the similar ones), one
    pair per layer saved. None when that takes more pairs than there are (below half)."""
    merged = num_layers - kept
    if merged < 0 or 2 * merged > num_layers:
        return None
    return [(num_layers - 2 * k - 2, num_layers - 2 * k - 1) for k in range(merged)]


def slerp_merge(lower, upper, t=0.6, eps=1e-12):
    """MiniCache's merge of two layers' vectors [..., D] (one per token and K/V head): the
    directions are interpolated along the great circle (t = 0: the lower layer's, 1: the
    upper's; MiniCache uses 0.6), one shared direction is stored, and each layer keeps its own
    magnitude. Returns the two layers' vectors as restored from the merged cache."""
    n_lo, n_up = lower.norm(dim=-1, keepdim=True), upper.norm(dim=-1, keepdim=True)
    u_lo, u_up = lower / n_lo.clamp_min(eps), upper / n_up.clamp_min(eps)
    cos = (u_lo * u_up).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin < 1e-6  # (nearly) the same direction: the weights' limit is linear
    w_lo = torch.where(parallel, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / sin.clamp_min(1e-6))
    w_up = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / sin.clamp_min(1e-6))
    e = w_lo * u_lo + w_up * u_up
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(eps)
    return n_lo * e, n_up * e


@torch.no_grad()
def forward_merged_cache(ref, ids, pairs, t=0.6):
    """Logits [n, V] of a standard model decoding token by token with MiniCache's merged cache:
    at each token every layer computes its own K/V and attends to the cache (earlier tokens)
    plus its own fresh K/V; then, for each merged pair, the token's K/V of both layers are
    merged by slerp_merge and only their restored values stay in the cache. Keys are merged
    after RoPE (as cached: a rotation keeps norms and angles, so it makes no difference)."""
    c = ref.cfg
    assert c.targets == list(range(c.num_layers)), "MiniCache merging is for a standard model"
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.shape[0]
    cache = {i: (torch.zeros(c.num_kv_heads, n, c.head_dim, dtype=ref.dtype),
                 torch.zeros(c.num_kv_heads, n, c.head_dim, dtype=ref.dtype)) for i in range(c.num_layers)}
    out = []
    for p in range(n):
        pos = torch.tensor([p])
        h = ref.embed(ids[p:p + 1], pos)
        fresh = {}
        for i in range(c.num_layers):
            x = ref.attn_input(i, h)
            k, v = fresh[i] = ref.key_value(i, x, pos)
            K = torch.cat([cache[i][0][:, :p], k], dim=1)
            V = torch.cat([cache[i][1][:, :p], v], dim=1)
            a = ref.attend(ref.query(i, x, pos), K, V, torch.ones(1, p + 1, dtype=torch.bool))
            h = ref.finish_layer(i, h, a)
        for i in range(c.num_layers):
            cache[i][0][:, p:p + 1], cache[i][1][:, p:p + 1] = fresh[i]
        for lo, up in pairs:
            for part in (0, 1):
                cache[lo][part][:, p:p + 1], cache[up][part][:, p:p + 1] = slerp_merge(fresh[lo][part], fresh[up][part], t)
        out.append(ref.logits(h)[0])
    return torch.stack(out)


def check_slerp():
    """slerp_merge keeps each layer's magnitude, returns identical vectors unchanged, and puts
    the shared direction on the great circle at t of the angle; with no pairs, the merged-cache
    forward equals the plain one."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 16, generator=g, dtype=torch.float64), torch.randn(5, 3, 16, generator=g, dtype=torch.float64)
    ra, rb = slerp_merge(a, b, 0.6)
    assert torch.allclose(ra.norm(dim=-1), a.norm(dim=-1)) and torch.allclose(rb.norm(dim=-1), b.norm(dim=-1))
    assert torch.allclose(ra / ra.norm(dim=-1, keepdim=True), rb / rb.norm(dim=-1, keepdim=True))
    ua, ub, e = (x / x.norm(dim=-1, keepdim=True) for x in (a, b, ra))
    angle = lambda x, y: torch.arccos((x * y).sum(-1).clamp(-1, 1))  # noqa: E731
    assert torch.allclose(angle(ua, e), 0.6 * angle(ua, ub)) and torch.allclose(angle(e, ub), 0.4 * angle(ua, ub))
    same, _ = slerp_merge(a, 2 * a, 0.6)
    assert torch.allclose(same, a)
    assert minicache_pairs(8, 6) == [(6, 7), (4, 5)] and minicache_pairs(8, 3) is None
    ref = Reference({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 50},
                    _random_llama_weights(4, 32, 48, 50, 4, 2), dtype=torch.float64)
    ids = list(range(3, 15))
    plain = ref.forward_iterative(ids)
    assert float((forward_merged_cache(ref, ids, []) - plain).abs().max()) < 1e-10
    assert float((forward_merged_cache(ref, ids, [(2, 3)]) - plain).abs().max()) > 1e-3
    print("self-test SLERP merge: magnitudes kept, direction at t of the angle, no pairs = plain forward")


def _random_llama_weights(layers, hidden, inter, vocab, heads, kv_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = hidden // heads
    w = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * d, hidden), "self_attn.k_proj": (kv_heads * d, hidden),
                  "self_attn.v_proj": (kv_heads * d, hidden), "self_attn.o_proj": (hidden, heads * d),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        for name, shape in shapes.items():
            w[p + name + ".weight"] = 0.2 * torch.randn(*shape, generator=g)
        w[p + "input_layernorm.weight"] = torch.ones(hidden)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    return w


# ----------------------------------------------------------------------------
# cross-check against transformers (standard pattern only)
# ----------------------------------------------------------------------------

def load_hf_float32(model_dir):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def check_against_transformers(model_dir, ids, greedy_prompt=None, n_new=16, atol=1e-4):
    """Assert that, in float32, the reference (sequential and parallel) matches
    transformers' LlamaForCausalLM / GPT2LMHeadModel loaded from model_dir, and
    that greedy continuations agree.  Returns the max abs logit difference."""
    model = load_hf_float32(model_dir)
    ref = Reference.from_dir(model_dir, dtype=torch.float32)
    assert ref.cfg.upward_span() is None and ref.cfg.targets == list(range(ref.cfg.num_layers)), \
        "only standard patterns can be compared with transformers"
    hf = model(torch.tensor([ids])).logits[0].float()
    seq = ref.forward_sequential(ids)
    par = ref.forward_iterative(ids)
    diff = max(float((hf - seq).abs().max()), float((hf - par).abs().max()))
    assert diff < atol, f"{model_dir}: reference differs from transformers by {diff}"
    if greedy_prompt is not None:
        mine, _ = ref.greedy(greedy_prompt, n_new)
        seqs = list(greedy_prompt)
        theirs = []
        for _ in range(n_new):
            nxt = int(model(torch.tensor([seqs])).logits[0, -1].argmax())
            theirs.append(nxt)
            seqs.append(nxt)
        assert mine == theirs, f"{model_dir}: greedy differs from transformers: {mine} vs {theirs}"
    return diff


def self_test():
    """Build tiny random standard models with transformers and compare.  The
    sliding-window mask (W keys including the diagonal) is compared with
    transformers' Mistral, whose layers all use a sliding window."""
    import tempfile
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    torch.manual_seed(0)
    small = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False)
    cases = [
        LlamaForCausalLM(LlamaConfig(**small)),
        GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                   eos_token_id=1)),
        MistralForCausalLM(MistralConfig(sliding_window=4, **small)),
    ]
    for model in cases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                is_norm_weight = ("ln" in name or "norm" in name) and name.endswith("weight")
                p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.05) + (1.0 if is_norm_weight else 0.0))
        ids = torch.randint(0, 97, (12,)).tolist()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            if isinstance(model, MistralForCausalLM):
                with open(os.path.join(d, "config.json")) as f:
                    cfg = json.load(f)
                cfg["layer_types"] = "0s_1s"
                ref = Reference(cfg, load_weights(d), dtype=torch.float32)
                with torch.no_grad():
                    hf = load_hf_float32(d)(torch.tensor([ids])).logits[0]
                    diff = max(float((hf - ref.forward_sequential(ids)).abs().max()),
                               float((hf - ref.forward_iterative(ids)).abs().max()))
                cfg["layer_types"] = "0_1"  # the window must matter here
                with torch.no_grad():
                    full = Reference(cfg, load_weights(d), dtype=torch.float32).forward_sequential(ids)
                assert float((hf - full).abs().max()) > 1e-3, "sliding window has no effect in the test"
                assert diff < 1e-4, f"sliding window differs from transformers' Mistral by {diff}"
            else:
                diff = check_against_transformers(d, ids, greedy_prompt=ids[:5], n_new=8)
            print(f"self-test {type(model).__name__}: max abs diff vs transformers {diff:.3g}")
    check_slerp()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--ids", help="comma-separated prompt token ids")
    ap.add_argument("--iterative", action="store_true", help="parallel/iterative prefill instead of sequential")
    ap.add_argument("--generate", type=int, default=0, help="greedy new tokens")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return
    if not args.model_dir or not args.ids:
        ap.error("MODEL_DIR and --ids are required")
    ref = Reference.from_dir(args.model_dir)
    ids = [int(x) for x in args.ids.split(",")]
    logits = ref.forward_iterative(ids) if args.iterative else ref.forward_sequential(ids)
    print("argmax per position:", logits.argmax(-1).tolist())
    print("last logits[:8]:", [round(float(x), 6) for x in logits[-1, :8]])
    if args.generate:
        tokens, gap = ref.greedy(ids, args.generate)
        print("greedy:", tokens, "min top-2 gap:", gap)


if __name__ == "__main__":
    sys.exit(main())
