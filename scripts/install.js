#!/usr/bin/env node
// npm install hook: use a prebuild (prebuilds/<platform>-<arch>/) when one loads here,
// otherwise build the addon from source with cmake-js (incremental when build/ exists, so a
// checkout whose C++ changed is rebuilt, never served a stale binary). Either way it ends with
// one line saying which backends the addon carries and, when CUDA is missing, why and how to
// get it.
const { spawnSync } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");

const root = path.join(__dirname, "..");
const forceSource = process.env.npm_config_build_from_source === "true";
const prebuilds = path.join(root, "prebuilds", `${process.platform}-${process.arch}`);

function report(how) {
  let cudaBuilt = false;
  try {
    cudaBuilt = require("node-gyp-build")(root).backends.cudaBuilt;
  } catch {
    // the addon does not load: the build's own error has been printed
  }
  if (cudaBuilt) {
    console.log(`lckv: ${how} with the CUDA and CPU backends.`);
    return;
  }
  let why = "";
  try {
    why = JSON.parse(fs.readFileSync(path.join(root, "build", "lckv-build.json"), "utf8")).cudaSkipped;
  } catch {
    // a prebuild: no build record
  }
  console.log(
    `lckv: ${how} with the CPU backend only${why ? ` (${why})` : ""}. For the CUDA backend, install the ` +
      "CUDA toolkit with cuBLASLt and rebuild: npm rebuild lckv --build-from-source (README: GPU requirements).",
  );
}

if (!forceSource && fs.existsSync(prebuilds)) {
  try {
    require("node-gyp-build")(root);
    report(`using the prebuilt addon for ${process.platform}-${process.arch}`);
    process.exit(0);
  } catch {
    // the prebuild does not load here: build below
  }
}
const cmakeJs = require.resolve("cmake-js/bin/cmake-js", { paths: [root] });
const r = spawnSync(process.execPath, [cmakeJs, "compile", "--log-level", "warn"], { stdio: "inherit", cwd: root });
if (r.status === 0) report("built the addon");
process.exit(r.status ?? 1);
