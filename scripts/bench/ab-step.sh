#!/usr/bin/env bash
# Decode step times of two builds of lckv side by side on one GPU: the tree it is run from and
# a base tree (another checkout, built the same way), alternating base and candidate so that
# clock and thermal drift fall on both. Used to show that a change keeps step times.
#
#   scripts/bench/ab-step.sh <base tree> [runs] [profile-step args ...] [-- more args ...]
#   scripts/bench/ab-step.sh ../lckv-base 2 --context 128 --batch 1 -- --context 2048 --batch 16
#   scripts/bench/ab-step.sh ../lckv-base 2 --prefill 2048 --kv-dtype bf16   (prompt times)
#
# Each "--"-separated group of profile-step.js arguments is one configuration. Both trees must
# be built (addon and dist/). The random model is written once and shared by both.
set -euo pipefail
base=$1; shift
runs=${1:-2}; shift || true
here=$(cd "$(dirname "$0")/../.." && pwd)
configs=(); cur=""
for a in "$@"; do
  if [ "$a" = "--" ]; then configs+=("$cur"); cur=""; else cur="$cur $a"; fi
done
[ -n "$cur" ] && configs+=("$cur")
[ ${#configs[@]} -gt 0 ] || configs=(" --context 128 --batch 1")
for cfg in "${configs[@]}"; do
  for ((i = 1; i <= runs; i++)); do
    for tree in "$base" "$here"; do
      label=$([ "$tree" = "$here" ] && echo candidate || echo base)
      # shellcheck disable=SC2086
      printf '%-9s %s\n' "$label" "$(node "$tree/scripts/bench/profile-step.js" $cfg)"
    done
  done
done
