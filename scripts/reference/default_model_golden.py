"""Golden outputs of the shipped default model (models/default) from the PyTorch reference.

    python3 scripts/reference/default_model_golden.py --out test/fixtures/default-model.golden.json

Writes the prompt ids (from the model's own tokenizer.json, Python `tokenizers`), the exact
(sequential) prefill logits of the last position, and a 32-token greedy continuation with the
smallest top-1 minus top-2 logit gap along it. Weights are used exactly as stored (bf16 -> f64).
"""
import argparse
import json
import os
import sys

from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lckv_reference import Reference  # noqa: E402

PROMPT = "It was a truth universally acknowledged"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    ids = tok.encode(PROMPT).ids
    ref = Reference.from_dir(args.model)
    logits = ref.forward_sequential(ids)
    tokens, gap = ref.greedy(ids, args.new_tokens)
    golden = {
        "source": "scripts/reference/default_model_golden.py (lckv_reference.Reference, sequential)",
        "prompt": PROMPT,
        "prompt_ids": ids,
        "last_logits": [float(f"{x:.7g}") for x in logits[-1].tolist()],
        "greedy": {"tokens": tokens, "min_top2_gap": float(f"{gap:.7g}"), "text": tok.decode(tokens)},
    }
    with open(args.out, "w") as f:
        json.dump(golden, f)
        f.write("\n")
    print(f"prompt ids {ids}\ngreedy {tokens}\nmin top-2 gap {gap:.4g}\ntext {golden['greedy']['text']!r}")


if __name__ == "__main__":
    main()
