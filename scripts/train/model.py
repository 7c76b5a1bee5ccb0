"""A small Llama-style decoder with layer-condensed KV (LCKV) attention, in plain PyTorch.

Weights are named as Hugging Face's LlamaForCausalLM names them (model.embed_tokens.weight,
model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, ..., model.norm.weight; the output
projection is tied to the embedding), so a standard twin loads in transformers as it is.

Semantics (those of lckv's engine and of the LCKV reference code):
- layer i reads the K/V of layer t = layer_types[i]; only layers that are some layer's target
  have k_proj/v_proj;
- if t > i the layer is "strict": the query at position p sees target K/V at positions < p
  only, and position 0's attention output is zero; otherwise it attends causally, p included;
- keys get RoPE at their own positions.
Because strict layers read K/V computed by layers above them, a whole sequence is computed
either token by token (exact) or with the iterative scheme: layers [0, low) once, then the
cyclic group [low, high] several times, each pass reading the K/V written by the previous
pass (zeros before the first), then the layers above high once. After n passes over n
tokens the result is exact; training uses m passes without gradient, b - 1 with gradient
whose hidden states are discarded, and a final pass (the reference's iteration plan).
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    layer_types: Optional[str] = None
    forward_passes: int = 7
    backward_passes: int = 2

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: d[k] for k in names if k in d})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def targets(self) -> List[int]:
        if not self.layer_types:
            return list(range(self.num_hidden_layers))
        t = [int(x) for x in self.layer_types.split("_")]
        assert len(t) == self.num_hidden_layers, "layer_types must have one entry per layer"
        for i, x in enumerate(t):
            assert 0 <= x < self.num_hidden_layers and t[x] == x, f"layer {i} targets {x}, which must target itself"
        return t

    @property
    def cyclic_group(self) -> Optional[Tuple[int, int]]:
        t = self.targets
        up = [i for i in range(len(t)) if t[i] > i]
        if not up:
            return None
        return up[0], max(t[i] for i in up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x: [B, H, T, D]; cos, sin: [T, D] (f32)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


KV = Dict[int, Tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.target = cfg.targets[idx]
        self.strict = self.target > idx
        self.computes_kv = idx in cfg.targets
        self.h, self.kh, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hs = cfg.hidden_size
        self.q_proj = nn.Linear(hs, self.h * self.d, bias=False)
        if self.computes_kv:
            self.k_proj = nn.Linear(hs, self.kh * self.d, bias=False)
            self.v_proj = nn.Linear(hs, self.kh * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, hs, bias=False)

    def kv_of(self, x, cos, sin):
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.kh, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kh, self.d).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, kv: KV):
        """Whole-window forward: positions [0, T) of every row."""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2), cos, sin)
        if self.computes_kv:
            kv[self.idx] = self.kv_of(x, cos, sin)
        k, v = kv[self.target]
        g = self.h // self.kh
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if self.strict:
            # query p sees keys < p: drop the first query and the last key, then causal.
            out = q.new_zeros(B, self.h, 1, self.d)
            if T > 1:
                rest = F.scaled_dot_product_attention(q[:, :, 1:], k[:, :, :-1], v[:, :, :-1], is_causal=True)
                out = torch.cat([out.to(rest.dtype), rest], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.h * self.d))

    def step(self, x, cos, sin, cache: Dict[int, List[torch.Tensor]], p: int):
        """One position p for every row (x: [B, 1, hidden]); cache[t] = [K, V] of positions < p (or <= p)."""
        B = x.shape[0]
        q = apply_rope(self.q_proj(x).view(B, 1, self.h, self.d).transpose(1, 2), cos, sin)
        if self.computes_kv:
            k, v = self.kv_of(x, cos, sin)
            if self.idx in cache:
                cache[self.idx] = [torch.cat([cache[self.idx][0], k], 2), torch.cat([cache[self.idx][1], v], 2)]
            else:
                cache[self.idx] = [k, v]
        if self.strict:
            # the target (above) has not run at p yet: its cache holds positions < p.
            if p == 0:
                return self.o_proj(q.new_zeros(B, 1, self.h * self.d))
            k, v = cache[self.target]
            assert k.shape[2] == p
        else:
            k, v = cache[self.target]
            assert k.shape[2] == p + 1
        g = self.h // self.kh
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, 1, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, kv):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv)
        return h + self.mlp(self.post_attention_layernorm(h))

    def step(self, h, cos, sin, cache, p):
        h = h + self.self_attn.step(self.input_layernorm(h), cos, sin, cache, p)
        return h + self.mlp(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Inner(cfg)
        d = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.targets = cfg.targets
        self.group = cfg.cyclic_group
        # targets read by a layer below them: zero-filled before the first pass
        self.upward_targets = sorted({t for i, t in enumerate(self.targets) if t > i})

    def init_weights(self, std: float = 0.02):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)

    def rope(self, T: int, device, offset: int = 0):
        pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
        f = pos[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat([f, f], dim=-1)
        return emb.cos(), emb.sin()

    def logits(self, h):
        return F.linear(self.model.norm(h), self.model.embed_tokens.weight)

    def _layers(self, h, lo, hi, cos, sin, kv):
        for i in range(lo, hi):
            h = self.model.layers[i](h, cos, sin, kv)
        return h

    def forward(self, ids, passes_nograd: Optional[int] = None, passes_grad: Optional[int] = None,
                fixed_point: bool = False, kv_dtype=None):
        """Logits [B, T, V] of whole windows.

        Cyclic models: `passes_nograd` passes over the group without gradient, then
        `passes_grad` with gradient (the last one's hidden states continue); defaults: the
        config's m and b. With fixed_point=True (no gradient): up to T passes, stopping once a
        pass writes exactly the K/V it read (exact either way). Returns (logits, passes).
        """
        B, T = ids.shape
        cos, sin = self.rope(T, ids.device)
        h = self.model.embed_tokens(ids)
        kv: KV = {}
        L = len(self.model.layers)
        if self.group is None:
            return self.logits(self._layers(h, 0, L, cos, sin, kv)), 1
        low, high = self.group
        h = self._layers(h, 0, low, cos, sin, kv)
        dev_type = ids.device.type
        dt = kv_dtype or (torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else h.dtype)
        kvd = self.cfg.num_key_value_heads, self.cfg.head_dim
        for t in self.upward_targets:
            z = torch.zeros(B, kvd[0], T, kvd[1], device=ids.device, dtype=dt)
            kv[t] = (z, z)
        h0 = h
        passes = 0
        if fixed_point:
            assert not torch.is_grad_enabled()
            while True:
                before = {t: kv[t] for t in self.upward_targets}
                h = self._layers(h0, low, high + 1, cos, sin, kv)
                passes += 1
                if passes >= T or all(torch.equal(before[t][0], kv[t][0]) and torch.equal(before[t][1], kv[t][1])
                                      for t in self.upward_targets):
                    break
        else:
            m = self.cfg.forward_passes if passes_nograd is None else passes_nograd
            b = self.cfg.backward_passes if passes_grad is None else passes_grad
            assert b >= 1
            with torch.no_grad():
                for _ in range(m):
                    self._layers(h0, low, high + 1, cos, sin, kv)
            for _ in range(b - 1):
                self._layers(h0, low, high + 1, cos, sin, kv)
            h = self._layers(h0, low, high + 1, cos, sin, kv)
            passes = m + b
        h = self._layers(h, high + 1, L, cos, sin, kv)
        return self.logits(h), passes

    @torch.no_grad()
    def forward_sequential(self, ids):
        """Exact logits, token by token with a K/V cache (the definition of the semantics)."""
        B, T = ids.shape
        cos, sin = self.rope(T, ids.device)
        cache: Dict[int, List[torch.Tensor]] = {}
        out = []
        for p in range(T):
            h = self.model.embed_tokens(ids[:, p:p + 1])
            for layer in self.model.layers:
                h = layer.step(h, cos[p:p + 1], sin[p:p + 1], cache, p)
            out.append(self.logits(h))
        return torch.cat(out, dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
