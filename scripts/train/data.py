"""Corpus split shared by the training scripts (no PyTorch needed).

Corpus: the five UTF-8 files of corpus-en-pd.tar.xz (austen.txt, brown.txt, kjv_bible.txt,
sotu.txt, web_bible.txt; public domain or freely redistributable English prose), unpacked
into a folder, by default `.data/corpus` (git-ignored):

    mkdir -p .data/corpus && tar xJf corpus-en-pd.tar.xz -C .data/corpus

Split rule (VALIDATION_BYTES = 200000):
  for each file, taken as bytes, let c = len(file) - 200000; if byte c-1 is not a newline,
  move c forward to just after the next newline. Bytes [c, end) are that file's validation
  part, bytes [0, c) its training part. Nothing from a validation part is ever used for
  training (neither the tokenizer nor the model).
The validation text is the five validation parts concatenated in the order of FILES
(each part ends with a newline). Write it with

    python3 scripts/train/data.py --corpus .data/corpus --write-val validation.txt

(977,167 bytes; its SHA-256 is printed).

Calibration text for `lckv condense` (docs/condense.md): the first CALIBRATION_BYTES (40,000)
bytes of each file's training part, extended to the end of that line, concatenated in the order
of FILES; it never overlaps the validation text:

    python3 scripts/train/data.py --corpus .data/corpus --write-calib calib.txt
"""
import argparse
import hashlib
import os
import sys

FILES = ["austen.txt", "brown.txt", "kjv_bible.txt", "sotu.txt", "web_bible.txt"]
VALIDATION_BYTES = 200_000
CALIBRATION_BYTES = 40_000
DEFAULT_CORPUS = ".data/corpus"


def split_bytes(raw: bytes, val_bytes: int = VALIDATION_BYTES):
    """Returns (train, validation) bytes of one file by the rule above."""
    cut = max(0, len(raw) - val_bytes)
    if cut > 0 and raw[cut - 1:cut] != b"\n":
        nl = raw.find(b"\n", cut)
        cut = len(raw) if nl < 0 else nl + 1
    return raw[:cut], raw[cut:]


def read_splits(corpus: str = DEFAULT_CORPUS):
    """Returns [(name, train_text, val_text)] for the five files, in FILES order."""
    out = []
    for name in FILES:
        path = os.path.join(corpus, name)
        with open(path, "rb") as f:
            raw = f.read()
        tr, va = split_bytes(raw)
        out.append((name, tr.decode("utf-8"), va.decode("utf-8")))
    return out


def validation_text(corpus: str = DEFAULT_CORPUS) -> str:
    parts = []
    for _, _, va in read_splits(corpus):
        parts.append(va if va.endswith("\n") else va + "\n")
    return "".join(parts)


def calibration_text(corpus: str = DEFAULT_CORPUS, size: int = CALIBRATION_BYTES) -> str:
    parts = []
    for _, tr, _ in read_splits(corpus):
        raw = tr.encode("utf-8")
        nl = raw.find(b"\n", size - 1)
        parts.append(raw[: len(raw) if nl < 0 else nl + 1].decode("utf-8"))
    return "".join(parts)


def line_chunks(texts, size=1 << 16):
    """Yields pieces of about `size` characters of each text, each cut just after a newline."""
    for t in texts:
        i = 0
        while i < len(t):
            j = t.find("\n", i + size)
            j = len(t) if j < 0 else j + 1
            yield t[i:j]
            i = j


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--write-val", metavar="FILE", help="write the validation text to FILE")
    ap.add_argument("--write-calib", metavar="FILE", help="write the calibration text to FILE")
    a = ap.parse_args()
    for name, tr, va in read_splits(a.corpus):
        print(f"{name}: train {len(tr.encode())} bytes, validation {len(va.encode())} bytes")
    if a.write_val:
        text = validation_text(a.corpus).encode("utf-8")
        with open(a.write_val, "wb") as f:
            f.write(text)
        print(f"wrote {a.write_val}: {len(text)} bytes, sha256 {hashlib.sha256(text).hexdigest()}")
    if a.write_calib:
        text = calibration_text(a.corpus).encode("utf-8")
        with open(a.write_calib, "wb") as f:
            f.write(text)
        print(f"wrote {a.write_calib}: {len(text)} bytes, sha256 {hashlib.sha256(text).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
