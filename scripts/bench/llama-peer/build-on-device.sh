#!/usr/bin/env bash
# On the GPU machine (no network, no npm; node on the PATH, CUDA 13, cmake, ninja), from the
# project root, with .llama-peer/pack carried (prepare.sh made it):
#   1. unpacks node-llama-cpp into .llama-peer/install (again only when the pack changed);
#   2. builds llama.cpp with CUDA for sm_90 only through node-llama-cpp's own `source build --gpu
#      cuda`, with the CMake options of package.json's "llamaBuild" as its NODE_LLAMA_CPP_CMAKE_OPTION_*
#      variables: the build lands in llama/localBuilds/linux-x64-cuda-<hash of the options>, where
#      getLlama({ gpu: "cuda", cmakeOptions, build: "never" }) finds it (build-options.js). It
#      compiles with node-llama-cpp's choice of jobs (cores - 2: 14 on the 16-core host), about 5
#      minutes; a build already there is kept;
#   3. loads the build once and prints what it found (peer.mjs --check).
#
#   bash scripts/bench/llama-peer/build-on-device.sh [--cpu]
#
# --cpu builds for the CPU instead (prepare.sh --cpu-build uses it to check these steps without a GPU).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$root"
device=cuda
[ "${1:-}" = "--cpu" ] && device=cpu
pack=.llama-peer/pack/node-llama-cpp.tar.xz
install=.llama-peer/install
nlc=$install/node_modules/node-llama-cpp
[ -f "$pack" ] || { echo "build-on-device.sh: no $pack: run scripts/bench/llama-peer/prepare.sh and carry .llama-peer/pack" >&2; exit 1; }

# By content, not by date: a pack carried again on every call must not throw away the build.
sum=$(sha256sum "$pack" | cut -d' ' -f1)
if [ "$(cat "$install/.unpacked" 2>/dev/null)" != "$sum" ]; then
  rm -rf "$install"
  tar -C .llama-peer -xJf "$pack"
  echo "$sum" > "$install/.unpacked"
fi

# node-llama-cpp compiles by running `npm run -s cmake-js-llama -- <args>`, its package script
# `cd llama && cmake-js <args>`. There is no npm here: this stand-in runs that script, nothing else.
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
cat > "$shim/npm" <<EOF
#!/usr/bin/env bash
set -e
if [ "\$1 \$2 \$3 \$4" != "run -s cmake-js-llama --" ]; then
  echo "npm stand-in of build-on-device.sh: only 'npm run -s cmake-js-llama -- ...' is known, got: npm \$*" >&2
  exit 1
fi
shift 4
cd "$root/$nlc/llama"
exec node "$root/$install/node_modules/cmake-js/bin/cmake-js" "\$@"
EOF
chmod +x "$shim/npm"
export PATH="$shim:$PATH"

if [ "$device" = cuda ]; then
  if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
  eval "$(node scripts/bench/llama-peer/build-options.js --env)"
  gpu=$LLAMA_PEER_GPU
else
  gpu=false
fi

if node scripts/bench/llama-peer/peer.mjs --check --install "$install" --device "$device" > /dev/null 2>&1; then
  echo "node-llama-cpp's $device build is there already"
else
  start=$(date +%s)
  node "$nlc/dist/cli/cli.js" source build --gpu "$gpu" --noUsageExample
  echo "built llama.cpp for $device in $(( $(date +%s) - start )) s"
fi
node scripts/bench/llama-peer/peer.mjs --check --install "$install" --device "$device"
