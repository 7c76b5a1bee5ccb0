#!/usr/bin/env bash
# Run here (a machine with npm and the registry), once per change of node-llama-cpp's version:
#   1. installs node-llama-cpp (package.json, locked by package-lock.json) into .llama-peer/install
#      (git-ignored), without its install scripts and without its optional prebuilt binaries
#      (the CUDA one alone is 159 MB, for every architecture);
#   2. puts llama.cpp's source where its `source build` looks for it (llama/llama.cpp), cloned from
#      the git bundle the package ships, with node-llama-cpp's own patches (`source download
#      --skipBuild`), and records which llama.cpp that is (llama-source.json);
#   3. checks the project's GGUF writer against node-llama-cpp's reader (check-gguf.mjs);
#   4. packs what the GPU machine needs into .llama-peer/pack/node-llama-cpp.tar.xz: the package
#      and its dependencies, and the llama.cpp source less what a CUDA build does not read (the
#      bundle itself, models, docs, tools, examples, tests, the other GPU backends).
# Then carry .llama-peer/pack to the GPU machine and run build-on-device.sh there.
#
#   bash scripts/bench/llama-peer/prepare.sh [--cpu-build]
#
# --cpu-build also unpacks the pack into a scratch folder, builds llama.cpp for this machine's CPU
# from it with build-on-device.sh --cpu (the same steps as on the GPU machine; slow on few
# cores), and runs peer.mjs on a tiny GGUF: a check of the whole path short of CUDA.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
here=scripts/bench/llama-peer
install=.llama-peer/install
nlc=$install/node_modules/node-llama-cpp

mkdir -p "$install"
cp "$here/package.json" "$here/package-lock.json" "$install/"
(cd "$install" && npm ci --ignore-scripts --omit=optional --no-audit --no-fund --loglevel=error)

if [ ! -d "$nlc/llama/llama.cpp/.git" ]; then
  node "$nlc/dist/cli/cli.js" source download --skipBuild --noUsageExample 2>&1 | tail -n 2
fi
# The squashed commit of the bundle and the message of the llama.cpp commit it was made from.
node -e '
  const { execFileSync } = require("node:child_process");
  const dir = process.argv[1];
  const git = (...a) => execFileSync("git", ["-C", dir, ...a], { encoding: "utf8" }).trim();
  const body = git("log", "-1", "--format=%B").split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("## SQUASHED"));
  const info = require(require("node:path").resolve(dir, "..", "llama.cpp.info.json"));
  console.log(JSON.stringify({ repo: info.llamaCppGithubRepo, tag: info.tag, commit: git("rev-parse", "HEAD"), title: body[0] ?? "" }, null, 1));
' "$nlc/llama/llama.cpp" > "$install/llama-source.json"
echo "llama.cpp source: $(tr -d '\n' < "$install/llama-source.json")"

node "$here/check-gguf.mjs" "$install"

stage=$(mktemp -d)
scratch=""
trap 'rm -rf "$stage" ${scratch:+"$scratch"}' EXIT
cp -a "$install" "$stage/install"
snlc=$stage/install/node_modules/node-llama-cpp
rm -rf "$snlc/llama/gitRelease.bundle" "$snlc/llama/localBuilds" "$snlc/llama/lastBuild.json" "$snlc/.temp"
(
  cd "$snlc/llama/llama.cpp"
  rm -rf .git .github .devops ci models docs tools examples tests benches media gguf-py conversion scripts pocs app skills requirements
  (cd ggml/src && rm -rf ggml-cann ggml-openvino ggml-webgpu ggml-et ggml-metal ggml-hexagon ggml-sycl ggml-vulkan ggml-opencl ggml-virtgpu ggml-zdnn ggml-zendnn ggml-musa ggml-hip)
  # node-llama-cpp takes a folder with a .git for a cloned source (llama.cpp's build reads its
  # commit from git and says "unknown" in an empty repository); the commit is in llama-source.json.
  git init -q . && rm -rf .git/hooks
)
mkdir -p .llama-peer/pack
tar -C "$stage" -cf - install | xz -T0 -9 > .llama-peer/pack/node-llama-cpp.tar.xz
echo "packed .llama-peer/pack/node-llama-cpp.tar.xz: $(du -h .llama-peer/pack/node-llama-cpp.tar.xz | cut -f1) (carry .llama-peer/pack; build-on-device.sh unpacks and builds it)"

if [ "${1:-}" = "--cpu-build" ]; then
  scratch=$(mktemp -d)
  mkdir -p "$scratch/repo"
  git ls-files -z --cached --others --exclude-standard scripts/bench | xargs -0 -I{} cp --parents {} "$scratch/repo/"
  ln -s "$root/node_modules" "$scratch/repo/node_modules"
  mkdir -p "$scratch/repo/.llama-peer" && cp -a .llama-peer/pack "$scratch/repo/.llama-peer/"
  (cd "$scratch/repo" && bash "$here/build-on-device.sh" --cpu)
  gguf=$scratch/tiny.gguf
  node scripts/bench/make-gguf.js --out "$gguf" --layers 2 --hidden 64 --heads 4 --kv-heads 2 --intermediate 96 --vocab 512 > /dev/null
  node -e '
    const [install, gguf, planFile] = process.argv.slice(1);
    const rows = [
      { id: "decode", kind: "decode", weights: "f16", file: gguf, kv: "F16", batch: 3, context: 20 },
      { id: "decode-kvq8", kind: "decode", weights: "f16", file: gguf, kv: "Q8_0", batch: 2, context: 20 },
      { id: "prefill", kind: "prefill", weights: "f16", file: gguf, kv: "F16", batch: 1, context: 32 },
    ];
    require("node:fs").writeFileSync(planFile, JSON.stringify({ install, device: "cpu", vocab: 512, repeats: 2, steps: 3, warmUp: 2, rows }));
  ' "$scratch/repo/.llama-peer/install" "$gguf" "$scratch/plan.json"
  node "$here/peer.mjs" --plan "$scratch/plan.json"
fi
