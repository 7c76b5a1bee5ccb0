/**
 * How node-llama-cpp is built on the GPU machine and found again: one place for both. The build
 * options are package.json's "llamaBuild" (CUDA for sm_90 only); build-on-device.sh passes them
 * to `node-llama-cpp source build` as NODE_LLAMA_CPP_CMAKE_OPTION_* variables (its convention for
 * custom CMake options), which puts the build in llama/localBuilds/<platform>-<arch>-cuda-<hash
 * of the options>; getLlama() finds that folder again when given the same gpu and cmakeOptions,
 * with build "never" (nothing is compiled or downloaded at run time).
 *
 *   node scripts/bench/llama-peer/build-options.js --env    # the variables, as shell exports
 */
const path = require("node:path");
const { pathToFileURL } = require("node:url");

const { llamaBuild } = require("./package.json");

/** The CMake options of the build for `device` ("cuda": package.json's; "cpu": none). */
function cmakeOptions(device) {
  return device === "cuda" ? llamaBuild.cmakeOptions : {};
}

/** node-llama-cpp from `install` (the folder prepare.sh installed it in) and its Llama for `device`. */
async function loadLlama(install, device) {
  const pkgDir = path.resolve(install, "node_modules", "node-llama-cpp");
  const nlc = await import(pathToFileURL(path.join(pkgDir, "dist", "index.js")).href);
  const llama = await nlc.getLlama({
    gpu: device === "cuda" ? llamaBuild.gpu : false,
    cmakeOptions: cmakeOptions(device),
    build: "never",
    usePrebuiltBinaries: false,
    skipDownload: true,
    progressLogs: false,
    logLevel: nlc.LlamaLogLevel.warn,
  });
  if (device === "cuda" && llama.gpu !== llamaBuild.gpu) throw new Error(`node-llama-cpp loaded a ${llama.gpu || "CPU"} build, not ${llamaBuild.gpu}`);
  return { nlc, llama, version: require(path.join(pkgDir, "package.json")).version };
}

module.exports = { loadLlama, cmakeOptions, llamaBuild };

if (require.main === module && process.argv.includes("--env")) {
  for (const [k, v] of Object.entries(llamaBuild.cmakeOptions)) console.log(`export NODE_LLAMA_CPP_CMAKE_OPTION_${k}=${JSON.stringify(v)}`);
  console.log(`export LLAMA_PEER_GPU=${llamaBuild.gpu}`);
}
