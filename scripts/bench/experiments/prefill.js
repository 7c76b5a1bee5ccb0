/**
 * Experiment 3: prefill throughput against prompt length, for each LCKV prefill mode, and the
 * achieved TFLOP/s of the standard model against the card's measured bf16 GEMM rate; then many
 * prompts at once, as a server takes them (MANY_PROMPTS).
 */
const { FIXED_POINT_MAX_PASSES } = require("../../../dist");
const { measure, summary, randomIds, hostSync, poolBytesFor, now, log } = require("../measure");
const { forwardFlops } = require("../costs");

/**
 * Many prompts appended at once: [model, mode, prompts, tokens each]. The standard model in its
 * default mode (no `prefill` option): while other prompts are in flight its chunks go in as rows
 * of the scheduler's shared steps (mixed steps, chunked prefill). LCKV w=2 in sequential mode:
 * exact, and with other prompts in flight one token of every prompt per shared step (batched
 * token steps, docs/usage.md). Each a target of its own: the standard model at half the bf16
 * GEMM rate, LCKV at 25k tokens/s. On an H100 the LCKV row costs about 4.2 s a run (2026-12-06:
 * 2047 steps of 64 rows, ~2.05 ms a step), the standard one under a second. --full runs the same.
 */
const MANY_PROMPTS = [["standard", "default", 16, 2048], ["lckv-w2", "sequential", 64, 2048]];
/** --tiny: the same two rows, small enough for the CPU (two CPU chunks of 64 tokens a prompt). */
const TINY_MANY_PROMPTS = [["standard", "default", 4, 128], ["lckv-w2", "sequential", 8, 128]];

/**
 * `count` prompts of `n` tokens appended at once, timed from issuing the appends to all resolved
 * and a host sync (the work is queued, not done, when append() resolves): prompts x n tokens over
 * that wall time. The scheduler's counts say how many rows its shared steps carried.
 */
async function manyPrompts(bench, model, mode, count, n) {
  const c = model.config;
  const prompts = Array.from({ length: count }, () => randomIds(n + 1, c.vocabSize));
  const options = mode === "default" ? {} : { prefill: mode };
  let last;
  const ms = await measure(async () => {
    const seqs = prompts.map(() => model.createSequence());
    const before = { ...model.schedulerStats(), prefilled: model.cacheStats().prefilledTokens };
    const t0 = now();
    const done = await Promise.all(seqs.map((s, i) => s.append(prompts[i], options)));
    const after = model.schedulerStats();
    // The sync's own step (one row) stays out of the counts.
    await hostSync(seqs[0]);
    const wall = now() - t0;
    const steps = after.steps - before.steps;
    const batchedTokens = after.promptTokens - before.promptTokens;
    last = {
      passes: Math.max(...done.map((d) => d.passes)),
      prefilledTokens: model.cacheStats().prefilledTokens - before.prefilled,
      steps,
      batchedTokens,
      rowsPerStep: steps > 0 ? batchedTokens / steps : 0,
      maxStepSequences: after.maxBatch,
    };
    for (const s of seqs) s.dispose();
    return wall;
  }, bench.repeats);
  const tflops = (count * forwardFlops(c, n)) / (ms.median / 1e3) / 1e12;
  return { mode, prompts: count, tokens: n, ms, tokPerS: (count * n * 1e3) / ms.median, ...last, tflops, ofGemmRate: tflops / bench.rates.bf16Tflops };
}

/**
 * One prompt at a time: each sample is k prompts appended back to back (each to a fresh
 * sequence), then a host sync, over k. append() resolves when the work is queued, not done, so a
 * prompt timed alone measures its queueing (2026-12-06 on an H100: 3.6 ms for a 2048-token prompt
 * whose GPU work takes over 11 ms); the sync bounds the span by the work itself, and k spreads
 * the sync's own step (one generated token) over several prompts. k comes from the warm-up
 * (synced): about 250 ms of prompts a sample, 2 to 16.
 */
async function lonePrompts(bench, model, ids, mode) {
  let passes = 0;
  const run = async (k) => {
    const t0 = now();
    let s;
    for (let i = 0; i < k; i++) {
      if (s) s.dispose();
      s = model.createSequence();
      passes = (await s.append(ids, { prefill: mode })).passes;
    }
    await hostSync(s);
    s.dispose();
    return (now() - t0) / k;
  };
  const warm = await run(1);
  const k = Math.max(2, Math.min(16, Math.round(250 / Math.max(warm, 1e-3))));
  const samples = [];
  for (let i = 0; i < bench.repeats; i++) samples.push(await run(k));
  return { t: summary(samples), passes, perSample: k };
}

async function experimentPrefill(bench) {
  const rows = [];
  // 8192 only with --full: its iterative LCKV prefill alone took ~35 s of the default set's 10 minutes.
  const lengths = bench.tiny ? [16, 64, 256] : bench.full ? [128, 512, 2048, 8192] : [128, 2048];
  for (const shape of bench.shapes) {
    for (const kvDtype of bench.kvDtypes) {
      for (const name of ["standard", "lckv-w2"].filter((n) => bench.models.includes(n))) {
        const model = await bench.load(shape, name, kvDtype);
        const c = model.config;
        const kvType = bench.kvTypeOf(model, kvDtype);
        const kvName = kvType ?? "default K/V";
        const modes = c.plan.cyclicGroup ? ["iterative", "fixed-point", "sequential"] : ["fixed-point"];
        const slow = new Set();
        for (const mode of modes) {
          for (const n of lengths) {
            if (n > model.maxContext || slow.has(mode)) continue;
            // Token by token: slow by design (up to 2048 tokens only at the 1.1B shape in the full protocol).
            if (mode === "sequential" && n > (bench.full && shape === "1.1b" ? 2048 : 512)) continue;
            const ids = randomIds(n + 1, c.vocabSize);
            const { t, passes, perSample } = await lonePrompts(bench, model, ids, mode);
            // A mode whose run took over 20 s is not run at longer prompts (a part's 10 minutes),
            // nor is a fixed point that did not converge (random weights need not contract: it then
            // stops at its pass limit and runs the rest token by token, exact but slow).
            if (t.median > 20000 || (mode === "fixed-point" && passes >= Math.min(n, FIXED_POINT_MAX_PASSES))) slow.add(mode);
            const flops = forwardFlops(c, n);
            const tflops = flops / (t.median / 1e3) / 1e12;
            rows.push({ shape, model: name, kvDtype: kvType, mode, prompts: 1, promptsPerSample: perSample, tokens: n, ms: t, tokPerS: (n * 1e3) / t.median, passes, tflops, ofGemmRate: tflops / bench.rates.bf16Tflops });
            log(`exp3 ${shape} ${name} ${kvName} ${mode} ${n}: ${t.median.toFixed(1)} ms (${passes} passes)`);
          }
        }
        // (n + 1 tokens a prompt as above, and the sync's generated token)
        const many = (bench.tiny ? TINY_MANY_PROMPTS : MANY_PROMPTS).filter(([m, , , n]) => m === name && n + 2 <= model.maxContext);
        // A model of its own for these rows: every prompt a row of the same steps (maxBatch), and
        // a pool that holds all of them, so that none waits for pages.
        const pools = many.map(([, , count, n]) => poolBytesFor(model, count, n + 1));
        await model.dispose();
        for (const [i, [, mode, count, n]] of many.entries()) {
          const batched = await bench.load(shape, name, kvDtype, { maxBatch: count, kvCacheMemory: pools[i] });
          try {
            const row = await manyPrompts(bench, batched, mode, count, n);
            rows.push({ shape, model: name, kvDtype: kvType, ...row });
            log(`exp3 ${shape} ${name} ${kvName} ${mode} ${count} x ${n}: ${row.ms.median.toFixed(1)} ms, ${row.tokPerS.toFixed(0)} tok/s, ${row.rowsPerStep.toFixed(1)} rows a step`);
          } finally {
            await batched.dispose();
          }
        }
      }
    }
  }
  return rows;
}

module.exports = { experimentPrefill, lonePrompts };
