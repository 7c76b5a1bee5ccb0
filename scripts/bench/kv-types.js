#!/usr/bin/env node
/**
 * The K/V cache types side by side on one GPU (loadModel's kvCacheDtype), on the TinyLlama-1.1B
 * shape with random bf16 weights:
 *   capacity   sequences of 2048 + 2048 tokens one pool holds, each type against f32 (from the
 *              engine's own page size: codes, scales and alignment count);
 *   decode     ms per step of the standard model at --batch distinct sequences of --context
 *              tokens, against the type's memory roofline: the weights plus every sequence's K/V
 *              (context x kvBytesPerToken) read once per step, over the measured copy bandwidth;
 *   batch 1    ms per step at 128 tokens;
 *   attention  one decode step's attention alone over 16 and 128 sequences of 4096 tokens, the
 *              bytes it must read (each type's own) over its time, against the copy bandwidth.
 * Prints a Markdown table and writes the figures as JSON (--json).
 *
 *   node scripts/bench/kv-types.js [--types f32,bf16,fp8,int8,int4] [--json out.json]
 */
const { execFileSync } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { Command } = require("commander");
const { loadModel, KV_CACHE_DTYPES } = require("../../dist");
const { loadAddon } = require("../../dist/native");

const opt = new Command()
  .name("kv-types")
  .option("--types <list>", "K/V cache types", KV_CACHE_DTYPES.join(","))
  .option("--batch <n>", "sequences decoding together", "64")
  .option("--context <n>", "tokens each sequence holds", "2048")
  .option("--steps <n>", "timed decode steps (after 8 of warm-up)", "32")
  .option("--pool-gib <n>", "the pool for the capacity figure, GiB", "2")
  .option("--repeats <n>", "timed runs per figure (the median is kept)", "3")
  .option("--json <file>", "write the figures here")
  .parse()
  .opts();
const types = opt.types.split(",");
const batch = +opt.batch, context = +opt.context, steps = +opt.steps, repeats = +opt.repeats;
const log = (...a) => process.stderr.write(a.join(" ") + "\n");
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function randomModel() {
  const dir = path.join(os.tmpdir(), "lckv-bench", "standard");
  if (!fs.existsSync(path.join(dir, "config.json")))
    execFileSync(process.execPath, [path.join(__dirname, "make-random-model.js"), "--out", dir], { stdio: "inherit" });
  return dir;
}

function copyGBps() {
  const out = execFileSync("python3", [path.join(__dirname, "device_rates.py")], { encoding: "utf8" });
  return JSON.parse(out.trim().split("\n").pop());
}

// Decode steps of `seqs` (each already holding its context), timed together.
async function stepMs(seqs, n) {
  const t0 = process.hrtime.bigint();
  await Promise.all(
    seqs.map(async (s) => {
      for await (const x of s.generate({ maxNewTokens: n, temperature: 0, ignoreEos: true })) void x;
    }),
  );
  return Number(process.hrtime.bigint() - t0) / 1e6 / n;
}

async function decodeFigure(dir, kvCacheDtype, rows, ctx) {
  const model = await loadModel(dir, { device: "cuda", kvCacheDtype, prefixCache: 0, maxBatch: rows, kvCacheMemory: 8 * 2 ** 30 });
  try {
    const V = model.config.vocabSize;
    // Distinct prompts: sequences that shared their pages would read them from L2, not memory.
    const seqs = [];
    for (let b = 0; b < rows; b++) {
      const s = model.createSequence();
      await s.append(Array.from({ length: ctx }, (_, i) => (i * 7919 + b * 104729 + 13) % V));
      seqs.push(s);
    }
    await stepMs(seqs, 8);
    const times = [];
    for (let r = 0; r < repeats; r++) {
      // Each run continues the sequences: rewind them so every run reads the same context.
      for (const s of seqs) s.truncate(ctx);
      times.push(await stepMs(seqs, steps));
    }
    const bytes = model.nativeModel().weightBytes + rows * (ctx + steps / 2) * model.kvBytesPerToken;
    for (const s of seqs) s.dispose();
    return { ms: median(times), samples: times, bytesPerStep: bytes, kvBytesPerToken: model.kvBytesPerToken };
  } finally {
    await model.dispose();
  }
}

(async () => {
  const rates = copyGBps();
  log(`card ${rates.card}, copy ${rates.copyGBps.toFixed(0)} GB/s`);
  const dir = randomModel();
  const addon = loadAddon();
  const poolBytes = +opt.poolGib * 2 ** 30;
  const results = [];
  for (const t of types) {
    // Capacity: the engine's page size in this type, the pages a pool of poolBytes holds, and the
    // sequences of 4096 tokens (256 pages of 16) they make.
    const cap = await loadModel(dir, { device: "cuda", kvCacheDtype: t, prefixCache: 0, kvCacheMemory: poolBytes });
    const pages = cap.cacheStats().pagesTotal;
    const pageBytes = cap.cacheStats().pageBytes;
    await cap.dispose();
    const capacity = Math.floor(pages / (4096 / 16));
    const d = await decodeFigure(dir, t, batch, context);
    const b1 = await decodeFigure(dir, t, 1, 128);
    const attention = [16, 128].map((sequences) => {
      const shape = { backend: "cuda", sequences, context: 4096, numHeads: 32, numKvHeads: 4, headDim: 64, kvCacheDtype: t };
      const runs = [];
      for (let r = 0; r < repeats; r++) runs.push(addon.benchAttention({ ...shape, iterations: 50 }));
      const ms = median(runs.map((x) => x.ms));
      const gbps = runs[0].bytes / (ms / 1e3) / 1e9;
      return { sequences, ms, gbps, ofCopy: gbps / rates.copyGBps };
    });
    const roofMs = (d.bytesPerStep / (rates.copyGBps * 1e9)) * 1e3;
    const row = { type: t, pageBytes, capacity, decode: { ...d, roofMs, ofRoof: roofMs / d.ms }, batch1: b1, attention };
    results.push(row);
    log(
      `${t}: capacity ${capacity}, decode ${d.ms.toFixed(3)} ms (roof ${roofMs.toFixed(3)}, ${((roofMs / d.ms) * 100).toFixed(0)}%), ` +
        `batch 1 ${b1.ms.toFixed(3)} ms, attention ${attention.map((a) => `${a.sequences}: ${a.gbps.toFixed(0)} GB/s`).join(", ")}`,
    );
  }
  const f32 = results.find((r) => r.type === "f32");
  const lines = [
    `${rates.card}, driver ${rates.driver}, copy ${rates.copyGBps.toFixed(0)} GB/s, ${new Date().toISOString().slice(0, 10)}`,
    "",
    `| type | K/V bytes/token | sequences of 2048+2048 in ${opt.poolGib} GiB | vs f32 | decode ${batch} x ${context} (ms/step) | roofline (ms) | of roofline | batch 1 at 128 (ms/step) | attention 16 x 4096 (GB/s, of copy) | attention 128 x 4096 |`,
    "|---|---|---|---|---|---|---|---|---|---|",
    ...results.map((r) =>
      [
        r.type,
        r.decode.kvBytesPerToken.toFixed(0),
        r.capacity,
        f32 ? `${(r.capacity / f32.capacity).toFixed(2)}x` : "-",
        r.decode.ms.toFixed(3),
        r.decode.roofMs.toFixed(3),
        `${(r.decode.ofRoof * 100).toFixed(0)}%`,
        r.batch1.ms.toFixed(3),
        ...r.attention.map((a) => `${a.gbps.toFixed(0)} (${(a.ofCopy * 100).toFixed(0)}%)`),
      ].join(" | ").replace(/^/, "| ").replace(/$/, " |"),
    ),
  ];
  process.stdout.write(lines.join("\n") + "\n");
  if (opt.json) fs.writeFileSync(opt.json, JSON.stringify({ rates, batch, context, steps, results }, null, 2));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
