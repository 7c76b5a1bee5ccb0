#!/usr/bin/env node
/**
 * The quality of each K/V cache type (loadModel's kvCacheDtype) on trained models: perplexity on
 * a text (the same non-overlapping windows as `lckv eval-ppl`), and greedy agreement with the f32
 * cache over --prompts prompts cut from the same text (the share of prompts whose greedy
 * continuation is identical, and the mean number of tokens before the first difference).
 * Prints a Markdown table for docs/quality.md, and the figures as JSON with --json.
 *
 *   node scripts/eval/kv-quality.js --text validation.txt --model models/default --model DIR \
 *     [--types f32,bf16,fp8,int8,int4] [--max-tokens 20000] [--prompts 100] [--device cuda]
 */
const fs = require("node:fs");
const path = require("node:path");
const { Command } = require("commander");
const { loadModel, evaluatePerplexity, KV_CACHE_DTYPES } = require("../../dist");

const opt = new Command()
  .name("kv-quality")
  .requiredOption("--text <file>", "UTF-8 text to score and to cut prompts from")
  .option("--model <dir>", "a model directory (repeatable)", (v, acc) => [...acc, v], [])
  .option("--types <list>", "K/V cache types", KV_CACHE_DTYPES.join(","))
  .option("--window <n>", "tokens per perplexity window", "256")
  .option("--max-tokens <n>", "score the first n tokens of the text", "20000")
  .option("--prompts <n>", "prompts for greedy agreement", "100")
  .option("--prompt-tokens <n>", "tokens per prompt", "64")
  .option("--new-tokens <n>", "greedy tokens per prompt", "32")
  .option("--prefill <mode>", "prefill mode for perplexity (exact modes agree)", "sequential")
  .option("--device <d>", "cuda or cpu", "cuda")
  .option("--json <file>", "write the figures here")
  .parse()
  .opts();
const types = opt.types.split(",");
if (!types.includes("f32")) throw new Error("--types must include f32: agreement is measured against it");
const models = opt.model.length ? opt.model : [path.join(__dirname, "..", "..", "models", "default")];
const text = fs.readFileSync(opt.text, "utf8");
const log = (...a) => process.stderr.write(a.join(" ") + "\n");

(async () => {
  const rows = [];
  for (const dir of models) {
    let f32Greedy = null, f32Ppl = null;
    for (const kvCacheDtype of ["f32", ...types.filter((t) => t !== "f32")]) {
      const m = await loadModel(dir, { device: opt.device, dtype: "f32", kvCacheDtype, prefixCache: 0 });
      try {
        const ids = m.tokenizer.encode(text).slice(0, +opt.maxTokens);
        const ppl = await evaluatePerplexity(m, ids, { window: +opt.window, prefill: opt.prefill });
        // Prompts at evenly spaced offsets of the scored tokens.
        const P = +opt.prompts, len = +opt.promptTokens;
        const step = Math.floor((ids.length - len) / P);
        const greedy = [];
        for (let i = 0; i < P; i++) {
          const prompt = ids.slice(i * step, i * step + len);
          greedy.push((await m.generate(prompt, { maxNewTokens: +opt.newTokens, temperature: 0, ignoreEos: true, repetitionPenalty: 1 })).tokens);
        }
        if (kvCacheDtype === "f32") {
          f32Greedy = greedy;
          f32Ppl = ppl.perplexity;
        }
        let same = 0, prefix = 0;
        greedy.forEach((g, i) => {
          const want = f32Greedy[i];
          const d = g.findIndex((t, j) => t !== want[j]);
          if (d < 0) same++;
          prefix += d < 0 ? g.length : d;
        });
        const row = {
          model: path.basename(path.resolve(dir)),
          kvCacheDtype,
          kvBytesPerToken: m.kvBytesPerToken,
          perplexity: ppl.perplexity,
          vsF32: ppl.perplexity / f32Ppl - 1,
          tokens: ppl.predictedTokens,
          greedyIdentical: same / P,
          meanAgreeingTokens: prefix / P,
        };
        rows.push(row);
        log(`${row.model} ${kvCacheDtype}: ppl ${row.perplexity.toFixed(4)} (${(row.vsF32 * 100).toFixed(3)}%), greedy identical ${(row.greedyIdentical * 100).toFixed(0)}%`);
      } finally {
        await m.dispose();
      }
    }
  }
  const lines = [
    `| model | K/V type | bytes/token | perplexity | vs f32 | greedy identical to f32 (${opt.prompts} prompts x ${opt.newTokens} tokens) | mean tokens before a difference |`,
    "|---|---|---|---|---|---|---|",
    ...rows.map(
      (r) =>
        `| ${r.model} | ${r.kvCacheDtype} | ${r.kvBytesPerToken} | ${r.perplexity.toFixed(4)} | ${r.kvCacheDtype === "f32" ? "-" : `${r.vsF32 >= 0 ? "+" : ""}${(r.vsF32 * 100).toFixed(3)}%`} | ${(r.greedyIdentical * 100).toFixed(0)}% | ${r.meanAgreeingTokens.toFixed(1)} |`,
    ),
  ];
  process.stdout.write(lines.join("\n") + "\n");
  if (opt.json) fs.writeFileSync(opt.json, JSON.stringify({ options: opt, rows }, null, 2));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
