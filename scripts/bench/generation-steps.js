#!/usr/bin/env node
/**
 * Where a full generation's decode steps lose time against the decode step measured alone.
 * Experiment 1's full generations of the standard and CLA models at 1.1B (prompts as chunks in
 * mixed steps) took 15-34% longer per step after the last prompt's first token than the same
 * batch decoding alone, while the LCKV rows (prompts as token steps, all in lockstep) and every
 * 7B row did not. This runs one such generation twice and prints, per run:
 *
 * - "staggered": every request started at once, as experiment 1 and a server start them
 *   (`model.stream`): the prompts take turns at the mixed steps' chunk, so the requests start
 *   decoding, and end, up to one step per prompt apart;
 * - "prompts first": the same prompts appended to sequences of their own first, then every
 *   sequence generates at once, so all decode in lockstep from the first step to the last;
 *
 * with the engine's counters over it (scheduler steps and rows, CUDA graphs recorded and
 * replayed, run-ahead steps used and thrown away) and, for the stream that ends last, the median
 * gap between its tokens in each tenth of its generation and its longest gap.
 *
 *   node scripts/bench/generation-steps.js --batch 62 --prompt 512 --gen 1024
 *
 * Without --model it writes (once) a TinyLlama-1.1B-shaped model with random bf16 weights, as
 * profile-step.js does (scripts/bench/models.js, profilingModelDir).
 */
const { Command } = require("commander");
const { loadModel } = require("../../dist");
const { now, randomIds } = require("./measure");
const { profilingModelDir } = require("./models");

const opt = new Command()
  .name("generation-steps")
  .option("--model <dir>", "a model directory (default: a random TinyLlama-shaped model)")
  .option("--layer-types <pattern>", "for the random model: its layer_types (default: standard)")
  .option("--batch <n>", "requests at once", "62")
  .option("--prompt <n>", "prompt tokens per request", "512")
  .option("--gen <n>", "generated tokens per request", "1024")
  .option("--pool-gib <n>", "the K/V pool (experiment 1's at 1.1B: 2)", "2")
  .option("--device <d>", "cuda or cpu", "cuda")
  .parse()
  .opts();

const batch = +opt.batch, prompt = +opt.prompt, gen = +opt.gen;
const dir = opt.model ?? profilingModelDir(opt.layerTypes);

const COUNTERS = ["steps", "tokens", "promptTokens", "stepGraphRecordings", "stepGraphReplays", "runAheadSteps", "runAheadDiscarded"];

/** The gaps of the stream that ended last, by tenths of its generation. */
function lastStreamGaps(stamps) {
  const last = stamps.reduce((a, x) => (x[x.length - 1] > a[a.length - 1] ? x : a));
  const gaps = last.slice(1).map((x, k) => x - last[k]);
  const tenths = Array.from({ length: 10 }, (_, d) => {
    const part = gaps.slice(Math.floor((d * gaps.length) / 10), Math.floor(((d + 1) * gaps.length) / 10)).sort((x, y) => x - y);
    return part.length ? part[part.length >> 1].toFixed(2) : "-";
  });
  const firstEnd = Math.min(...stamps.map((x) => x[x.length - 1]));
  return `last stream's median gap by tenths, ms: ${tenths.join(" ")}; longest ${Math.max(...gaps).toFixed(1)} ms; streams end over ${(last[last.length - 1] - firstEnd).toFixed(0)} ms`;
}

(async () => {
  const model = await loadModel(dir, { device: opt.device, prefixCache: 0, maxBatch: 1 << 20, kvCacheMemory: Math.round(+opt.poolGib * 2 ** 30) });
  const V = model.config.vocabSize;
  const counters = () => ({ ...model.nativeModel().memoryInfo(), ...model.schedulerStats() });
  const since = (a) => {
    const z = counters();
    return COUNTERS.map((k) => `${k} ${z[k] - a[k]}`).join(", ");
  };
  // Every stream's token times; `sources` are prompts (model.stream) or sequences (generate).
  const run = async (sources, n) => {
    const stamps = sources.map(() => []);
    await Promise.all(
      sources.map(async (src, i) => {
        const it = Array.isArray(src) ? model.stream(src, { maxNewTokens: n, temperature: 0, ignoreEos: true }) : src.generate({ maxNewTokens: n, temperature: 0, ignoreEos: true });
        for await (const c of it) {
          void c;
          stamps[i].push(now());
        }
      }),
    );
    return stamps;
  };
  // Experiment 1's warm-up: short prompts, 32 tokens each.
  await run(Array.from({ length: batch }, () => randomIds(Math.min(prompt, 64), V)), 32);
  const tokPerS = (ms) => ((batch * gen * 1e3) / ms).toFixed(0);
  for (let rep = 0; rep < 2; rep++) {
    let before = counters();
    let t0 = now();
    const staggered = await run(Array.from({ length: batch }, () => randomIds(prompt, V)), gen);
    let ms = now() - t0;
    const lastFirst = Math.max(...staggered.map((x) => x[0])) - t0;
    console.log(`staggered: ${ms.toFixed(0)} ms, ${tokPerS(ms)} tok/s, last first token at ${lastFirst.toFixed(0)} ms, then ${((ms - lastFirst) / (gen - 1)).toFixed(3)} ms a step`);
    console.log(`  ${since(before)}`);
    console.log(`  ${lastStreamGaps(staggered)}`);

    const seqs = Array.from({ length: batch }, () => model.createSequence());
    before = counters();
    t0 = now();
    await Promise.all(seqs.map((s) => s.append(randomIds(prompt, V))));
    const prompted = now() - t0;
    const lockstep = await run(seqs, gen);
    ms = now() - t0;
    console.log(`prompts first: ${ms.toFixed(0)} ms, ${tokPerS(ms)} tok/s, prompts ${prompted.toFixed(0)} ms, then ${((ms - prompted) / gen).toFixed(3)} ms a step`);
    console.log(`  ${since(before)}`);
    console.log(`  ${lastStreamGaps(lockstep)}`);
    for (const s of seqs) s.dispose();
  }
  await model.dispose();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
