"""Perplexity of a model directory on a text file, in PyTorch, with lckv's windowing rule.

    python3 scripts/train/eval_ppl.py --model DIR --text FILE --window 256 [--max-tokens N]

Rule (the same as lckv's eval-ppl): ids = tokenizer.encode(text) without special tokens (first
--max-tokens of them if given); non-overlapping windows of N tokens; inside each window,
tokens 1..len-1 are predicted from their prefix in the window; a final window shorter than
2 tokens is dropped; perplexity = exp(mean NLL). Weights are read from model.safetensors and
computed in f32 (no TF32), like lckv's CPU backend.

A model whose layer_types give a cyclic group (LCKV) is scored three ways:
  sequential   token by token with a K/V cache: the exact semantics;
  fixed-point  the iterative scheme repeated until a pass writes the K/V it read, at most
               N passes (exact as well; also reports the passes it needed);
  iterative    the iterative scheme with m + b passes (forward_passes + backward_passes), as
               in training (lckv: --prefill iterative --prefill-passes m+b).
Other models are scored with one causal pass. --hf-check also loads the directory with
transformers' AutoModelForCausalLM (llama only) and compares logits on the first windows.
Prints one JSON object per line.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import CausalLM, ModelConfig, count_parameters  # noqa: E402


def load_model(d: str, dev) -> CausalLM:
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    model = CausalLM(ModelConfig.from_hf(hf))
    sd = load_file(os.path.join(d, "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(dev).eval()


def windows(ids, n):
    """Groups of equal-length windows: [(tensor [k, len])]."""
    full = [ids[i:i + n] for i in range(0, len(ids), n)]
    full = [w for w in full if len(w) >= 2]
    groups = {}
    for w in full:
        groups.setdefault(len(w), []).append(w)
    return [torch.tensor(g, dtype=torch.long) for g in groups.values()]


@torch.no_grad()
def score(model, groups, mode, dev, batch):
    nll, count, passes = 0.0, 0, []
    for g in groups:
        for i in range(0, g.shape[0], batch):
            x = g[i:i + batch].to(dev)
            if mode == "sequential":
                logits, p = model.forward_sequential(x), 1
            elif mode == "fixed-point":
                logits, p = model(x, fixed_point=True)
            elif mode == "iterative":
                m, b = model.cfg.forward_passes, model.cfg.backward_passes
                logits, p = model(x, passes_nograd=m + b - 1, passes_grad=1)
            else:
                logits, p = model(x)
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += x[:, 1:].numel()
            passes.append(p)
    mean = nll / count
    return {"perplexity": math.exp(mean), "mean_nll": mean, "predicted_tokens": count, "passes_max": max(passes)}


def prepare(model_dir: str, text_file: str, window: int, max_tokens=None):
    """(model, window groups, device, description) for scoring model_dir on text_file: f32 without TF32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text, add_special_tokens=False).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    groups = windows(ids, window)
    model = load_model(model_dir, dev)
    base = {"model": model_dir, "text": os.path.basename(text_file), "tokens": len(ids), "window": window,
            "windows": sum(g.shape[0] for g in groups), "parameters": count_parameters(model)}
    return model, groups, dev, base


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--modes", default=None, help="comma-separated subset of sequential,fixed-point,iterative")
    ap.add_argument("--hf-check", action="store_true")
    a = ap.parse_args()
    model, groups, dev, base = prepare(a.model, a.text, a.window, a.max_tokens)
    if model.group is None:
        modes = ["single-pass"]
    else:
        modes = a.modes.split(",") if a.modes else ["sequential", "fixed-point", "iterative"]
    for mode in modes:
        t0 = time.time()
        r = score(model, groups, mode, dev, a.batch)
        print(json.dumps({**base, "mode": mode, **r, "seconds": round(time.time() - t0, 1)}), flush=True)

    if model.group is not None:
        # the exact modes must agree with each other on real windows
        x = groups[0][:64].to(dev)
        with torch.no_grad():
            ls = model.forward_sequential(x)
            lf, p = model(x, fixed_point=True)
            m, b = model.cfg.forward_passes, model.cfg.backward_passes
            li, _ = model(x, passes_nograd=m + b - 1, passes_grad=1)
        print(json.dumps({"check": "sequential vs fixed-point logits", "max_abs_diff": (ls - lf).abs().max().item(),
                          "fixed_point_passes": p,
                          "iterative_vs_sequential_max_abs_diff": (ls - li).abs().max().item()}), flush=True)
    if a.hf_check:
        from transformers import AutoModelForCausalLM
        hfm = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev).eval()
        x = groups[0][:16].to(dev)
        with torch.no_grad():
            mine, _ = model(x)
            theirs = hfm(x).logits
        print(json.dumps({"check": "transformers logits", "class": type(hfm).__name__,
                          "max_abs_diff": (mine - theirs).abs().max().item()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
