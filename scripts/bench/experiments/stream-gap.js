/**
 * Experiment 8, fairness: a running stream's longest gap between two tokens while another
 * request's prompt arrives, against its step time (a step plus one prompt chunk is the most a
 * stream should wait: chunked prefill, docs/usage.md). The standard model in its default mode
 * (the prompt's chunks mixed into the stream's steps); LCKV w=2 in sequential mode (exact: the
 * prompt's tokens as rows of the stream's steps, batched token steps) and in iterative mode (the
 * reference's passes, the whole prompt in one call: the stream waits for all of it). The
 * default mode of an LCKV model beside one stream is the fixed point, which random weights do
 * not let converge (64 passes, then token by token, in the same call): not a figure a trained
 * model would give, so not run here.
 */
const { streamGap, poolBytesFor, log } = require("../measure");

/** [model, mode] rows; the prompt: 2048 tokens (128 with --tiny), within the model's context. */
const ROWS = [["standard", "default"], ["lckv-w2", "sequential"], ["lckv-w2", "iterative"]];

async function experimentStreamGap(bench) {
  const rows = [];
  for (const shape of bench.shapes) {
    for (const kvDtype of bench.kvDtypes) {
      for (const name of ["standard", "lckv-w2"].filter((m) => bench.models.includes(m))) {
        // The stream's request promises its whole context (it asks for endless tokens), so the
        // model's context is capped at the prompt and 1024 more (the stream's tokens while the
        // prompt goes in, one a step, pass it and shift its window), and the pool holds two such
        // contexts: otherwise the prompt would wait for pages that only the stream's end frees.
        const n = bench.tiny ? 128 : 2048;
        const probe = await bench.load(shape, name, kvDtype);
        const context = Math.min(n + 1024, probe.config.maxPositionEmbeddings);
        const pool = poolBytesFor(probe, 2, context);
        await probe.dispose();
        const model = await bench.load(shape, name, kvDtype, { maxContext: context, kvCacheMemory: pool });
        try {
          const kvType = bench.kvTypeOf(model, kvDtype);
          for (const [, mode] of ROWS.filter(([m]) => m === name)) {
            const g = await streamGap(model, n, Math.max(2, bench.repeats), mode === "default" ? undefined : mode);
            rows.push({ shape, model: name, kvDtype: kvType, mode, tokens: n, stepMs: g.stepMs, longestGapMs: g.longestGapMs, prefillMs: g.prefillMs });
            log(`exp8 ${shape} ${name} ${kvType ?? "default K/V"} ${mode} ${n}: step ${g.stepMs.median.toFixed(2)} ms, longest gap ${g.longestGapMs.median.toFixed(2)} ms, prefill ${g.prefillMs.median.toFixed(1)} ms`);
          }
        } finally {
          await model.dispose();
        }
      }
    }
  }
  return rows;
}

module.exports = { experimentStreamGap };
