#!/usr/bin/env node
// prebuildify drives node-gyp; this project builds with cmake-js. prebuildify runs the program
// named by PREBUILD_NODE_GYP as `<it> rebuild --target=... --release|--debug ...` and then picks
// up build/Release/*.node, which is exactly where `cmake-js rebuild` puts the addon.
const { spawnSync } = require("node:child_process");
const path = require("node:path");

const debug = process.argv.includes("--debug");
const cmakeJs = require.resolve("cmake-js/bin/cmake-js", { paths: [process.cwd()] });
const r = spawnSync(process.execPath, [cmakeJs, "rebuild", "--log-level", "warn", ...(debug ? ["--debug"] : [])], {
  stdio: "inherit",
  cwd: process.cwd(),
});
process.exit(r.status ?? 1);
