/** Regressions for defects found in review: each once crashed, blocked or leaked. */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { Worker } from "node:worker_threads";
import { loadModel } from "../../lib";
import { loadAddon } from "../../lib/native";
import { writeTinyModel } from "../helpers/tiny-model";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";

test("a lying tensor shape whose element count overflows 64 bits is an error, not a crash", async () => {
  const addon = loadAddon();
  const m = new addon.NativeModel(
    {
      style: "gpt2", numLayers: 1, hidden: 4, numHeads: 1, numKvHeads: 1, headDim: 4, intermediate: 8, vocab: 8, maxPositions: 8,
      normEps: 1e-5, tiedEmbeddings: true, attentionBias: true, mlpBias: true, ropeInvFreq: [],
      plan: { target: [0], strict: [0], window: [0], kvLayers: [0], cyclicLow: -1, cyclicHigh: -1 },
    },
    { backend: "cpu", threads: 1 },
  );
  const file = path.join(testTempDir("lckv-test-"), "w.bin");
  fs.writeFileSync(file, Buffer.alloc(16));
  const src = { name: "layers.0.o.weight", sourceName: "x", file, offset: 0, nbytes: 0, dtype: "F32", shape: [2 ** 32, 2 ** 32], transpose: true };
  await expect(m.loadTensors([src])).rejects.toMatchObject({ code: "LCKV_WEIGHTS", message: expect.stringMatching(/tensor too large/) });
  m.dispose();
});

test("creating a sequence does not wait for another sequence's forward", async () => {
  const m = await loadModel(writeTinyModel({ layerTypes: "0_3_3_3", hidden: 128, intermediate: 512, heads: 4, kvHeads: 2, vocab: 256, maxPositions: 512, seed: 3 }), {
    device: "cpu",
    threads: 1,
  });
  const long = m.logits(Array.from({ length: 120 }, (_, i) => (i * 7) % 256), { prefill: "fixed-point", prefillTolerance: 0 });
  await new Promise((r) => setTimeout(r, 20)); // the forward is running now
  const t0 = Date.now();
  const s = m.createSequence();
  const blocked = Date.now() - t0;
  s.dispose();
  await long;
  expect(blocked).toBeLessThan(50);
  await m.dispose();
});

test("a model loaded in a worker thread that exits leaves the main thread's models working", async () => {
  const dir = path.join(__dirname, "..", "fixtures", "lckv-w2");
  const m = await loadModel(dir, { device: "cpu", threads: 1 });
  const w = new Worker(
    `const { parentPort, workerData } = require("node:worker_threads");
     const addon = require("node-gyp-build")(workerData.root);
     const m = new addon.NativeModel(workerData.desc, { backend: "cpu", threads: 1 });
     m.createPool(4, 16);
     m.createSequence(8);
     parentPort.postMessage("ready");`,
    {
      eval: true,
      workerData: {
        root: path.join(__dirname, "..", ".."),
        desc: {
          style: "gpt2", numLayers: 1, hidden: 4, numHeads: 1, numKvHeads: 1, headDim: 4, intermediate: 8, vocab: 8, maxPositions: 8,
          normEps: 1e-5, tiedEmbeddings: true, attentionBias: true, mlpBias: true, ropeInvFreq: [],
          plan: { target: [0], strict: [0], window: [0], kvLayers: [0], cyclicLow: -1, cyclicHigh: -1 },
        },
      },
    },
  );
  await new Promise((resolve, reject) => {
    w.on("message", resolve);
    w.on("error", reject);
  });
  await w.terminate();
  const s = m.createSequence();
  await s.append([1, 2, 3]);
  const r = await m.generate([1, 2, 3], { maxNewTokens: 3, temperature: 0, ignoreEos: true });
  expect(r.tokens).toHaveLength(3);
  s.dispose();
  await m.dispose();
});

test("an install without the addon (install scripts skipped) fails with an AddonLoadError that says why and how to build it", () => {
  // The compiled package without build/ or prebuilds/: what --ignore-scripts, or pnpm 10 before
  // 'pnpm approve-builds', leaves.
  const root = path.join(__dirname, "..", "..");
  const pkg = testTempDir("lckv-no-addon-");
  fs.cpSync(path.join(root, "dist"), path.join(pkg, "dist"), { recursive: true });
  fs.copyFileSync(path.join(root, "package.json"), path.join(pkg, "package.json"));
  fs.symlinkSync(path.join(root, "node_modules"), path.join(pkg, "node_modules"), "dir");
  const script = `require(${JSON.stringify(path.join(pkg, "dist"))}).loadModel(${JSON.stringify(path.join(__dirname, "..", "fixtures", "llama-mha-hd16"))}, { device: "cpu" }).catch((e) => { console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message })); });`;
  const r = spawnSync(process.execPath, ["-e", script], { encoding: "utf8" });
  expect(r.status).toBe(0);
  const e = JSON.parse(r.stdout.trim().split("\n").pop()!);
  expect(e).toMatchObject({ name: "AddonLoadError", code: "LCKV_ADDON_LOAD" });
  expect(e.message).toMatch(/^the lckv native addon could not be loaded \(.+\)\. It is built when lckv is installed/);
  expect(e.message).toContain("npm --ignore-scripts; pnpm 10 until 'pnpm approve-builds' allows lckv's");
  expect(e.message).toContain("Build it with 'npm rebuild lckv --build-from-source'");
});
