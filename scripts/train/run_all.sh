#!/usr/bin/env bash
# Trains the default model and its standard twin, and scores both in PyTorch.
#
#   bash scripts/train/run_all.sh RUN_DIR
#
# Needs the corpus unpacked in .data/corpus (see data.py) and one CUDA GPU. Writes
# RUN_DIR/validation.txt, RUN_DIR/{lckv,standard}/ (Hugging Face directories with
# train_log.json) and RUN_DIR/eval-*.jsonl. If ARCHIVE_DIR is set, each model directory is
# also packed there as NAME.tgz as soon as it is saved.
set -euo pipefail
RUN=${1:?usage: run_all.sh RUN_DIR}
HERE=$(dirname "$0")
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1

python3 "$HERE/data.py" --corpus .data/corpus --write-val "$RUN/validation.txt"
python3 "$HERE/train_tokenizer.py" --corpus .data/corpus --out .data/tokenizer

for name in lckv standard; do
  python3 "$HERE/train.py" --config "$HERE/configs/$name.json" --out "$RUN/$name"
  if [ -n "${ARCHIVE_DIR:-}" ]; then tar czf "$ARCHIVE_DIR/$name.tgz" -C "$RUN" "$name"; fi
done

for name in lckv standard; do
  for max in full 20000; do
    extra=(); [ "$max" = full ] || extra=(--max-tokens "$max")
    [ "$name" = standard ] && [ "$max" = full ] && extra+=(--hf-check)
    python3 "$HERE/eval_ppl.py" --model "$RUN/$name" --text "$RUN/validation.txt" --window 256 "${extra[@]}" \
      | grep '^{' | tee "$RUN/eval-$name-$max.jsonl"
  done
done
