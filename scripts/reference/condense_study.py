#!/usr/bin/env python3
"""Perplexity against the fraction of K/V kept, for lckv condense's `linear` and `share` and for
MiniCache's SLERP merge (docs/condense.md).

    python scripts/reference/condense_study.py --model DIR --calib train-slice.txt --text validation.txt \\
        [--fractions 1,0.75,0.5,0.33,0.25] [--max-tokens 20000] [--window 256] [--t 0.6] \\
        [--kv-dtypes f32,int8,int4] [--device cpu|cuda] [--jobs N] [--keep DIR] [--json FILE]

`linear` and `share` are condensed and scored by the engine (scripts/eval/condense-study.js, so
dist/ must be built), in each K/V cache type of --kv-dtypes; --keep keeps the condensed models
(DIR/<method>-<fraction>). SLERP is computed here, in the PyTorch reference, with an f32 cache
(forward_merged_cache: token by token, each token's K/V of a merged pair of layers merged once
the token is done), one window per process, --jobs processes (default: one per core); the
engine's condensing runs meanwhile, --jobs models at a time.
Both score the same predictions: the engine's windowing (lib/eval.ts: non-overlapping windows,
tokens 1..len-1 of each predicted from their prefix in the window), the same token ids, and the
source model's perplexity is computed on both sides and must agree. Calibration text and
evaluation text must not overlap (the corpus's training part and its validation text).
Prints a Markdown table (markdown_table: the rows of docs/condense.md's tables).
"""
import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from lckv_reference import Config, Reference, forward_merged_cache, minicache_pairs  # noqa: E402


def windows(ids, n):
    """The engine's windows (lib/eval.ts): ids[w*n : (w+1)*n], a last one shorter than 2 dropped."""
    return [ids[s:s + n] for s in range(0, len(ids), n) if len(ids[s:s + n]) >= 2]


_reference = None


def _load_reference(model_dir):
    global _reference
    torch.set_num_threads(1)  # one window per process: the processes fill the cores
    _reference = Reference.from_dir(model_dir, dtype=torch.float32)


def _window_nll(task):
    """(summed NLL, predicted tokens) of one window: the plain forward (pairs None) or the merged cache."""
    pairs, t, win = task
    if pairs is None:
        logits = _reference.forward_iterative(win)
    else:
        logits = forward_merged_cache(_reference, win, pairs, t)
    logp = torch.log_softmax(logits.to(torch.float64)[:-1], dim=-1)
    return -float(logp.gather(1, torch.tensor(win[1:])[:, None]).sum()), len(win) - 1


def reference_perplexities(model_dir, ids, window, runs, t, jobs):
    """Perplexity of each run (None: the plain forward; else the merged pairs), windows spread over processes."""
    wins = windows(ids, window)
    tasks = [(pairs, t, w) for pairs in runs for w in wins]
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks)), initializer=_load_reference, initargs=(model_dir,)) as pool:
        res = pool.map(_window_nll, tasks, chunksize=1)
    out = []
    for r in range(len(runs)):
        part = res[r * len(wins):(r + 1) * len(wins)]
        out.append(math.exp(sum(n for n, _ in part) / sum(c for _, c in part)))
    return out


def start_engine_study(a, ratios, json_out):
    """linear and share through lckv condense and the engine's perplexity (condense-study.js), in a child process."""
    cmd = ["node", os.path.join(ROOT, "scripts", "eval", "condense-study.js"), "--model", a.model, "--calib", a.calib,
           "--text", a.text, "--ratios", ",".join(map(str, ratios)), "--methods", "linear,share",
           "--kv-dtypes", a.kv_dtypes, "--max-tokens", str(a.max_tokens), "--calib-tokens", str(a.calib_tokens),
           "--window", str(a.window), "--device", a.device, "--jobs", str(a.jobs), "--json", json_out]
    if a.keep:
        cmd += ["--keep", a.keep]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def pct(x, base):
    d = (x / base - 1) * 100
    return f"{d:+.2f}%" if abs(d) < 1 else f"{d:+.1f}%"


def markdown_table(result):
    """The study as rows of docs/condense.md's tables: perplexity in each K/V cache type, percentages
    against the source model with an f32 cache."""
    dtypes = result["kv_dtypes"]
    L = result["layers"]
    src = result["source"]["engine"]
    base = src["f32"]
    head = "| method | K/V kept | layer_types or merged pairs | " + " | ".join(
        "perplexity, f32 cache" if d == "f32" else f"{d} cache" for d in dtypes) + " |"
    lines = [head, "|" + "---|" * (3 + len(dtypes))]

    def cells(ppl):
        return [("—" if ppl.get(d) is None else f"{ppl[d]:.4f}" + ("" if ppl is src and d == "f32" else f" ({pct(ppl[d], base)})"))
                for d in dtypes]

    lines.append(f"| source | {L}/{L} | | " + " | ".join(cells(src)) + " |")
    for e in result["rows"]:
        if e["kept"] == L:
            continue
        kept = f"{e['kept']}/{L} ({round(100 * e['kept'] / L)}%)"
        for method in ("linear", "share"):
            m = e[method]
            lines.append(f"| {method} | {kept} | `{m['layer_types']}` | " + " | ".join(cells(m["perplexity"])) + " |")
        s = e["slerp"]
        if s is not None:
            pairs = ", ".join(f"{p}+{q}" for p, q in s["pairs"])
            lines.append(f"| SLERP (t = {result['t']}) | {kept} | {pairs} | " + " | ".join(cells(s["perplexity"])) + " |")
    return "\n".join(lines)


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
    ap.add_argument("--kv-dtypes", default="f32", help="K/V cache types linear and share are scored in (f32 always)")
    ap.add_argument("--device", default="cpu", help="the engine's device for linear and share")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="processes for SLERP, models condensed at a time (default: the cores this process may use)")
    ap.add_argument("--keep", help="keep the condensed models in this directory")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    dtypes = a.kv_dtypes.split(",")
    if "f32" not in dtypes:
        dtypes.insert(0, "f32")
    a.kv_dtypes = ",".join(dtypes)

    from tokenizers import Tokenizer

    with open(os.path.join(a.model, "config.json")) as f:
        L = Config(json.load(f)).num_layers
    with open(a.text, encoding="utf-8") as f:
        ids = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json")).encode(f.read(), add_special_tokens=False).ids
    ids = ids[:a.max_tokens]
    fractions = [float(x) for x in a.fractions.split(",")]
    ratios = [f for f in fractions if f < 1]
    # SLERP's pairs depend only on how many layers are kept: lckv condense's rounding (Math.round).
    kept_of = {f: L if f >= 1 else math.floor(L * f + 0.5) for f in fractions}
    slerp_runs = sorted({k for k in kept_of.values() if minicache_pairs(L, k)}, reverse=True)

    with tempfile.TemporaryDirectory() as tmp:
        engine_json = os.path.join(tmp, "study.json")
        t0 = time.time()
        engine = start_engine_study(a, ratios, engine_json)
        ref_ppl = reference_perplexities(a.model, ids, a.window, [None] + [minicache_pairs(L, k) for k in slerp_runs],
                                         a.t, a.jobs)
        print(f"reference (source and SLERP {slerp_runs} of {L}): {time.time() - t0:.0f} s", file=sys.stderr)
        if engine.wait() != 0:
            raise SystemExit(f"condense-study.js failed (exit status {engine.returncode})")
        print(f"linear and share: {time.time() - t0:.0f} s", file=sys.stderr)
        with open(engine_json) as f:
            rows = json.load(f)["rows"]
    source_ref = ref_ppl[0]
    slerp_ppl = dict(zip(slerp_runs, ref_ppl[1:]))
    source_engine = {r["kvCacheDtype"]: r["perplexity"] for r in rows if r["method"] == "source"}
    # The same predictions on both sides: a different tokenization or windowing shows here.
    assert abs(source_ref / source_engine["f32"] - 1) < 1e-3, \
        f"source perplexity: reference {source_ref}, engine {source_engine['f32']}"

    table = []
    for f in fractions:
        kept = kept_of[f]
        if any(e["kept"] == kept for e in table):
            continue  # two fractions that round to the same number of layers
        entry = {"fraction": f, "kept": kept, "layers": L}
        for method in ("linear", "share"):
            if f >= 1:
                entry[method] = {"perplexity": source_engine, "layer_types": None}
                continue
            mine = [r for r in rows if r.get("ratio") == f and r["method"] == method]
            assert mine[0]["kvLayers"] == kept, (f, mine[0]["kvLayers"], kept)
            entry[method] = {"perplexity": {r["kvCacheDtype"]: r["perplexity"] for r in mine},
                             "layer_types": mine[0]["layerTypes"], "held_out": mine[0]["heldOut"],
                             "condense_seconds": mine[0]["condenseSeconds"]}
        pairs = minicache_pairs(L, kept)
        entry["slerp"] = None if pairs is None else \
            {"perplexity": {"f32": source_ref if not pairs else slerp_ppl[kept]}, "pairs": pairs}
        table.append(entry)

    result = {"options": vars(a), "layers": L, "kv_dtypes": dtypes, "t": a.t, "tokens": len(ids),
              "source": {"engine": source_engine, "reference": source_ref}, "rows": table}
    print(markdown_table(result))
    print(f"\nsource perplexity: engine {source_engine['f32']:.4f}, reference {source_ref:.4f}; {len(ids)} tokens, "
          f"windows of {a.window}. SLERP merges pairs of layers, so it cannot keep less than half; it is "
          f"computed with an f32 cache only (—).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
