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
const { streamGap } = require("./measure");

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
  const n = Math.min(+opt.prompt, model.maxContext - 8);
  const g = await streamGap(model, n, +opt.repeats);
  console.log(
    JSON.stringify({ device: model.device, model: model.directory, kvCacheDtype: model.kvCacheDtype, promptTokens: n, stepMs: g.stepMs.median, longestGapMs: g.longestGapMs.median, prefillMs: g.prefillMs.median, runs: g.runs }),
  );
  await model.dispose();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
