#!/usr/bin/env node
/**
 * Checks the project's GGUF writer against node-llama-cpp's own GGUF reader: writes a small model
 * in F16, Q8_0 and Q4_0 with make-gguf.js's llamaGguf(), reads each back with readGgufFileInfo(),
 * and compares the metadata, every tensor's name, dimensions, type and offset, and the file size
 * with what the writer says it wrote. Run by prepare.sh after installing node-llama-cpp.
 *
 *   node scripts/bench/llama-peer/check-gguf.mjs <install folder>
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const require = createRequire(import.meta.url);
const { writeGguf, GGML_TYPES, tensorBytes } = require("../gguf-writer.js");
const { llamaGguf } = require("../make-gguf.js");

const install = process.argv[2];
if (!install) {
  console.error("usage: check-gguf.mjs <folder where node-llama-cpp is installed>");
  process.exit(2);
}
const { readGgufFileInfo } = await import(pathToFileURL(path.join(install, "node_modules", "node-llama-cpp", "dist", "index.js")).href);

const shape = { layers: 2, hidden: 64, heads: 4, kvHeads: 2, intermediate: 96, vocab: 300, maxPositions: 4096, normEps: 1e-5, ropeTheta: 10000 };
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "lckv-gguf-check-"));
const problems = [];
const expect = (what, got, want) => {
  if (got !== want) problems.push(`${what}: read ${JSON.stringify(got)}, wrote ${JSON.stringify(want)}`);
};
try {
  for (const type of ["f16", "q8_0", "q4_0"]) {
    const file = path.join(dir, `${type}.gguf`);
    const plan = llamaGguf(shape, type, 7);
    const written = writeGguf(file, plan);
    const info = await readGgufFileInfo(file, { logWarnings: true });
    const meta = Object.fromEntries(plan.metadata.map(([k, v]) => [k, v.value]));
    const at = (key) => key.split(".").reduce((o, k) => o?.[k], info.metadata);
    expect(`${type}: version`, info.version, 3);
    expect(`${type}: tensor count`, Number(info.tensorCount), plan.tensors.length);
    for (const [key, value] of Object.entries(meta)) {
      const got = at(key);
      if (Array.isArray(value)) {
        expect(`${type}: ${key} length`, got?.length, value.length);
        for (const i of [0, 1, 2, 3, 10, value.length - 1]) expect(`${type}: ${key}[${i}]`, got?.[i], value[i]);
      } else if (typeof value === "number" && !Number.isInteger(value)) {
        expect(`${type}: ${key}`, Math.fround(got), Math.fround(value));
      } else {
        expect(`${type}: ${key}`, got, value);
      }
    }
    info.tensorInfo.forEach((t, i) => {
      const w = written.tensors[i];
      expect(`${type}: tensor ${i} name`, t.name, w.name);
      expect(`${type}: ${w.name} dimensions`, t.dimensions.map(Number).join("x"), w.dims.join("x"));
      expect(`${type}: ${w.name} ggml type`, t.ggmlType, GGML_TYPES[w.type].id);
      expect(`${type}: ${w.name} offset`, Number(t.offset), w.offset);
      expect(`${type}: ${w.name} file offset`, Number(t.fileOffset), written.dataStart + w.offset);
    });
    const last = written.tensors[written.tensors.length - 1];
    expect(`${type}: file size`, fs.statSync(file).size, written.dataStart + Math.ceil((last.offset + tensorBytes(last.type, last.dims)) / written.alignment) * written.alignment);
    if (!problems.length) console.log(`readGgufFileInfo reads make-gguf.js's ${type} file back: ${info.tensorInfo.length} tensors, ${Object.keys(meta).length} metadata keys, offsets and size as written`);
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
if (problems.length) {
  console.error(`the GGUF writer and node-llama-cpp's reader disagree:\n  ${problems.join("\n  ")}`);
  process.exit(1);
}
