#!/usr/bin/env python3
"""Perplexity with a K/V cache type per KV layer, by fake quantization in PyTorch.

lckv keeps one K/V type for every layer (loadModel's kvCacheDtype). This script asks whether a
type per KV layer would pay: LCKV's top layer is read by almost every layer, so it may deserve
more bits than the warm-up layers. It applies lckv's quantization rule (native/engine/
kv_format.h) to the K and V that each KV layer writes, with a type chosen per layer, and scores
the text token by token exactly as `lckv eval-ppl --prefill sequential` does.

The rule, per token and K/V head, for K and V separately (kvScaleOf, kvEncode, kvDecode):
  fp8 / int8 / int4: amax = max |x| over the head's head_dim values; s = f16(min(amax / M,
  65504)) with M = 448 / 127 / 7, rounded to nearest even; y = clamp(x / s, -M, M) (0 when
  s = 0); code = e4m3fn(y) (round to nearest even) for fp8, rint(y) for int8 and int4; the
  value read back is code * s in f32.
  bf16: round to nearest even. f32: unchanged.
Keys are quantized after RoPE, as the engine's fused RoPE + K/V write does, and a token's own
K/V is quantized before any attention reads it (the engine writes, then attends). The model is
scripts/train/model.py's (f32 weights, f32 math); its token-by-token forward is the exact LCKV
semantics. `--check-rule` compiles a small C++ program against kv_format.h and checks that the
fake quantization gives the engine's values bit for bit (random heads over 40 binades, exact
ties, zeros, subnormal scales and heads past the f16 cap).

--ulp-jitter SEED moves every K/V value one f32 ulp up or down at random before it is
quantized: the size of the differences between two f32 implementations of the same model
(other summation orders). A code or f16 scale that sits on a rounding boundary then flips, and
a flipped int4 code moves its value by a whole step, so the spread of a type's perplexity over
a few seeds is the resolution of any comparison between implementations, and between
assignments whose perplexities are close.

Text: like scripts/eval/kv-quality.js, the text is encoded as a prompt (with BOS) and cut to
--max-tokens; --no-bos encodes it without special tokens, as `lckv eval-ppl` does. Windows:
lib/eval.ts's rule (non-overlapping windows of --window tokens, a final window under 2 tokens
dropped).

A type assignment is a comma-separated list of LAYER=TYPE entries and one TYPE for the other
KV layers, e.g. "6=int8,int4" (layer 6 int8, the others int4) or "int4" (every KV layer).
Bytes per token are the engine's page layout (KvLayout::slotBytes over pageTokens, summed over
the KV layers): per layer 2 * kvDim * bits / 8 bytes of codes plus 4 bytes of f16 scales per
K/V head for the scaled types.

Other scale layouts, which the engine does not have, are measured the same way. A TYPE may be
int2 (symmetric like int4: M = 1, codes -1..1, s = f16(amax)) and the integer types take
options after colons, e.g. "int4:kpage:asym:r32":
  kpage   keys per channel over a page of 16 tokens (one scale per channel, K/V head and page),
          values per token, as KIVI does. A page's keys can only be quantized once the page is
          full, so kpage implies r16.
  asym    min/max instead of symmetric: s = f16((max - min) / (2^bits - 1)), z = f16(min),
          code = clamp(rint((x - z) / s), 0, 2^bits - 1), read back code * s + z (KIVI's rule);
          for K and V alike, and 2 more bytes per scale.
  rN      a bf16 residual (KIVI's): N a multiple of 16. The page being written and the
          N / 16 - 1 pages before it hold bf16 K and V; when a write fills a page, the page N
          tokens back is quantized from its bf16 values, before attention reads it. r16 keeps
          only the page being written; the default r0 quantizes each token as it is written.
          The residual costs bf16 bytes per sequence, not per token; bytes per token count the
          quantized pages.
  prerope keys quantized before RoPE: the rotation is applied to the values read back.

    python3 scripts/eval/kv_layer_types.py --model models/default --text validation.txt \\
      --max-tokens 20000 --window 256 [--types "f32" "int4" "int4:kpage" "6=int8,int4" ...] [--no-bos] \\
      [--late-from N] [--check-rule] [--ulp-jitter SEED] [--json out.json]

Prints one JSON object per assignment and a Markdown table.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts", "train"))
from eval_ppl import load_model, windows  # noqa: E402
from model import apply_rope  # noqa: E402

TYPE_BITS = {"f32": 32, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2}
CODE_MAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0, "int2": 1.0}
INT_TYPES = ("int8", "int4", "int2")
PAGE_TOKENS = 16

DEFAULT_TYPES = [
    "f32", "bf16", "fp8", "int8", "int4",
    # int4 on one KV layer, f32 on the others: where int4's loss comes from
    "0=int4,f32", "6=int4,f32", "7=int4,f32",
    # more bits for the top layer (6), or for the warm-up layers (0, 7)
    "6=int8,int4", "6=bf16,int4", "6=fp8,int4", "6=int4,int8", "6=int4,fp8",
    # int8 on one layer, int4 on the others; int4 on one layer, int8 on the others
    "0=int8,int4", "7=int8,int4", "0=int4,int8", "7=int4,int8",
]


def kv_fake_quant(x: torch.Tensor, kv_type: str) -> torch.Tensor:
    """x [..., head_dim] (f32, finite) quantized per row by lckv's rule and read back as f32."""
    if kv_type == "f32":
        return x
    if kv_type == "bf16":
        return x.to(torch.bfloat16).float()
    m = CODE_MAX[kv_type]
    amax = x.abs().amax(dim=-1, keepdim=True)
    s = torch.fmin(amax / m, torch.tensor(65504.0)).to(torch.float16).float()
    y = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x)).clamp(-m, m)
    # rint of a small negative y is -0.0; the engine's integer code 0 reads back as +0.0
    codes = y.to(torch.float8_e4m3fn).float() if kv_type == "fp8" else torch.round(y) + 0.0
    return codes * s


def kv_fake_quant_asym(x: torch.Tensor, kv_type: str) -> torch.Tensor:
    """x [..., n] quantized per row with a min/max scale and zero point (KIVI's rule), read back."""
    top = float(2 ** TYPE_BITS[kv_type] - 1)
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    s = torch.fmin((hi - lo) / top, torch.tensor(65504.0)).to(torch.float16).float()
    z = lo.to(torch.float16).float()
    y = torch.where(s > 0, (x - z) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x))
    return torch.round(y).clamp(0, top) * s + z


class Layout:
    """A TYPE with its options (see above): "int4:kpage:asym:r32"."""

    def __init__(self, spec: str):
        self.spec = spec
        self.kv_type, *opts = spec.split(":")
        if self.kv_type not in TYPE_BITS:
            raise SystemExit(f"--types: unknown type {self.kv_type} in {spec} (types: {', '.join(TYPE_BITS)})")
        self.key_page = self.asym = self.pre_rope = False
        self.residual = 0
        for o in opts:
            if self.kv_type not in INT_TYPES:
                raise SystemExit(f"--types: {spec}: options need an integer type ({', '.join(INT_TYPES)})")
            if o == "kpage":
                self.key_page = True
            elif o == "asym":
                self.asym = True
            elif o == "prerope":
                self.pre_rope = True
            elif re.fullmatch(r"r\d+", o) and int(o[1:]) % PAGE_TOKENS == 0:
                self.residual = int(o[1:])
            else:
                raise SystemExit(f"--types: {spec}: unknown option {o} (kpage, asym, prerope, rN with N a "
                                 f"multiple of {PAGE_TOKENS})")
        if self.key_page and self.residual == 0:
            self.residual = PAGE_TOKENS

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n] quantized per row (a token's head, or a channel's page) and read back."""
        return kv_fake_quant_asym(x, self.kv_type) if self.asym else kv_fake_quant(x, self.kv_type)

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, H, T, D]: per token and head, or per channel over the T = 16 tokens of a page."""
        return self.rows(k.transpose(-1, -2)).transpose(-1, -2) if self.key_page else self.rows(k)


def parse_assignment(spec: str, kv_layers):
    """"6=int8,int4" -> {6: "int8", others: "int4"}."""
    per, rest = {}, None
    for part in spec.split(","):
        if "=" in part:
            layer, t = part.split("=")
            layer = int(layer)
            if layer not in kv_layers:
                raise SystemExit(f"--types {spec}: layer {layer} is not a KV layer (KV layers: {kv_layers})")
            per[layer] = t
        else:
            if rest is not None:
                raise SystemExit(f"--types {spec}: more than one type for the other layers")
            rest = part
    if rest is None and set(per) != set(kv_layers):
        raise SystemExit(f"--types {spec}: no type for KV layers {sorted(set(kv_layers) - set(per))}")
    return {i: Layout(per.get(i, rest)) for i in kv_layers}


def slot_bytes_per_token(layout: Layout, kv_heads: int, head_dim: int) -> float:
    """KvLayout::slotBytes() / pageTokens for one KV layer; the other layouts' pages alike, with
    their scales (2 bytes each, 4 with a zero point): per token and head, or per channel, head
    and page for kpage keys."""
    row = kv_heads * head_dim * TYPE_BITS[layout.kv_type] // 8
    scales = 0
    if layout.kv_type in CODE_MAX:
        per_scale = 4 if layout.asym else 2
        v_scales = PAGE_TOKENS * kv_heads
        k_scales = kv_heads * head_dim if layout.key_page else PAGE_TOKENS * kv_heads
        scales = (k_scales + v_scales) * per_scale
    return (2 * PAGE_TOKENS * row + scales + 15) // 16 * 16 / PAGE_TOKENS


def ulp_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x with each value moved one f32 ulp up or down at random."""
    up = torch.rand(x.shape, generator=g) < 0.5
    return torch.nextafter(x, torch.where(up, torch.tensor(math.inf), torch.tensor(-math.inf)))


class Residual:
    """A KV layer's bf16 residual in one window: the bf16 K (before RoPE with prerope) and V each
    position wrote, from which a page is quantized when it leaves the residual."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.reset()

    def reset(self):
        self.k, self.v, self.cos, self.sin = [], [], [], []

    def append(self, k, v, cos, sin):
        self.k.append(k)
        self.v.append(v)
        self.cos.append(cos)
        self.sin.append(sin)

    def on_write(self, kv):
        """kv = [K, V] of positions 0..n-1 as the layer writes them to its cache; when position n-1
        fills a page, the page `residual` tokens back is replaced by its quantized values."""
        k, v = kv
        n = k.shape[2]
        first = n - self.layout.residual
        if n % PAGE_TOKENS or first < 0:
            return kv
        page = slice(first, first + PAGE_TOKENS)
        kq = self.layout.keys(torch.cat(self.k[page], dim=2))
        if self.layout.pre_rope:
            kq = apply_rope(kq, torch.cat(self.cos[page]), torch.cat(self.sin[page]))
        k, v = k.clone(), v.clone()
        k[:, :, page] = kq
        v[:, :, page] = self.layout.rows(torch.cat(self.v[page], dim=2))
        return [k, v]


class CacheWrite:
    """The cache as one layer's step sees it: its own write goes through on_write."""

    def __init__(self, cache, idx, on_write):
        self.cache, self.idx, self.on_write = cache, idx, on_write

    def __contains__(self, key):
        return key in self.cache

    def __getitem__(self, key):
        return self.cache[key]

    def __setitem__(self, key, kv):
        self.cache[key] = self.on_write(kv) if key == self.idx else kv


def set_kv_types(model, types, jitter_seed=None):
    """Makes each KV layer's K/V pass through its layout's fake quantization (layer -> Layout):
    as the token is written (r0), or page by page as pages leave the bf16 residual. With
    jitter_seed, every K/V value is moved one ulp at random first."""
    g = None if jitter_seed is None else torch.Generator().manual_seed(jitter_seed)
    for layer in model.model.layers:
        att = layer.self_attn
        if not att.computes_kv:
            continue
        layout = types[att.idx]
        residual = Residual(layout) if layout.residual else None

        def kv_of(x, cos, sin, att=att, layout=layout, residual=residual):
            B, T, _ = x.shape
            k = att.k_proj(x).view(B, T, att.kh, att.d).transpose(1, 2)
            v = att.v_proj(x).view(B, T, att.kh, att.d).transpose(1, 2)
            if not layout.pre_rope:
                k = apply_rope(k, cos, sin)
            if g is not None:
                k, v = ulp_jitter(k, g), ulp_jitter(v, g)
            if residual is None:
                k, v = layout.keys(k), layout.rows(v)
            else:
                k, v = k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
                residual.append(k, v, cos, sin)
            return (apply_rope(k, cos, sin) if layout.pre_rope else k), v

        att.kv_of = kv_of
        if residual is not None:
            base_step = type(att).step.__get__(att)

            def step(x, cos, sin, cache, p, att=att, base_step=base_step, residual=residual):
                if p == 0:
                    residual.reset()
                return base_step(x, cos, sin, CacheWrite(cache, att.idx, residual.on_write), p)

            att.step = step


@torch.no_grad()
def perplexity(model, groups, late_from):
    """Perplexity over every predicted token, and over those predicted from a context of at least
    late_from tokens (where a bf16 residual is a smaller share of what attention reads)."""
    nll, count, late_nll, late_count = 0.0, 0, 0.0, 0
    for g in groups:
        logits = model.forward_sequential(g) if model.group is not None else model(g)[0]
        tok = F.cross_entropy(logits[:, :-1].transpose(1, 2).double(), g[:, 1:], reduction="none")
        nll += tok.sum().item()
        count += tok.numel()
        late_nll += tok[:, late_from - 1:].sum().item()
        late_count += tok[:, late_from - 1:].numel()
    late = math.exp(late_nll / late_count) if late_count else None
    return math.exp(nll / count), nll / count, count, late, late_count


CHECK_SOURCE = r"""
#include <cstdio>
#include <vector>
#include "engine/kv_format.h"
using namespace lckv;
// stdin: int32 type, int32 rows, int32 headDim, rows*headDim f32; stdout: the values read back.
int main() {
  int32_t t, rows, hd;
  if (fread(&t, 4, 1, stdin) != 1 || fread(&rows, 4, 1, stdin) != 1 || fread(&hd, 4, 1, stdin) != 1) return 1;
  std::vector<float> x((size_t)rows * hd), out(x.size());
  if (fread(x.data(), 4, x.size(), stdin) != x.size()) return 1;
  const KvType type = (KvType)t;
  std::vector<uint8_t> codes((size_t)hd * 4);
  for (int r = 0; r < rows; ++r) {
    const float s = kvF16ToF32(kvQuantizeHead(type, &x[(size_t)r * hd], hd, codes.data()));
    for (int i = 0; i < hd; ++i) out[(size_t)r * hd + i] = kvDecode(type, kvCodeAt(type, codes.data(), i), s);
  }
  fwrite(out.data(), 4, out.size(), stdout);
  return 0;
}
"""


def check_rule(head_dim: int) -> dict:
    """Compares kv_fake_quant with kv_format.h bit for bit; returns the rows checked per type."""
    g = torch.Generator().manual_seed(0)
    rows = []
    # random heads over 40 binades (subnormal f16 scales at the bottom)
    for e in range(-30, 10):
        rows.append(torch.randn(64, head_dim, generator=g) * 2.0 ** e)
    # heads with outliers, and heads past 65504 * M (saturating codes)
    r = torch.randn(64, head_dim, generator=g)
    r[:, 0] *= 50
    rows += [r, torch.randn(8, head_dim, generator=g) * 1e8, torch.zeros(2, head_dim)]
    # exact ties: amax = M * 2^k makes s a power of two, so (j + 0.5) * s rounds to even
    for m in (7.0, 127.0):
        t = (torch.randint(-int(m), int(m), (32, head_dim), generator=g).float() + 0.5)
        t[:, 0] = m
        rows.append(t * 0.25)
    x = torch.cat(rows).contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "kv_rule.cpp"), os.path.join(tmp, "kv_rule")
        with open(src, "w") as f:
            f.write(CHECK_SOURCE)
        subprocess.run(["g++", "-std=c++17", "-O2", "-I", os.path.join(ROOT, "native"), src, "-o", exe], check=True)
        result = {}
        for code, name in enumerate(["f32", "bf16", "fp8", "int8", "int4"]):
            header = torch.tensor([code, x.shape[0], head_dim], dtype=torch.int32).numpy().tobytes()
            p = subprocess.run([exe], input=header + x.numpy().tobytes(), capture_output=True, check=True)
            want = torch.frombuffer(bytearray(p.stdout), dtype=torch.float32).view(x.shape)
            got = kv_fake_quant(x, name)
            same = torch.equal(want.view(torch.int32), got.contiguous().view(torch.int32))
            if not same:
                bad = (want.view(torch.int32) != got.contiguous().view(torch.int32)).nonzero()[:5].tolist()
                raise SystemExit(f"--check-rule: {name} differs from kv_format.h at {bad}")
            result[name] = x.shape[0]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "default"))
    ap.add_argument("--text", required=True)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES, help="type assignments (see above)")
    ap.add_argument("--no-bos", action="store_true", help="encode without BOS, as `lckv eval-ppl` does")
    ap.add_argument("--check-rule", action="store_true", help="first check the fake quantization against kv_format.h")
    ap.add_argument("--ulp-jitter", type=int, default=None, metavar="SEED",
                    help="move every K/V value one ulp up or down at random before quantizing: how much a "
                         "perplexity moves when K/V differ by rounding, as between two f32 implementations")
    ap.add_argument("--late-from", type=int, default=128, metavar="N",
                    help="also report the perplexity of the tokens predicted from a context of at least N tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model = load_model(a.model, torch.device("cpu"))
    cfg = model.cfg
    kv_layers = sorted(set(cfg.targets))
    if a.check_rule:
        print(json.dumps({"check_rule": "bit-exact against native/engine/kv_format.h", "rows": check_rule(cfg.head_dim)}), flush=True)

    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text, add_special_tokens=not a.no_bos).ids[:a.max_tokens]
    groups = windows(ids, a.window)

    rows, f32, f32_late = [], None, None
    for spec in a.types:
        types = parse_assignment(spec, kv_layers)
        model = load_model(a.model, torch.device("cpu"))
        set_kv_types(model, types, a.ulp_jitter)
        t0 = time.time()
        ppl, nll, count, late, late_count = perplexity(model, groups, a.late_from)
        if all(t.spec == "f32" for t in types.values()):
            f32, f32_late = ppl, late
        row = {
            "model": os.path.basename(os.path.abspath(a.model)),
            "types": spec,
            "layer_types": {str(k): v.spec for k, v in types.items()},
            "kv_bytes_per_token": sum(slot_bytes_per_token(t, cfg.num_key_value_heads, cfg.head_dim) for t in types.values()),
            "perplexity": ppl,
            "mean_nll": nll,
            "predicted_tokens": count,
            "vs_f32": None if f32 is None else ppl / f32 - 1,
            "late_from": a.late_from,
            "late_perplexity": late,
            "late_predicted_tokens": late_count,
            "late_vs_f32": None if f32_late is None or late is None else late / f32_late - 1,
            "bos": not a.no_bos,
            "ulp_jitter": a.ulp_jitter,
            "seconds": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def pct(r, key):
        return "" if r[key] is None or r["types"] == "f32" else f"{r[key] * 100:+.3f}%"

    print(f"| K/V types ({', '.join(f'layer {i}' for i in kv_layers)}) | bytes/token | perplexity | vs f32 "
          f"| perplexity from position {a.late_from} | vs f32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        late = "" if r["late_perplexity"] is None else f"{r['late_perplexity']:.4f}"
        print(f"| {' / '.join(r['layer_types'][str(i)] for i in kv_layers)} | {r['kv_bytes_per_token']:,.0f} "
              f"| {r['perplexity']:.4f} | {pct(r, 'vs_f32')} | {late} | {pct(r, 'late_vs_f32')} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"options": vars(a), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
