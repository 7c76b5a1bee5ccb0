#!/usr/bin/env bash
# A/B of the decode attention kernels alone (experiment 5 / 7's "attention alone", counting each
# K/V type's own bytes: codes + scales) between two BUILT trees (addon with CUDA + dist/).
# Builds nothing.
#
#   scripts/bench/ab-attention.sh <base tree> <candidate tree> [rounds=3]
#
# Env: TYPES (default "fp8 int8 bf16"), SEQS (default "16 128"), CONTEXT (4096),
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
for t in "$base" "$cand"; do
  [ -d "$t/dist" ] || { echo "no dist/ in $t (npx tsc -p tsconfig.json)"; exit 2; }
done
if [ -z "${COPY_GBPS:-}" ]; then
  COPY_GBPS=$(python3 "$base/scripts/bench/device_rates.py" | python3 -c 'import json,sys; print(json.load(sys.stdin)["copyGBps"])') \
    || { echo "set COPY_GBPS (device_rates.py needs torch)"; exit 2; }
fi
echo "copy bandwidth ${COPY_GBPS} GB/s; shape heads/kvHeads/headDim = ${SHAPE}; context ${CONTEXT}"

# One tree, one configuration: prints the median ms of SAMPLES samples and the bytes.
run_one() {  # tree type seqs
  node -e '
    const [tree, type, seqs, ctx, heads, kvHeads, hd, iters, samples, backend] = process.argv.slice(1);
    const { loadAddon } = require(tree + "/dist/native");
    const addon = loadAddon();
    if (!addon.backends || !addon.backends[backend]) { console.error(tree + ": addon built without " + backend); process.exit(3); }
    const args = { backend, sequences: +seqs, context: +ctx, numHeads: +heads, numKvHeads: +kvHeads, headDim: +hd, kvCacheDtype: type };
    addon.benchAttention({ ...args, iterations: 3 });
    const t = []; let bytes = 0;
    for (let i = 0; i < +samples; i++) { const r = addon.benchAttention({ ...args, iterations: +iters }); t.push(r.ms); bytes = r.bytes; }
    t.sort((a, b) => a - b);
    console.log(t[Math.floor(t.length / 2)], bytes, (t[t.length - 1] - t[0]) / t[Math.floor(t.length / 2)]);
  ' "$1" "$2" "$3" "$CONTEXT" $SHAPE "$ITER" "$SAMPLES" "$BACKEND"
}

declare -A best
printf '%-9s %-5s %5s %10s %9s %8s %7s\n' tree type seqs "us/call" "GB/s" "of copy" spread
for ((r = 1; r <= rounds; r++)); do
  for type in $TYPES; do
    for seqs in $SEQS; do
      for label in base candidate; do
        tree=$([ "$label" = candidate ] && echo "$cand" || echo "$base")
        read -r ms bytes spread < <(run_one "$tree" "$type" "$seqs")
        line=$(python3 -c "ms,b,c,sp=$ms,$bytes,$COPY_GBPS,$spread; g=b/(ms/1e3)/1e9; print(f'{ms*1e3:10.1f} {g:9.0f} {100*g/c:7.1f}% {100*sp:6.1f}%')")
        printf '%-9s %-5s %5s %s\n' "$label" "$type" "$seqs" "$line"
        key="$label $type $seqs"
        prev=${best[$key]:-}
        if [ -z "$prev" ] || python3 -c "import sys; sys.exit(0 if $ms < $prev else 1)"; then best[$key]=$ms; fi
      done
    done
  done
done
echo
echo "best of ${rounds} rounds (lowest median):"
printf '%-5s %5s %12s %12s %9s %9s %8s\n' type seqs "base GB/s" "cand GB/s" "base %" "cand %" speedup
for type in $TYPES; do
  for seqs in $SEQS; do
    read -r _ bytes _ < <(run_one "$base" "$type" "$seqs" 2>/dev/null || echo "0 0 0")
    python3 -c "
b,c,by,cp=${best[base $type $seqs]},${best[candidate $type $seqs]},$bytes,$COPY_GBPS
gb=by/(b/1e3)/1e9; gc=by/(c/1e3)/1e9
print(f'{\"$type\":5s} {$seqs:5d} {gb:12.0f} {gc:12.0f} {100*gb/cp:8.1f}% {100*gc/cp:8.1f}% {b/c:7.2f}x')"
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
