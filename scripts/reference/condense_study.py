#!/usr/bin/env python3
"""Perplexity against the fraction of K/V kept, for lckv condense's `linear` and `share` and for
MiniCache's SLERP merge (docs/condense.md).

    python scripts/reference/condense_study.py --model DIR --calib train-slice.txt --text validation.txt \\
        [--fractions 1,0.75,0.5,0.33,0.25] [--max-tokens 20000] [--window 256] [--t 0.6] [--json FILE]

`linear` and `share` are condensed and scored by the engine (scripts/eval/condense-study.js, so
dist/ must be built); SLERP is computed here, in the PyTorch reference (forward_merged_cache:
token by token, each token's K/V of a merged pair of layers merged once the token is done).
Both score the same predictions: the engine's windowing (lib/eval.ts: non-overlapping windows,
tokens 1..len-1 of each predicted from their prefix in the window), the same token ids, and the
source model's perplexity is computed on both sides and must agree. Calibration text and
evaluation text must not overlap (the corpus's training part and its validation text).
Prints a Markdown table.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from lckv_reference import Reference, forward_merged_cache, minicache_pairs  # noqa: E402


def windows(ids, n):
    """The engine's windows (lib/eval.ts): ids[w*n : (w+1)*n], a last one shorter than 2 dropped."""
    return [ids[s:s + n] for s in range(0, len(ids), n) if len(ids[s:s + n]) >= 2]


def perplexity(logits_of, ids, window):
    nll, count = 0.0, 0
    for win in windows(ids, window):
        logits = logits_of(win).to(torch.float64)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= float(logp.gather(1, torch.tensor(win[1:])[:, None]).sum())
        count += len(win) - 1
    return math.exp(nll / count)


def engine_study(a, ratios):
    """linear and share through lckv condense and the engine's perplexity: the rows of condense-study.js."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "study.json")
        cmd = ["node", os.path.join(ROOT, "scripts", "eval", "condense-study.js"), "--model", a.model, "--calib", a.calib,
               "--text", a.text, "--ratios", ",".join(map(str, ratios)), "--methods", "linear,share",
               "--max-tokens", str(a.max_tokens), "--calib-tokens", str(a.calib_tokens), "--window", str(a.window),
               "--device", a.device, "--json", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["rows"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a standard model directory")
    ap.add_argument("--calib", required=True, help="calibration text for condense (not overlapping --text)")
    ap.add_argument("--text", required=True, help="evaluation text")
    ap.add_argument("--fractions", default="1,0.75,0.5,0.33,0.25", help="fractions of the layers' K/V kept")
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--t", type=float, default=0.6, help="SLERP interpolation parameter (MiniCache: 0.6)")
    ap.add_argument("--device", default="cpu", help="the engine's device for linear and share")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    from tokenizers import Tokenizer

    ref = Reference.from_dir(a.model, dtype=torch.float32)
    L = ref.cfg.num_layers
    with open(a.text, encoding="utf-8") as f:
        ids = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json")).encode(f.read(), add_special_tokens=False).ids
    ids = ids[:a.max_tokens]
    fractions = [float(x) for x in a.fractions.split(",")]
    ratios = [f for f in fractions if f < 1]

    t0 = time.time()
    rows = [r for r in engine_study(a, ratios) if r["kvCacheDtype"] == "f32"]
    print(f"linear and share: {time.time() - t0:.0f} s", file=sys.stderr)
    source_engine = next(r["perplexity"] for r in rows if r["method"] == "source")
    source_ref = perplexity(lambda w: ref.forward_iterative(w), ids, a.window)
    # The same predictions on both sides: a different tokenization or windowing shows here.
    assert abs(source_ref / source_engine - 1) < 1e-3, f"source perplexity: reference {source_ref}, engine {source_engine}"

    table = []
    for f in fractions:
        kept = L if f >= 1 else next(r["kvLayers"] for r in rows if r.get("ratio") == f)
        if any(e["kept"] == kept for e in table):
            continue  # two fractions that round to the same number of layers
        entry = {"fraction": f, "kept": kept, "layers": L}
        for method in ("linear", "share"):
            r = next((r for r in rows if r.get("ratio") == f and r["method"] == method), None)
            entry[method] = {"perplexity": source_engine, "layer_types": None} if f >= 1 else \
                {"perplexity": r["perplexity"], "layer_types": r["layerTypes"]}
        pairs = minicache_pairs(L, kept)
        if pairs is None:
            entry["slerp"] = None
        else:
            t1 = time.time()
            ppl = source_ref if not pairs else perplexity(lambda w: forward_merged_cache(ref, w, pairs, a.t), ids, a.window)
            entry["slerp"] = {"perplexity": ppl, "pairs": pairs}
            print(f"SLERP {kept}/{L}: {ppl:.4f} ({time.time() - t1:.0f} s)", file=sys.stderr)
        table.append(entry)

    def cell(x, extra):
        if x is None:
            return "—"
        return f"{x['perplexity']:.4f} ({(x['perplexity'] / source_engine - 1) * 100:+.1f}%){extra(x)}"

    lines = [f"| K/V kept | linear | share | SLERP (t = {a.t}) |", "|---|---|---|---|"]
    for e in table:
        lt = lambda x: f" `{x['layer_types']}`" if x["layer_types"] else ""  # noqa: E731
        pr = lambda x: " " + ",".join(f"{p}+{q}" for p, q in x["pairs"]) if x["pairs"] else ""  # noqa: E731
        lines.append(f"| {e['kept']}/{L} ({round(100 * e['kept'] / L)}%) | {cell(e['linear'], lt)} | "
                     f"{cell(e['share'], lt)} | {cell(e['slerp'], pr)} |")
    print("\n".join(lines))
    print(f"\nsource perplexity: engine {source_engine:.4f}, reference {source_ref:.4f}; {len(ids)} tokens, "
          f"windows of {a.window}. SLERP merges pairs of layers, so it cannot keep less than half (—).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"options": vars(a), "source": {"engine": source_engine, "reference": source_ref}, "rows": table},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
