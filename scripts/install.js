#!/usr/bin/env node
// npm install hook: use a prebuild (prebuilds/<platform>-<arch>/) when one loads here,
// otherwise build the addon from source with cmake-js (incremental when build/ exists, so a
// checkout whose C++ changed is rebuilt, never served a stale binary).
const { spawnSync } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");

const root = path.join(__dirname, "..");
const forceSource = process.env.npm_config_build_from_source === "true";
const prebuilds = path.join(root, "prebuilds", `${process.platform}-${process.arch}`);
if (!forceSource && fs.existsSync(prebuilds)) {
  try {
    require("node-gyp-build")(root);
    process.exit(0);
  } catch {
    // the prebuild does not load here: build below
  }
}
const cmakeJs = require.resolve("cmake-js/bin/cmake-js", { paths: [root] });
const r = spawnSync(process.execPath, [cmakeJs, "compile", "--log-level", "warn"], { stdio: "inherit", cwd: root });
process.exit(r.status ?? 1);
