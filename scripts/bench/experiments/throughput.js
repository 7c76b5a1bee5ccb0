/**
 * Experiment 1, the paper's throughput experiment: for each length pair, the largest batch the
 * K/V pool holds (the engine's own accounting, verified by the pool), and FULL generations at
 * that batch — every request prefills its prompt and generates every one of its tokens. Reported:
 * end-to-end throughput (generated tokens over wall time, prefill included), the decode step alone
 * at that batch, and the inputs of the decode bound (costs.js).
 */
const { generation, ownDecodeMs, randomPrefixes, sequencePages, summary, log } = require("../measure");
const { weightBytes, kvBytesPerElement, attentionBytes } = require("../costs");

/** Prompt + generation lengths per shape: the paper's, and 5+8187 at the 1.1B shape only. */
const LENGTHS = { "1.1b": [[512, 1024], [2048, 2048], [5, 8187]], "7b": [[512, 1024], [2048, 2048]] };
const TINY_LENGTHS = { "1.1b": [[32, 64], [128, 128], [5, 251]], "7b": [[32, 64], [128, 128]] };
/** The shipped default model's context is 256 tokens: the same three kinds of request, scaled into it. */
const DEFAULT_MODEL_LENGTHS = [[32, 224], [128, 128], [5, 251]];
/** The untimed warm-up run's requests: prompt tokens (at most) and tokens generated. */
const WARM_UP_PROMPT = 16;
const WARM_UP_TOKENS = 32;

async function experimentThroughput(bench) {
  const rows = [];
  for (const shape of bench.shapes) {
    for (const kvDtype of bench.kvDtypes) {
      for (const name of bench.models) {
        if (name === "default" && shape !== "1.1b") continue;
        const model = await bench.load(shape, name, kvDtype);
        const st = model.cacheStats();
        const c = model.config;
        const kvType = bench.kvTypeOf(model, kvDtype);
        const kvName = kvType ?? "default K/V";
        // A model with a cyclic group prefills exactly, token by token: with other requests in
        // flight that is batched token steps, every prompt's next token a row of the shared step
        // (docs/usage.md), the throughput path of the engine's default mode too, which takes it
        // from 16 other requests on; below that the default runs the fixed point, which random
        // weights never let converge (64 passes, then token by token). A model without one
        // takes the default: its prompts go in chunks mixed into the decode steps.
        const prefill = model.config.plan.cyclicGroup ? "sequential" : undefined;
        for (const [prompt, gen] of name === "default" ? DEFAULT_MODEL_LENGTHS : bench.lengths(shape, bench.tiny ? TINY_LENGTHS : LENGTHS)) {
          const base = { shape, model: name, kvDtype: kvType, prompt, gen, kvPoolGiB: bench.poolGiB(shape) };
          if (prompt + gen > model.maxContext) {
            rows.push({ ...base, skipped: `context ${model.maxContext} < ${prompt + gen}` });
            continue;
          }
          // An int4 sequence's residual pages included: without them the batch would not all fit.
          const batch = Math.floor(st.pagesTotal / sequencePages(st, prompt + gen));
          log(`exp1 ${shape} ${name} ${kvName} ${prompt}+${gen}: batch ${batch}`);
          // Verified by the pool itself: `batch` sequences can all reserve their full length at
          // once (none waits), and one more has to wait.
          const held = Array.from({ length: batch + 1 }, () => model.createSequence());
          const admitted = await Promise.all(held.slice(0, batch).map((s) => s.reserveRequest(prompt, gen)));
          const waiting = held[batch].reserveRequest(prompt, gen);
          await new Promise((r) => setImmediate(r));
          const verified = admitted.every(Boolean) && model.cacheStats().queued === 1;
          for (const s of held.slice(0, batch)) s.dispose();
          await waiting;
          held[batch].dispose();
          // An untimed warm-up of the same batch, which records the CUDA graphs of its decode
          // steps: short prompts (the graphs depend on the batch, not on the prompt), 32 tokens
          // each. Then full generations.
          await generation(model, Math.min(prompt, WARM_UP_PROMPT), gen, batch, WARM_UP_TOKENS, prefill);
          const runs = [];
          for (let r = 0; r < bench.generationRuns; r++) runs.push(await generation(model, prompt, gen, batch, gen, prefill));
          // The decode step alone at this batch, at the middle of the generation (prompt + gen / 2
          // tokens of context): a sequence of its own for each of the batch, which generates and is rewound
          // for the next run. Forks of fewer prefixes would share pages, and the attention would
          // find their K/V in L2 where the full generation reads it from memory; and a fork writing
          // a shared page copies it first, which the pool, sized for this batch, has no room for.
          const decodeContext = prompt + Math.floor(gen / 2);
          const decoding = await randomPrefixes(model, batch, decodeContext);
          const decodeMs = await ownDecodeMs(decoding, bench.tiny ? 4 : 16, bench.repeats);
          for (const s of decoding) s.dispose();
          const bytesPerElement = kvBytesPerElement(c, model.kvBytesPerToken);
          rows.push({
            ...base, batch, verified,
            wallMs: summary(runs.map((x) => x.ms)),
            generatedTokens: runs[0].tokens,
            tokPerS: summary(runs.map((x) => x.tokPerS)),
            lastFirstTokenMs: summary(runs.map((x) => x.lastFirstTokenMs)),
            // The share of the prompt tokens that went as rows of the shared steps (rows
            // measured before these fields ran the iterative prefill).
            prefill: prefill ?? "default",
            sharedPromptShare: runs[0].sharedPromptTokens / (batch * prompt),
            decodeContext, decodePrefixes: decoding.length, decodeMsPerStep: decodeMs, decodeTokPerS: (batch * 1e3) / decodeMs.median,
            kvBytesPerToken: model.kvBytesPerToken, kvBytesPerElement: bytesPerElement, pagesTotal: st.pagesTotal,
            // The decode bound's inputs (costs.js): W, and A at the middle of the generation.
            weightBytes: weightBytes(c), attentionBytes: attentionBytes(c, decodeContext, bytesPerElement),
          });
        }
        await model.dispose();
      }
    }
  }
  return rows;
}

module.exports = { experimentThroughput, LENGTHS, TINY_LENGTHS };
