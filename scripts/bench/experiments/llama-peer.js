/**
 * Experiment 6: node-llama-cpp (llama.cpp), the peer a TypeScript user would pick, side by side
 * in the same run. The shape is written as GGUF files of random weights (make-gguf.js: F16, and
 * Q8_0 and Q4_0, what its users run); llama/peer.mjs measures them in a process of its own through
 * node-llama-cpp's API with flash attention, then lckv's standard model of the same shape is timed
 * at the same points, at each K/V type of the run:
 *   - batch-1 decode at 128 and 2048 tokens of context;
 *   - batch 16 and 64 decode at 2048 tokens (64, or the most both fit in GPU memory);
 *   - a 2048-token prefill;
 *   - llama.cpp's q8_0 K/V at batch 1 and at the largest batch;
 *   - Q8_0 and Q4_0 weights at batch 1 and 128 tokens (lckv holds bf16 weights: no lckv figure).
 * llama.cpp's sequences each hold their own K/V; lckv's are forks of distinct prefixes, one per
 * sequence where its pool holds them (the row says how many).
 */
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { forkedDecodeMs, randomPrefixes, randomIds, log } = require("../measure");
const { lonePrompts } = require("./prefill");
const { weightBytes } = require("../costs");

const PEER = path.join(__dirname, "..", "llama-peer", "peer.mjs");
const KV_PAGE_TOKENS = 16;

/** The points both sides run, at a shape's full size or tiny. */
function points(tiny) {
  const [short, long, mid, big] = tiny ? [32, 128, 4, 8] : [128, 2048, 16, 64];
  return [
    { id: `f16-b1-${short}`, kind: "decode", weights: "f16", kv: "F16", batch: 1, context: short },
    { id: `f16-b1-${long}`, kind: "decode", weights: "f16", kv: "F16", batch: 1, context: long },
    { id: `f16-b${mid}-${long}`, kind: "decode", weights: "f16", kv: "F16", batch: mid, context: long },
    { id: `f16-b${big}-${long}`, kind: "decode", weights: "f16", kv: "F16", batch: big, context: long },
    { id: `f16-prefill-${long}`, kind: "prefill", weights: "f16", kv: "F16", batch: 1, context: long },
    { id: `f16-kvq8-b1-${long}`, kind: "decode", weights: "f16", kv: "Q8_0", batch: 1, context: long },
    { id: `f16-kvq8-b${big}-${long}`, kind: "decode", weights: "f16", kv: "Q8_0", batch: big, context: long },
    { id: `q8_0-b1-${short}`, kind: "decode", weights: "q8_0", kv: "F16", batch: 1, context: short },
    { id: `q4_0-b1-${short}`, kind: "decode", weights: "q4_0", kv: "F16", batch: 1, context: short },
  ];
}

/** A llama-style config of a make-gguf shape, for costs.js. */
function shapeConfig(s) {
  return { hiddenSize: s.hidden, intermediateSize: s.intermediate, numHeads: s.heads, numKvHeads: s.kvHeads, headDim: s.hidden / s.heads, numLayers: s.layers, kvLayers: Array.from({ length: s.layers }, (_, i) => i), vocabSize: s.vocab };
}

/** Runs peer.mjs on a plan; its JSON lines, or the reason it gave none. */
function runPeer(plan) {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "lckv-llama-plan-")), "plan.json");
  fs.writeFileSync(file, JSON.stringify(plan));
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [PEER, "--plan", file], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    child.on("error", (e) => resolve({ error: `peer.mjs did not start: ${e.message}` }));
    child.on("exit", (code) => {
      fs.rmSync(path.dirname(file), { recursive: true, force: true });
      const lines = out.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
      const info = lines.find((l) => l.info)?.info;
      if (!info) resolve({ error: `peer.mjs exited with ${code} before loading node-llama-cpp (its output is in the bench log)` });
      else resolve({ info, rows: lines.filter((l) => l.id), exitCode: code });
    });
  });
}

async function experimentLlamaPeer(bench) {
  if (!bench.peers) return [];
  const install = bench.llamaPeerInstall;
  const out = [];
  for (const shape of bench.shapes) {
    if (!fs.existsSync(path.join(install, "node_modules", "node-llama-cpp"))) {
      out.push({ shape, error: `node-llama-cpp is not installed in ${path.relative(process.cwd(), install) || install}: run scripts/bench/llama-peer/prepare.sh, and on the GPU machine build-on-device.sh` });
      continue;
    }
    const s = bench.store.shape(shape);
    const files = Object.fromEntries(await Promise.all(["f16", "q8_0", "q4_0"].map(async (t) => [t, await bench.store.gguf(shape, t)])));
    // The batches both sides can hold: F16 weights and f16 K/V per sequence, against 90% of the card.
    const cfg = shapeConfig(s);
    const kvF16PerToken = s.layers * 2 * s.kvHeads * (s.hidden / s.heads) * 2;
    const steps = bench.tiny ? 4 : 32, warmUp = 4;
    const memory = bench.device === "cuda" ? bench.rates.memoryGB * 1e9 * 0.9 - weightBytes(cfg) - 2e9 : Infinity;
    const plan = points(bench.tiny).map((p) => {
      const fit = Math.floor(memory / ((p.context + warmUp + bench.repeats * steps + 16) * kvF16PerToken));
      return { ...p, batch: Math.min(p.batch, Math.max(1, fit)), file: files[p.weights] };
    });
    const peer = await runPeer({ install, device: bench.device, vocab: s.vocab, repeats: bench.repeats, steps, warmUp, rows: plan });
    if (peer.error) {
      out.push({ shape, error: peer.error });
      continue;
    }
    // lckv's standard model at the same points, at each K/V type of the run.
    const ours = {};
    for (const kvDtype of bench.kvDtypes) {
      // Its own pool: room for 32 sequences of 8192 tokens, at most 80% of free GPU memory.
      const model = await bench.load(shape, "standard", kvDtype, { kvCacheMemory: undefined, maxContext: 8192 });
      const kvType = bench.kvTypeOf(model, kvDtype);
      const st = model.cacheStats();
      const measured = new Map();
      for (const p of plan.filter((x) => x.weights === "f16")) {
        const key = `${p.kind}-${p.batch}-${p.context}`;
        if (!measured.has(key)) {
          if (p.kind === "prefill") {
            // Timed to the end of the work, as experiment 3 times a prompt: append() resolves
            // when the prompt's work is queued, not done.
            const { t: ms } = await lonePrompts(bench, model, randomIds(p.context, model.config.vocabSize), undefined);
            measured.set(key, { kvDtype: kvType, ms, tokPerS: (p.context * 1e3) / ms.median });
          } else {
            const pagesPerSeq = Math.ceil((p.context + 1 + steps) / KV_PAGE_TOKENS) + 1;
            // As many distinct prefixes as 80% of the pool holds: the rest is for the forks' new tokens.
            const distinct = Math.max(1, Math.min(p.batch, Math.floor((0.8 * st.pagesTotal) / pagesPerSeq)));
            const bases = await randomPrefixes(model, distinct, p.context + 1);
            const ms = await forkedDecodeMs(bases, p.batch, steps, bench.repeats);
            for (const b of bases) b.dispose();
            measured.set(key, { kvDtype: kvType, msPerStep: ms, tokPerS: (p.batch * 1e3) / ms.median, distinctPrefixes: distinct });
          }
          log(`exp6 lckv ${shape} ${kvType ?? "default K/V"} ${key}: ${(measured.get(key).msPerStep ?? measured.get(key).ms).median.toFixed(2)} ms`);
        }
        (ours[p.id] ??= []).push(measured.get(key));
      }
      await model.dispose();
    }
    out.push({
      shape, info: peer.info,
      rows: plan.map((p) => ({ id: p.id, kind: p.kind, weights: p.weights.toUpperCase(), llamaKv: p.kv.toLowerCase(), batch: p.batch, context: p.context, llama: peer.rows.find((r) => r.id === p.id) ?? { error: "no result (the peer stopped before this row)" }, ours: ours[p.id] ?? [] })),
    });
  }
  return out;
}

module.exports = { experimentLlamaPeer, points };
