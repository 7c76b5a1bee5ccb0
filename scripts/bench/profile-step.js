#!/usr/bin/env node
/**
 * Times decode steps of one model at one batch size and context (each sequence with a prompt of
 * its own), for looking at where a step's time goes. With LCKV_PROFILE=1 the CUDA backend prints its per-op table (CUDA events) when
 * the model is disposed; docs/profiling.md explains both.
 *
 *   LCKV_PROFILE=1 node scripts/bench/profile-step.js --context 2048 --batch 1
 *   node scripts/bench/profile-step.js --layer-types 0_20_20_..._20_21 --batch 16
 *   node scripts/bench/profile-step.js --prefill 2048
 *
 * With --prefill it times prompts instead, as the bench's experiment 3 does (lonePrompts): that
 * many tokens appended to fresh sequences back to back and ended by a host sync, since append()
 * resolves when the work is queued, not done; 7 samples (the median and the fastest). Each prompt
 * goes in the engine's chunks, as a request's would, in the model's default prefill mode or
 * --prefill-mode's.
 *
 * Without --model it writes (once) a TinyLlama-1.1B-shaped model with random bf16 weights.
 */
const fs = require("node:fs");
const path = require("node:path");
const { Command } = require("commander");
const { loadModel } = require("../../dist");
const { randomPrefixes, stepMs } = require("./measure");
const { lonePrompts } = require("./experiments/prefill");
const { profilingModelDir } = require("./models");

const opt = new Command()
  .name("profile-step")
  .option("--model <dir>", "a model directory (default: a random TinyLlama-shaped model)")
  .option("--layer-types <pattern>", "for the random model: its layer_types (default: standard)")
  .option("--context <n>", "tokens in each sequence before the timed steps", "2048")
  .option("--batch <n>", "sequences decoding together", "1")
  .option("--steps <n>", "timed decode steps (after 8 of warm-up)", "64")
  .option("--prefill <tokens>", "time prompts of this many tokens instead of decode steps")
  .option("--prefill-mode <mode>", "with --prefill: an LCKV prompt's mode (append's prefill option; default: the model's)")
  .option("--device <d>", "cuda or cpu", "cuda")
  .option("--kv-dtype <type>", "the K/V cache's value type (loadModel's kvCacheDtype; default: the engine's)")
  .option("--no-run-ahead", "do not queue each step's successor before its tokens reach JavaScript (loadModel's runAhead)")
  .parse()
  .opts();

const context = +opt.context, batch = +opt.batch, steps = +opt.steps;
const dir = opt.model ?? profilingModelDir(opt.layerTypes);

(async () => {
  // A pool that holds every sequence's tokens at f32 (the widest K/V type), every layer caching.
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8"));
  const headDim = cfg.head_dim ?? cfg.hidden_size / cfg.num_attention_heads;
  const widestBytesPerToken = cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads ?? cfg.num_attention_heads) * headDim * 4;
  const poolTokens = batch * (context + steps + 8 + 32);
  const model = await loadModel(dir, {
    device: opt.device,
    prefixCache: 0,
    maxBatch: Math.max(batch, 1),
    kvCacheMemory: Math.max(2 ** 30, poolTokens * widestBytesPerToken),
    runAhead: opt.runAhead,
    ...(opt.kvDtype ? { kvCacheDtype: opt.kvDtype } : {}),
  });
  const V = model.config.vocabSize;
  if (opt.prefill) {
    const n = +opt.prefill;
    const tokens = Array.from({ length: n }, (_, i) => (i * 7919 + 13) % V);
    const { t, perSample } = await lonePrompts({ repeats: 7 }, model, tokens, opt.prefillMode);
    const mode = opt.prefillMode ?? "default mode";
    console.log(`${path.basename(dir)} (${model.kvCacheDtype ?? "f32"} K/V, ${mode}): prefill of ${n} tokens: median ${t.median.toFixed(2)} ms, fastest ${Math.min(...t.samples).toFixed(2)} ms, ${((n * 1e3) / t.median).toFixed(0)} tokens/s (${perSample} prompts a sample)`);
    await model.dispose();
    return;
  }
  // A prompt of its own per sequence: forks of one prompt would share its pages, and at 2048
  // tokens a prompt's K/V (46 MB at the 1.1B shape in bf16) fits in the H100's 50 MB L2, so the
  // attention of a forked batch reads much of it from L2 and times faster than real traffic.
  const seqs = await randomPrefixes(model, batch, context);
  await stepMs(seqs, 8);
  const msPerStep = await stepMs(seqs, steps);
  console.log(
    `${path.basename(dir)} (${model.kvCacheDtype ?? "f32"} K/V): batch ${batch}, context ${context}: ${msPerStep.toFixed(3)} ms/step, ${((batch * 1e3) / msPerStep).toFixed(0)} tokens/s`,
  );
  for (const s of seqs) s.dispose();
  await model.dispose();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
