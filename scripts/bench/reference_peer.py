"""The LCKV peer: the project's own PyTorch reference (scripts/reference/lckv_reference.py), run
on the GPU in bf16 at batch 1, token by token with its per-layer cache.

    python3 scripts/bench/reference_peer.py --model DIR --context 128 --tokens 16

Prints one JSON line: decode ms per step (median of --repeats after a warm-up)."""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
from lckv_reference import Reference  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_default_device("cuda")
    ref = Reference.from_dir(args.model, dtype=torch.bfloat16)
    ref.w = {k: v.cuda() for k, v in ref.w.items()}
    ref.lm_head = ref.lm_head.cuda()
    if hasattr(ref, "inv_freq"):
        ref.inv_freq = ref.inv_freq.cuda()
    vocab = ref.lm_head.shape[0]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (args.context,), generator=g, device="cpu").tolist()

    def run():
        with torch.no_grad():
            state = ref.new_state()
            for t in prompt:
                logits = state.step(t)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                logits = state.step(int(torch.argmax(logits)))
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / args.tokens

    run()
    times = sorted(run() for _ in range(args.repeats))
    ms = times[len(times) // 2] * 1e3
    print(json.dumps({"peer": "lckv PyTorch reference (bf16, batch 1)", "batch": 1, "context": args.context, "msPerStep": ms,
                      "tokPerS": 1e3 / ms, "spread": (times[-1] - times[0]) / times[len(times) // 2]}), flush=True)


if __name__ == "__main__":
    main()
