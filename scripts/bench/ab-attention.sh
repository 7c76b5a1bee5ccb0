#!/usr/bin/env bash
# A/B of the decode attention kernels alone (experiment 5 / 7's "attention alone", counting each
# K/V type's own bytes: codes + scales) between two BUILT trees (addon with CUDA + dist/).
# Builds nothing.
#
#   scripts/bench/ab-attention.sh <base tree> <candidate tree> [rounds=3]
#
# Env: TYPES (default "fp8 int8 bf16"), SEQS (default "16 128"), CONTEXT (4096),
#      QUERIES (default 1, a decode step; more: each sequence's last QUERIES positions, causal,
#      a prompt's chunk, reported in TFLOP/s of its products instead of GB/s), DTYPE (the
#      weights' type, "f32" or "bf16": with bf16 a call of more than 16 rows writes its output
#      in bf16, as the engine's does),
#      SHAPE "heads kvHeads headDim" (default TinyLlama's "32 4 64"), ITER (50 calls per sample,
#      as experiment 7), SAMPLES (5 per round), COPY_GBPS (else measured with
#      scripts/bench/device_rates.py, which needs torch), CHECK=0 to skip the result comparison,
#      BACKEND=cpu (with a tiny SHAPE/CONTEXT and COPY_GBPS) only to check the script itself.
#
# Rounds alternate base and candidate so clock/thermal drift falls on both. Then, unless
# CHECK=0, both trees run checkBackendOps (attention ops, same seed) and the relative errors
# per case are compared: identical numbers for every case are strong evidence of bit-identical
# outputs (a case whose split-K count differs between the trees may differ in the last bits).
set -euo pipefail
base=$(cd "$1" && pwd); cand=$(cd "$2" && pwd); rounds=${3:-3}
TYPES=${TYPES:-"fp8 int8 bf16"}; SEQS=${SEQS:-"16 128"}; CONTEXT=${CONTEXT:-4096}
SHAPE=${SHAPE:-"32 4 64"}; ITER=${ITER:-50}; SAMPLES=${SAMPLES:-5}; BACKEND=${BACKEND:-cuda}
QUERIES=${QUERIES:-1}; DTYPE=${DTYPE:-f32}
for t in "$base" "$cand"; do
  [ -d "$t/dist" ] || { echo "no dist/ in $t (npx tsc -p tsconfig.json)"; exit 2; }
done
if [ "$QUERIES" -gt 1 ]; then
  COPY_GBPS=${COPY_GBPS:-0}  # a prompt's chunk is rated by its products, not its bytes
elif [ -z "${COPY_GBPS:-}" ]; then
  COPY_GBPS=$(python3 "$base/scripts/bench/device_rates.py" | python3 -c 'import json,sys; print(json.load(sys.stdin)["copyGBps"])') \
    || { echo "set COPY_GBPS (device_rates.py needs torch)"; exit 2; }
fi
echo "copy bandwidth ${COPY_GBPS} GB/s; shape heads/kvHeads/headDim = ${SHAPE}; context ${CONTEXT}; queries ${QUERIES}; weights ${DTYPE}"

# One tree, one configuration: prints the median ms of SAMPLES samples, then what a call does:
# its bytes (a decode step) or its products (QUERIES > 1), and the samples' spread.
run_one() {  # tree type seqs
  node -e '
    const [tree, type, seqs, ctx, heads, kvHeads, hd, iters, samples, backend, queries, dtype] = process.argv.slice(1);
    const { loadAddon } = require(tree + "/dist/native");
    const addon = loadAddon();
    if (!addon.backends || !addon.backends[backend]) { console.error(tree + ": addon built without " + backend); process.exit(3); }
    const args = { backend, sequences: +seqs, context: +ctx, numHeads: +heads, numKvHeads: +kvHeads, headDim: +hd, kvCacheDtype: type, queries: +queries, dtype };
    const first = addon.benchAttention({ ...args, iterations: 3 });
    if (+queries > 1 && !(first.flops > 0)) { console.error(tree + ": its benchAttention has no queries option"); process.exit(3); }
    const t = []; let work = 0;
    for (let i = 0; i < +samples; i++) { const r = addon.benchAttention({ ...args, iterations: +iters }); t.push(r.ms); work = +queries > 1 ? r.flops : r.bytes; }
    t.sort((a, b) => a - b);
    console.log(t[Math.floor(t.length / 2)], work, (t[t.length - 1] - t[0]) / t[Math.floor(t.length / 2)]);
  ' "$1" "$2" "$3" "$CONTEXT" $SHAPE "$ITER" "$SAMPLES" "$BACKEND" "$QUERIES" "$DTYPE"
}
# Work per second: GB/s of a decode step's bytes (and its share of the copy rate), or TFLOP/s.
rate() {  # ms work
  python3 -c "
ms,w,q,cp=$1,$2,$QUERIES,$COPY_GBPS
if q > 1: print(f'{w/(ms/1e3)/1e12:9.1f} TFLOP/s')
else: g=w/(ms/1e3)/1e9; print(f'{g:9.0f} GB/s {100*g/cp:5.1f}% of copy')"
}

declare -A best
printf '%-9s %-5s %5s %10s %-26s %7s\n' tree type seqs "us/call" rate spread
for ((r = 1; r <= rounds; r++)); do
  for type in $TYPES; do
    for seqs in $SEQS; do
      for label in base candidate; do
        tree=$([ "$label" = candidate ] && echo "$cand" || echo "$base")
        read -r ms bytes spread < <(run_one "$tree" "$type" "$seqs")
        printf '%-9s %-5s %5s %10.1f %-26s %6.1f%%\n' "$label" "$type" "$seqs" "$(python3 -c "print($ms*1e3)")" "$(rate "$ms" "$bytes")" \
          "$(python3 -c "print(100*$spread)")"
        key="$label $type $seqs"
        prev=${best[$key]:-}
        if [ -z "$prev" ] || python3 -c "import sys; sys.exit(0 if $ms < $prev else 1)"; then best[$key]=$ms; fi
      done
    done
  done
done
echo
echo "best of ${rounds} rounds (lowest median):"
printf '%-5s %5s %-26s %-26s %8s\n' type seqs base candidate speedup
for type in $TYPES; do
  for seqs in $SEQS; do
    read -r _ work _ < <(run_one "$base" "$type" "$seqs" 2>/dev/null || echo "0 0 0")
    b=${best[base $type $seqs]}; c=${best[candidate $type $seqs]}
    printf '%-5s %5s %-26s %-26s %7.2fx\n' "$type" "$seqs" "$(rate "$b" "$work")" "$(rate "$c" "$work")" "$(python3 -c "print($b/$c)")"
  done
done

[ "${CHECK:-1}" = 0 ] && exit 0
echo
echo "attention op checks (checkBackendOps against the CPU, same seed in both trees):"
check() {  # tree -> JSON lines "op|shape relErr tolerance"
  node -e '
    const { loadAddon } = require(process.argv[1] + "/dist/native");
    const rs = loadAddon().checkBackendOps({ backend: process.argv[2], dtype: "f32", seed: 12345, ops: ["attention", "attention fp8 codes"] });
    for (const r of rs) console.log(JSON.stringify([r.op + " " + r.shape, r.relErr, r.tolerance, r.allWritten]));
  ' "$1" "$BACKEND"
}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
check "$base" > "$tmp/base.jsonl"
check "$cand" > "$tmp/cand.jsonl"
AB_BASE="$tmp/base.jsonl" AB_CAND="$tmp/cand.jsonl" python3 - <<'PY'
import json
import os
b = [json.loads(l) for l in open(os.environ['AB_BASE'])]
c = [json.loads(l) for l in open(os.environ['AB_CAND'])]
bm = {x[0]: x for x in b}
same = diff = fail = 0
for name, err, tol, written in c:
    if not written or err > tol:
        fail += 1
        print(f"  FAILS in candidate: {name}: relErr {err:.3g} > {tol:.3g} or unwritten")
    if name not in bm:
        print(f"  only in candidate: {name}")
        continue
    if bm[name][1] == err:
        same += 1
    else:
        diff += 1
        print(f"  differs: {name}: base {bm[name][1]!r} candidate {err!r}")
print(f"{len(c)} cases: {same} identical relErr, {diff} different, {fail} failing")
PY
