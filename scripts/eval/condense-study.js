#!/usr/bin/env node
/**
 * The quality of `lckv condense` (docs/condense.md): for a standard model, perplexity on held-out
 * text against the fraction of layers that keep their K/V, for the linear maps and for `share`
 * (A = B = I), optionally stacked with compact K/V cache types. Calibration text and evaluation
 * text must not overlap: pass the corpus's training part as --calib (scripts/train/data.py's
 * split) and its validation text as --text.
 *
 *   node scripts/eval/condense-study.js --model DIR --calib train-slice.txt --text validation.txt \
 *     [--ratios 0.75,0.5,0.375,0.25] [--methods linear,share] [--kv-dtypes f32,int8] [--device cpu]
 *
 * Prints a Markdown table; --json writes the figures.
 */
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { Command } = require("commander");
const { loadModel, evaluatePerplexity } = require("../../dist");
const { condenseModel } = require("../../dist/condense/condense");

const opt = new Command()
  .name("condense-study")
  .requiredOption("--model <dir>", "a standard model directory")
  .requiredOption("--calib <file>", "calibration text (not overlapping --text)")
  .requiredOption("--text <file>", "evaluation text")
  .option("--ratios <list>", "fractions of the layers' K/V kept", "0.75,0.5,0.375,0.25")
  .option("--methods <list>", "linear, share", "linear,share")
  .option("--kv-dtypes <list>", "K/V cache types the condensed models are evaluated in", "f32")
  .option("--max-tokens <n>", "evaluation tokens", "20000")
  .option("--calib-tokens <n>", "calibration tokens", "16384")
  .option("--window <n>", "evaluation window", "256")
  .option("--device <d>", "cpu or cuda", "cpu")
  .option("--json <file>", "write the figures here")
  .parse()
  .opts();
const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);
const log = (...a) => process.stderr.write(a.join(" ") + "\n");

async function perplexity(dir, kvCacheDtype, ids) {
  const m = await loadModel(dir, { device: opt.device, dtype: "f32", kvCacheDtype, prefixCache: 0 });
  try {
    // Standard and condensed models read no higher layer: fixed-point prefill is one exact pass.
    return (await evaluatePerplexity(m, ids, { window: +opt.window, prefill: "fixed-point" })).perplexity;
  } finally {
    await m.dispose();
  }
}

(async () => {
  const calib = fs.readFileSync(opt.calib, "utf8");
  const probe = await loadModel(opt.model, { device: opt.device, dtype: "f32", kvCacheDtype: "f32", prefixCache: 0 });
  const ids = probe.tokenizer.encode(fs.readFileSync(opt.text, "utf8"), { addSpecialTokens: false }).slice(0, +opt.maxTokens);
  const layers = probe.config.numLayers;
  await probe.dispose();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "lckv-condense-study-"));
  const rows = [];
  const types = list(opt.kvDtypes);
  if (!types.includes("f32")) types.unshift("f32");  // the reference every row is set against
  const base = {};
  for (const t of types) base[t] = await perplexity(opt.model, t, ids);
  for (const t of types) {
    rows.push({ method: "source", kept: 1, kvLayers: layers, kvCacheDtype: t, perplexity: base[t], vsSource: base[t] / base.f32 - 1 });
    log(`source ${t}: ${base[t].toFixed(4)}`);
  }
  for (const ratio of list(opt.ratios).map(Number)) {
    for (const method of list(opt.methods)) {
      const out = path.join(work, `${method}-${ratio}`);
      const t0 = Date.now();
      const r = await condenseModel(opt.model, { out, calibrationText: calib, ratio, method, device: opt.device, calibrationTokens: +opt.calibTokens });
      const seconds = (Date.now() - t0) / 1e3;
      for (const t of types) {
        const ppl = await perplexity(out, t, ids);
        const row = { method, kept: r.kvLayers.length / layers, ratio, kvLayers: r.kvLayers.length, layerTypes: r.layerTypes.join("_"), kvCacheDtype: t, perplexity: ppl, vsSource: ppl / base.f32 - 1, condenseSeconds: seconds, heldOut: r.perplexity };
        rows.push(row);
        log(`${method} ${ratio} (${row.layerTypes}) ${t}: ${ppl.toFixed(4)} (${(row.vsSource * 100).toFixed(2)}% vs the source in f32), condensed in ${seconds.toFixed(0)} s`);
      }
      fs.rmSync(out, { recursive: true, force: true });
    }
  }
  const lines = [
    `| method | K/V kept | layer_types | K/V type | perplexity | vs source (f32 cache) |`,
    "|---|---|---|---|---|---|",
    ...rows.map((r) => `| ${r.method} | ${r.kvLayers}/${layers} (${Math.round(r.kept * 100)}%) | ${r.layerTypes ?? "-"} | ${r.kvCacheDtype} | ${r.perplexity.toFixed(4)} | ${r.method === "source" && r.kvCacheDtype === "f32" ? "-" : `${r.vsSource >= 0 ? "+" : ""}${(r.vsSource * 100).toFixed(2)}%`} |`),
  ];
  process.stdout.write(lines.join("\n") + "\n");
  if (opt.json) fs.writeFileSync(opt.json, JSON.stringify({ options: opt, rows }, null, 2));
  fs.rmSync(work, { recursive: true, force: true });
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
