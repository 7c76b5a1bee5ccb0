#!/usr/bin/env node
/**
 * Exact LCKV prefill of N concurrent prompts: batched token steps (every prompt's next token a
 * row of one shared step) against the same prompts prefilled one after another, each alone, in
 * sequential mode and in the device's default mode where that is another (fixed-point on the
 * GPU). Prompt tokens prefilled per second of wall time: the median of --repeats runs after a
 * warm-up, and the best run (what a busy machine's other work disturbs least). The crossover where batched steps overtake the default mode is what
 * THROUGHPUT_PREFILL_MIN_OTHERS (lib/engine-context.ts) is set from.
 *
 *   node scripts/bench/batched-prefill.js [--model DIR] [--device cpu|cuda] [--prompts 1,2,4,8,16] [--tokens 200] [--repeats 3] [--threads N]
 *     [--max-batch N] [--kv-memory GiB]
 *
 * A step takes at most maxBatch rows (loadModel's default is 256; 16 keeps the GPU's steps
 * batch-invariant), so --max-batch defaults to the largest --prompts count, whatever the
 * engine's default: every prompt's row goes in the same step. Each row reports the batched rows per step (`rowsPerStep`), and --kv-memory
 * should hold every prompt at once, or admission runs them in turns.
 *
 * The model must have a cyclic layer group (the default model has). For a GPU-sized one:
 * scripts/bench/make-random-model.js --out DIR --layer-types 0_20_..._20_21 (LCKV w=2).
 */
const { Command } = require("commander");
const { loadModel } = require("../../dist");
const { summary } = require("./measure");

const opt = new Command()
  .name("batched-prefill")
  .option("--model <dir>", "a model directory (default: the embedded model)")
  .option("--device <d>", "cpu or cuda", "cpu")
  .option("--prompts <list>", "numbers of concurrent prompts", "1,2,4,8,16")
  .option("--tokens <n>", "tokens per prompt", "200")
  .option("--repeats <n>", "timed runs per row (the median is reported)", "3")
  .option("--threads <n>", "CPU threads (default: every core)")
  .option("--max-batch <n>", "rows a step may take (default: the largest --prompts count)")
  .option("--kv-memory <GiB>", "the K/V pool (default: the engine's)")
  .parse()
  .opts();

(async () => {
  const counts = opt.prompts.split(",").map(Number);
  const maxBatch = opt.maxBatch ? +opt.maxBatch : Math.max(...counts);
  const model = await loadModel(opt.model, {
    device: opt.device,
    prefixCache: 0,
    maxBatch,
    ...(opt.kvMemory ? { kvCacheMemory: Math.round(+opt.kvMemory * 2 ** 30) } : {}),
    ...(opt.threads ? { threads: +opt.threads } : {}),
  });
  if (!model.config.plan.cyclicGroup) throw new Error(`${model.directory} has no cyclic layer group: its prompts are exact in one pass, nothing to batch`);
  const V = model.config.vocabSize;
  const tokens = Math.min(+opt.tokens, model.maxContext);
  const defaultMode = model.generationDefaults().prefill;
  const prompt = (i) => Array.from({ length: tokens }, (_, j) => 2 + ((j * 37 + i * 101) % (V - 2)));

  /** Prefills n prompts as `how` says; the wall time, tokens prefilled and how many went as batched rows. */
  async function run(n, how) {
    const seqs = Array.from({ length: n }, () => model.createSequence());
    const prefilled = model.cacheStats().prefilledTokens;
    const batched = model.schedulerStats().promptTokens;
    const steps = model.schedulerStats().steps;
    const t0 = performance.now();
    if (how === "batched") {
      await Promise.all(seqs.map((s, i) => s.append(prompt(i), { prefill: "sequential" })));
    } else {
      for (let i = 0; i < n; i++) await seqs[i].append(prompt(i), { prefill: how });
    }
    const ms = performance.now() - t0;
    for (const s of seqs) s.dispose();
    const batchedTokens = model.schedulerStats().promptTokens - batched;
    const stepsRun = model.schedulerStats().steps - steps;
    return { ms, tokens: model.cacheStats().prefilledTokens - prefilled, batchedTokens, rowsPerStep: stepsRun > 0 ? batchedTokens / stepsRun : 0 };
  }

  const ways = ["batched", "sequential", ...(defaultMode === "sequential" ? [] : [defaultMode])];
  const rows = [];
  for (const n of counts) {
    const row = { prompts: n };
    for (const how of ways) {
      await run(n, how);  // warm-up
      const runs = [];
      for (let r = 0; r < +opt.repeats; r++) runs.push(await run(n, how));
      const ms = summary(runs.map((x) => x.ms)).median;
      const best = Math.min(...runs.map((x) => x.ms));
      row[how] = { tokPerS: (runs[0].tokens / ms) * 1e3, bestTokPerS: (runs[0].tokens / best) * 1e3, ms, tokens: runs[0].tokens, batchedTokens: runs[0].batchedTokens, rowsPerStep: runs[0].rowsPerStep };
    }
    rows.push(row);
    const cells = ways.map((h) => `${h} ${row[h].tokPerS.toFixed(0)} tok/s (best ${row[h].bestTokPerS.toFixed(0)})`).join(", ");
    const ratio = (k) => (row.batched[k] / row.sequential[k]).toFixed(2);
    console.error(`${n} x ${tokens} tokens: ${cells}; batched/sequential ${ratio("tokPerS")}x (best ${ratio("bestTokPerS")}x); ${row.batched.rowsPerStep.toFixed(1)} rows a batched step`);
  }
  console.log(JSON.stringify({ device: model.device, model: model.directory, threads: opt.threads ?? "all", maxBatch, promptTokens: tokens, defaultMode, rows }));
  await model.dispose();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
