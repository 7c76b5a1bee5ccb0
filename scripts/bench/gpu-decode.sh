#!/usr/bin/env bash
# Batch-1 decode of the TinyLlama-1.1B shape (random bf16 weights), standard and LCKV w=2,
# against the memory roofline measured in the same run. Needs the addon and dist/ built.
set -euo pipefail
out=${OUT:-/tmp}
gbps=$(python3 scripts/bench/copy_bandwidth.py)
echo "device-to-device copy: ${gbps} GB/s"
lt="0$(printf '_20%.0s' $(seq 1 20))_21"
node scripts/bench/make-random-model.js --out /tmp/lckv-bench-std
node scripts/bench/make-random-model.js --out /tmp/lckv-bench-lckv --layer-types "$lt"
for m in std lckv; do
  node scripts/bench/decode.js --model /tmp/lckv-bench-$m --context 128,2048 --tokens 64 --copy-gbps "$gbps" | tee -a "$out/decode.jsonl"
done
# The peer in the same run: transformers' eager generate() on the standard model.
python3 scripts/bench/hf_peer.py --model /tmp/lckv-bench-std --context 128,2048 --tokens 32 | tee -a "$out/decode.jsonl"
python3 scripts/bench/hf_peer.py --model /tmp/lckv-bench-std --context 512 --tokens 32 --batch 64 | tee -a "$out/decode.jsonl"
