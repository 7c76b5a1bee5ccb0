"""The peer: Hugging Face transformers' eager generate() on the same model directory and shapes.

    python3 scripts/bench/hf_peer.py --model DIR --context 128,2048 --tokens 64 [--batch 1] [--caches dynamic,static]
                                     [--static-context 2048]

Prints one JSON line per cache and context: decode ms per step and tokens per second (batch x
steps / time), with the prefill timed separately and subtracted, median of --repeats after a
warm-up. Both caches run in one process, so the model is loaded once.

With cache_implementation="static", transformers' generate() compiles the decoding forward with
torch.compile on a CUDA GPU (its automatic compile of compilable caches), so that peer is
compiled, not eager: its rows say so when the model was compiled, and the warm-up that includes
the compile is timed and printed to stderr. Each new static cache length compiles again, which
is why the static cache can run at fewer contexts (--static-context).
"""
import sys
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def compiled(model):
    # transformers keeps its automatically compiled forward on the model (_compiled_call).
    return getattr(model, "_compiled_call", None) is not None


def run(model, args, static):
    vocab = model.config.vocab_size
    extra = {"cache_implementation": "static"} if static else {}
    contexts = args.static_context if static and args.static_context else args.context
    for ctx in [int(c) for c in contexts.split(",")]:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (args.batch, ctx), generator=g).cuda()
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)

        # Warm-up with the longest call: transformers sizes a static cache for the call and reuses
        # it for shorter ones, so the timed calls do not recompile (a warm-up of 2 tokens made
        # the first timed call of args.tokens + 1 rebuild the cache and recompile).
        warm = timed(lambda: gen(args.tokens + 1))
        log(f"hf_peer: {'static' if static else 'dynamic'} cache, batch {args.batch}, context {ctx}: warm-up {warm:.1f} s")
        times = []
        for _ in range(args.repeats):
            prefill = timed(lambda: gen(1))
            total = timed(lambda: gen(args.tokens + 1))
            times.append((total - prefill) / args.tokens)
        times.sort()
        ms = times[len(times) // 2] * 1e3
        name = "transformers eager" if not static else "transformers static cache" + (" (torch.compile)" if compiled(model) else " (eager)")
        print(json.dumps({"peer": name, "batch": args.batch,
                          "context": ctx, "msPerStep": ms, "tokPerS": args.batch * 1e3 / ms,
                          "spread": (times[-1] - times[0]) / times[len(times) // 2]}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", default="128,2048")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--caches", default="dynamic",
                    help="comma-separated: dynamic (transformers' default cache), static (cache_implementation='static')")
    ap.add_argument("--static-context", default=None, help="contexts for the static cache (default: --context)")
    args = ap.parse_args()
    caches = args.caches.split(",")
    for cache in caches:
        if cache not in ("dynamic", "static"):
            ap.error(f"--caches: unknown cache '{cache}' (expected dynamic or static)")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
    log(f"hf_peer: model loaded in {time.perf_counter() - t0:.1f} s")
    for cache in caches:
        run(model, args, cache == "static")


if __name__ == "__main__":
    main()
