#!/usr/bin/env node
/**
 * node-llama-cpp's side of the benchmark, through its own API: getLlama, loadModel, createContext
 * (flash attention on, one sequence per request), and each sequence's evaluate() generator —
 * what a TypeScript user of llama.cpp writes. Run in a process of its own by experiment 6
 * (experiments/llama-peer.js), so that its GPU memory is free again before lckv loads.
 *
 *   node scripts/bench/llama-peer/peer.mjs --plan PLAN.json
 *
 * The plan: { install, device ("cuda" | "cpu"), vocab, repeats, steps, warmUp, rows: [{ id, kind
 * ("decode" | "prefill"), weights (its label), file (GGUF), kv ("F16" | "Q8_0"), batch, context }] }.
 * Prints one JSON line of what ran (versions, build, GPU), then one per row: a decode row's ms per
 * step (`steps` tokens of every sequence at once after `context` tokens each, median of `repeats`
 * windows after `warmUp` tokens), a prefill row's ms for `context` tokens in one sequence.
 *   node scripts/bench/llama-peer/peer.mjs --check --install .llama-peer/install [--device cuda|cpu]
 * only loads the build and prints the first line.
 */
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { summary, now, randomIds, log } = require("../measure.js");
const { loadLlama } = require("./build-options.js");

function arg(name) {
  const i = process.argv.indexOf(name);
  return i < 0 ? undefined : process.argv[i + 1];
}

/** Ids of normal tokens (past <unk>, <s>, </s> and the 256 byte tokens of make-gguf.js's vocabulary). */
const FIRST_WORD_TOKEN = 259;

async function decodeRow(model, plan, row) {
  const { batch, context, kv } = row;
  const vocab = plan.vocab;
  const ctx = await model.createContext({
    sequences: batch,
    contextSize: context + plan.warmUp + plan.repeats * plan.steps + 16,
    batchSize: Math.max(512, Math.min(2048, context)),
    flashAttention: true,
    experimentalKvCacheKeyType: kv,
    experimentalKvCacheValueType: kv,
    ignoreMemorySafetyChecks: true,
  });
  try {
    const seqs = Array.from({ length: batch }, () => ctx.getSequence());
    // Every sequence's prompt at once: node-llama-cpp packs them into batches of batchSize tokens.
    await Promise.all(seqs.map((s) => s.evaluateWithoutGeneratingNewTokens(randomIds(context - 1, vocab, FIRST_WORD_TOKEN))));
    const gens = seqs.map((s) => s.evaluate(randomIds(1, vocab, FIRST_WORD_TOKEN), { temperature: 0, yieldEogToken: true }));
    const advance = (n) => Promise.all(gens.map(async (g) => {
      for (let i = 0; i < n; i++) if ((await g.next()).done) throw new Error("the generation ended early");
    }));
    await advance(plan.warmUp);
    const windows = [];
    for (let r = 0; r < plan.repeats; r++) {
      const t0 = now();
      await advance(plan.steps);
      windows.push((now() - t0) / plan.steps);
    }
    await Promise.all(gens.map((g) => g.return()));
    const ms = summary(windows);
    return { msPerStep: ms, tokPerS: (batch * 1e3) / ms.median, flashAttention: ctx.flashAttention, contextSize: ctx.contextSize };
  } finally {
    await ctx.dispose();
  }
}

async function prefillRow(model, plan, row) {
  const vocab = plan.vocab;
  const ctx = await model.createContext({ sequences: 1, contextSize: row.context + 16, batchSize: row.context, flashAttention: true, experimentalKvCacheKeyType: row.kv, experimentalKvCacheValueType: row.kv, ignoreMemorySafetyChecks: true });
  try {
    const seq = ctx.getSequence();
    const ids = randomIds(row.context, vocab, FIRST_WORD_TOKEN);
    const times = [];
    for (let r = 0; r <= plan.repeats; r++) {
      await seq.clearHistory();
      const t0 = now();
      await seq.evaluateWithoutGeneratingNewTokens(ids);
      if (r > 0) times.push(now() - t0); // the first is the warm-up
    }
    const ms = summary(times);
    return { ms, tokPerS: (row.context * 1e3) / ms.median, flashAttention: ctx.flashAttention };
  } finally {
    await ctx.dispose();
  }
}

const print = (o) => process.stdout.write(JSON.stringify(o) + "\n");

async function main() {
  // --check: load the build and say what it is, nothing else.
  const plan = process.argv.includes("--check") ? { install: arg("--install"), device: arg("--device") ?? "cuda", rows: [] } : JSON.parse(fs.readFileSync(arg("--plan"), "utf8"));
  const { llama, version } = await loadLlama(plan.install, plan.device);
  const sourceFile = path.join(plan.install, "llama-source.json");
  print({
    info: {
      nodeLlamaCpp: version,
      llamaCpp: fs.existsSync(sourceFile) ? JSON.parse(fs.readFileSync(sourceFile, "utf8")) : llama.llamaCppRelease,
      gpu: llama.gpu,
      gpuNames: llama.gpu ? await llama.getGpuDeviceNames() : [],
      buildType: llama.buildType,
    },
  });
  // One load per weights file, its rows in a row.
  const files = [...new Set(plan.rows.map((r) => r.file))];
  for (const file of files) {
    let model;
    try {
      model = await llama.loadModel({ modelPath: file, gpuLayers: plan.device === "cuda" ? "max" : 0, ignoreMemorySafetyChecks: true });
    } catch (e) {
      for (const row of plan.rows.filter((r) => r.file === file)) print({ id: row.id, error: `loadModel failed: ${e.message}` });
      continue;
    }
    for (const row of plan.rows.filter((r) => r.file === file)) {
      try {
        const r = row.kind === "prefill" ? await prefillRow(model, plan, row) : await decodeRow(model, plan, row);
        print({ id: row.id, gpuLayers: model.gpuLayers, ...r });
        log(`llama.cpp ${row.id}: ${(r.msPerStep ?? r.ms).median.toFixed(2)} ms`);
      } catch (e) {
        print({ id: row.id, error: e.message });
      }
    }
    await model.dispose();
  }
  await llama.dispose();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
