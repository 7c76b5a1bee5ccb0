#!/usr/bin/env node
// npm install hook: use a prebuild (prebuilds/<platform>-<arch>/) when one loads here,
// otherwise build the addon from source with cmake-js.
const { spawnSync } = require("node:child_process");
const path = require("node:path");

const root = path.join(__dirname, "..");
const forceSource = process.env.npm_config_build_from_source === "true";
if (!forceSource) {
  try {
    require("node-gyp-build")(root);
    process.exit(0);
  } catch {
    // no usable prebuild or earlier build: build below
  }
}
const cmakeJs = require.resolve("cmake-js/bin/cmake-js", { paths: [root] });
const r = spawnSync(process.execPath, [cmakeJs, "compile", "--log-level", "warn"], { stdio: "inherit", cwd: root });
process.exit(r.status ?? 1);
