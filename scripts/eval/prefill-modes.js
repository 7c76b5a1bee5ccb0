#!/usr/bin/env node
// How LCKV's prefill modes compare on real text: 100 prompts of 256 tokens (consecutive
// non-overlapping windows of the validation text, encoded without special tokens).
//   node scripts/eval/prefill-modes.js --model models/default --text .data/validation.txt [--prompts 100] [--length 256]
// Prints, as JSON: fixed-point passes (median, max; default tolerance) and its largest logit
// difference from sequential; for iterative with m + b passes, the largest |logit| difference from sequential
// and the perplexity of each mode over the same predictions.
const fs = require("node:fs");
const { parseArgs } = require("node:util");
const { loadModel } = require("../../dist");

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    text: { type: "string" },
    prompts: { type: "string", default: "100" },
    length: { type: "string", default: "256" },
    device: { type: "string", default: "cpu" },
  },
});

function nll(logits, ids, V) {
  let s = 0;
  for (let t = 0; t + 1 < ids.length; t++) {
    const row = logits.subarray(t * V, (t + 1) * V);
    let mx = -Infinity;
    for (let j = 0; j < V; j++) mx = Math.max(mx, row[j]);
    let z = 0;
    for (let j = 0; j < V; j++) z += Math.exp(row[j] - mx);
    s += mx + Math.log(z) - row[ids[t + 1]];
  }
  return s;
}

(async () => {
  const model = await loadModel(values.model, { device: values.device });
  const V = model.config.vocabSize;
  const m = model.config.forwardPasses + model.config.backwardPasses;
  const ids = model.tokenizer.encode(fs.readFileSync(values.text, "utf8"), { addSpecialTokens: false });
  const n = +values.length;
  const passes = [];
  let bitExact = true;
  let maxDiff = 0;
  let maxDiffAfter = 0;
  let fpMaxDiff = 0;
  const total = { sequential: 0, fixedPoint: 0, iterative: 0, count: 0 };
  for (let p = 0; p < +values.prompts; p++) {
    const win = ids.slice(p * n, (p + 1) * n);
    if (win.length < n) break;
    const seq = await model.forward(win, { prefill: "sequential" });
    const fp = await model.forward(win, { prefill: "fixed-point" });
    const it = await model.forward(win, { prefill: "iterative", prefillPasses: m });
    passes.push(fp.passes);
    for (let i = 0; i < seq.logits.length; i++) {
      if (fp.logits[i] !== seq.logits[i]) bitExact = false;
      fpMaxDiff = Math.max(fpMaxDiff, Math.abs(fp.logits[i] - seq.logits[i]));
      const d = Math.abs(it.logits[i] - seq.logits[i]);
      maxDiff = Math.max(maxDiff, d);
      if (i < m * V && d > 1e-4) throw new Error(`iterative differs within the first ${m} positions`);
      if (i >= m * V) maxDiffAfter = Math.max(maxDiffAfter, d);
    }
    total.sequential += nll(seq.logits, win, V);
    total.fixedPoint += nll(fp.logits, win, V);
    total.iterative += nll(it.logits, win, V);
    total.count += win.length - 1;
    process.stderr.write(`\r${p + 1} prompts`);
  }
  process.stderr.write("\n");
  passes.sort((a, b) => a - b);
  const ppl = (x) => Math.exp(x / total.count);
  console.log(JSON.stringify({
    model: model.directory, prompts: passes.length, promptLength: n, iterativePasses: m,
    fixedPointPasses: { median: passes[Math.floor((passes.length - 1) / 2)], max: passes[passes.length - 1], min: passes[0] },
    fixedPointTolerance: 1e-6,
    fixedPointEqualsSequentialBitForBit: bitExact,
    fixedPointMaxAbsLogitDiff: fpMaxDiff,
    iterativeMaxAbsLogitDiff: maxDiff,
    perplexity: { sequential: ppl(total.sequential), fixedPoint: ppl(total.fixedPoint), iterative: ppl(total.iterative) },
  }, null, 2));
  await model.dispose();
})();
