/**
 * Experiment 3: prefill throughput against prompt length, for each LCKV prefill mode, and the
 * achieved TFLOP/s of the standard model against the card's measured bf16 GEMM rate.
 */
const { FIXED_POINT_MAX_PASSES } = require("../../../dist");
const { measure, randomIds, now, log } = require("../measure");
const { forwardFlops } = require("../costs");

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
            let passes = 0;
            const t = await measure(async () => {
              const s = model.createSequence();
              const t0 = now();
              passes = (await s.append(ids, { prefill: mode })).passes;
              const ms = now() - t0;
              s.dispose();
              return ms;
            }, bench.repeats);
            // A mode whose run took over 20 s is not run at longer prompts (a part's 10 minutes),
            // nor is a fixed point that did not converge (random weights need not contract: it then
            // stops at its pass limit and runs the rest token by token, exact but slow).
            if (t.median > 20000 || (mode === "fixed-point" && passes >= Math.min(n, FIXED_POINT_MAX_PASSES))) slow.add(mode);
            const flops = forwardFlops(c, n);
            const tflops = flops / (t.median / 1e3) / 1e12;
            rows.push({ shape, model: name, kvDtype: kvType, mode, tokens: n, ms: t, tokPerS: (n * 1e3) / t.median, passes, tflops, ofGemmRate: tflops / bench.rates.bf16Tflops });
            log(`exp3 ${shape} ${name} ${kvName} ${mode} ${n}: ${t.median.toFixed(1)} ms (${passes} passes)`);
          }
        }
        await model.dispose();
      }
    }
  }
  return rows;
}

module.exports = { experimentPrefill };
