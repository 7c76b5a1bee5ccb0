#!/usr/bin/env node
// Batch-1 decode speed against the memory-bandwidth roofline, for one model directory.
//   node scripts/bench/decode.js --model DIR --context 128,2048 --tokens 64 --copy-gbps 3000
// --copy-gbps: the device-to-device copy bandwidth measured in the same run (bytes read plus
// written per second / 1e9); the roofline per token = bytes that must be read / that rate.
const { parseArgs } = require("node:util");
const { loadModel } = require("../../dist");

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    context: { type: "string", default: "128,2048" },
    tokens: { type: "string", default: "64" },
    repeats: { type: "string", default: "3" },
    "copy-gbps": { type: "string" },
    device: { type: "string", default: "cuda" },
  },
});

(async () => {
  const model = await loadModel(values.model, { device: values.device });
  const c = model.config;
  const weightBytes = (() => {
    const E = c.hiddenSize, I = c.intermediateSize, qd = c.numHeads * c.headDim, kvd = c.numKvHeads * c.headDim;
    let b = 0;
    for (let i = 0; i < c.numLayers; i++) b += (2 * qd * E + 3 * I * E + (c.kvLayers.includes(i) ? 2 * kvd * E : 0)) * 2;
    return b + c.vocabSize * E * 2 /* lm_head */ + E * 2 /* one embedding row */;
  })();
  const rows = [];
  for (const ctx of values.context.split(",").map(Number)) {
    const prompt = Array.from({ length: ctx }, (_, i) => (i * 7919 + 13) % c.vocabSize);
    const n = +values.tokens;
    const times = [];
    for (let r = 0; r < +values.repeats + 1; r++) {
      // Prefill is not timed here: decode speed only. The iterative prefill is the fastest.
      const t0 = process.hrtime.bigint();
      const res = await model.generate(prompt, { maxNewTokens: n + 1, temperature: 0, ignoreEos: true, prefill: "iterative", prefillPasses: 1 });
      const t1 = process.hrtime.bigint();
      const tPrefill = await timePrefill(model, prompt);
      if (r > 0) times.push((Number(t1 - t0) / 1e6 - tPrefill) / n);
      if (res.tokens.length !== n + 1) throw new Error("short generation");
    }
    times.sort((a, b) => a - b);
    const ms = times[Math.floor(times.length / 2)];
    const kvBytes = model.kvBytesPerToken * (ctx + n / 2); // average context over the run
    const roofMs = values["copy-gbps"] ? ((weightBytes + kvBytes) / (+values["copy-gbps"] * 1e9)) * 1e3 : NaN;
    rows.push({ layerTypes: c.kvLayers.length === c.numLayers ? "standard" : `kv layers ${c.kvLayers.join(",")}`, context: ctx, msPerToken: ms, tokPerS: 1000 / ms, roofMs, ofRoofline: roofMs / ms, spread: (times[times.length - 1] - times[0]) / ms });
  }
  console.log(JSON.stringify(rows));
  await model.dispose();
})();

async function timePrefill(model, prompt) {
  const t0 = process.hrtime.bigint();
  await model.generate(prompt, { maxNewTokens: 1, temperature: 0, ignoreEos: true, prefill: "iterative", prefillPasses: 1 });
  return Number(process.hrtime.bigint() - t0) / 1e6;
}
