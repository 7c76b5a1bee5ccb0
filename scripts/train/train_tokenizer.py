"""Trains the byte-level BPE tokenizer of the default model (vocabulary 4096).

    python3 scripts/train/train_tokenizer.py --corpus .data/corpus --out .data/tokenizer

Training text: the training parts of the five corpus files only (split rule in data.py: the
last ~200 KB of each file, cut at a line boundary, is validation and is never read here).
Tokenizer: ByteLevel pre-tokenizer (add_prefix_space false, GPT-2 regex) and decoder, BPE
without unknown token (every byte is in the alphabet), special tokens <|bos|> (id 0) and
<|eos|> (id 1), and a TemplateProcessing post-processor that prepends <|bos|> to a single
sequence. Writes tokenizer.json and tokenizer_config.json, then checks that
decode(encode(x)) == x on the validation text and on every training part.
"""
import argparse
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402

BOS, EOS = "<|bos|>", "<|eos|>"


def build(corpus: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    splits = data.read_splits(corpus)
    tok.train_from_iterator(data.line_chunks([tr for _, tr, _ in splits]), trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1, "special token ids must be 0 and 1"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, 0)],
    )
    return tok


def check_round_trip(tok: Tokenizer, text: str, what: str):
    enc = tok.encode(text)
    assert enc.ids[0] == 0, "single sequences must start with <|bos|>"
    back = tok.decode(enc.ids, skip_special_tokens=True)
    if back != text:
        n = next((i for i, (a, b) in enumerate(zip(back, text)) if a != b), min(len(back), len(text)))
        raise SystemExit(f"round trip failed on {what} at character {n}: {text[n:n+40]!r} -> {back[n:n+40]!r}")
    print(f"round trip ok: {what} ({len(text)} characters, {len(enc.ids) - 1} tokens)")
    return len(enc.ids) - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=data.DEFAULT_CORPUS)
    ap.add_argument("--out", default=".data/tokenizer")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--model-max-length", type=int, default=256)
    a = ap.parse_args()

    tok = build(a.corpus, a.vocab_size)
    assert tok.get_vocab_size() == a.vocab_size, tok.get_vocab_size()
    os.makedirs(a.out, exist_ok=True)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": a.model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")

    # Check the saved file, as others will load it.
    tok = Tokenizer.from_file(os.path.join(a.out, "tokenizer.json"))
    val = data.validation_text(a.corpus)
    nval = check_round_trip(tok, val, "validation text")
    ntrain = 0
    for name, tr, _ in data.read_splits(a.corpus):
        ntrain += check_round_trip(tok, tr, f"training part of {name}")
    print(f"tokens: training {ntrain}, validation {nval}; bytes/token on validation {len(val.encode()) / nval:.3f}")
    print(f"wrote {a.out}/tokenizer.json and tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
