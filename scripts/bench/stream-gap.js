#!/usr/bin/env node
/**
 * Fairness: how long a running stream waits for its next token while another request's prompt
 * is prefilled. One stream decodes; after it has produced a few tokens, a second request with a
 * prompt of --prompt tokens arrives; the report is the running stream's longest gap between two
 * tokens while that prompt was being prefilled, beside its median gap before it arrived (the
 * step time) and the time the prompt's prefill took.
 *
 *   node scripts/bench/stream-gap.js [--model DIR] [--device cpu|cuda] [--prompt 250] [--kv-dtype bf16]
 */
const { Command } = require("commander");
const { loadModel } = require("../../dist");
const { summary } = require("./measure");

const opt = new Command()
  .name("stream-gap")
  .option("--model <dir>", "a model directory (default: the embedded model)")
  .option("--device <d>", "cpu or cuda", "cpu")
  .option("--prompt <n>", "tokens of the arriving prompt", "250")
  .option("--kv-dtype <type>", "the K/V cache's value type (default: the engine's)")
  .option("--repeats <n>", "arrivals measured (the median is reported)", "3")
  .parse()
  .opts();

(async () => {
  const model = await loadModel(opt.model, { device: opt.device, prefixCache: 0, ...(opt.kvDtype ? { kvCacheDtype: opt.kvDtype } : {}) });
  const V = model.config.vocabSize;
  const n = Math.min(+opt.prompt, model.maxContext - 8);
  const results = [];
  for (let rep = 0; rep < +opt.repeats; rep++) {
    const stamps = [];
    let arrival = 0, prefilled = 0, arriving;
    // The stream runs until 200 ms after the prompt's prefill (an LCKV prompt that goes as
    // batched token steps takes as many steps as it has tokens), shifting its context if it must.
    const stream = model.stream([1, 2, 3, 4], { maxNewTokens: 1e6, contextShift: "sink-window", temperature: 0, ignoreEos: true });
    const reader = (async () => {
      for await (const chunk of stream) {
        stamps.push(performance.now());
        if (stamps.length === 16) {
          arrival = performance.now();
          const prompt = Array.from({ length: n }, (_, i) => (i * 37 + rep * 11 + 5) % V);
          arriving = model.generate(prompt, { maxNewTokens: 1, temperature: 0 }).then(() => (prefilled = performance.now()));
        }
        if (prefilled && performance.now() - prefilled > 200) break;
      }
    })();
    await reader;
    await arriving;
    const gaps = stamps.slice(1).map((t, i) => [stamps[i], t - stamps[i]]);
    const before = gaps.filter(([t]) => t < arrival).map(([, g]) => g);
    const during = gaps.filter(([t, g]) => t + g > arrival && t < prefilled).map(([, g]) => g);
    results.push({ stepMs: summary(before).median, longestGapMs: Math.max(...during), prefillMs: prefilled - arrival });
  }
  const med = (k) => summary(results.map((r) => r[k])).median;
  console.log(
    JSON.stringify({ device: model.device, model: model.directory, kvCacheDtype: model.kvCacheDtype, promptTokens: n, stepMs: med("stepMs"), longestGapMs: med("longestGapMs"), prefillMs: med("prefillMs"), runs: results }),
  );
  await model.dispose();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
