#!/usr/bin/env node
/**
 * The quality of `lckv condense` (docs/condense.md): for a standard model, perplexity on held-out
 * text against the fraction of layers that keep their K/V, for the linear maps and for `share`
 * (A = B = I), optionally stacked with compact K/V cache types. Calibration text and evaluation
 * text must not overlap: pass the corpus's training part as --calib (scripts/train/data.py's
 * split) and its validation text as --text.
 *
 *   node scripts/eval/condense-study.js --model DIR --calib train-slice.txt --text validation.txt \
 *     [--ratios 0.75,0.5,0.375,0.25] [--methods linear,share] [--kv-dtypes f32,int8] [--device cpu] \
 *     [--jobs N] [--keep DIR]
 *
 * Each condensed model is made by `lckv condense` in a child process, --jobs of them at a time
 * (the calibration statistics are summed in JavaScript, one core per model: on a machine of many
 * cores the models come out together); --keep writes them to DIR/<method>-<ratio> and keeps
 * them. Prints a Markdown table; --json writes the figures.
 */
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { execFile } = require("node:child_process");
const { Command } = require("commander");
const { loadModel, evaluatePerplexity } = require("../../dist");

const CLI = path.join(__dirname, "..", "..", "dist", "cli.js");

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
  .option("--jobs <n>", "condensed models made at a time", "1")
  .option("--keep <dir>", "keep the condensed models in this directory (which must not hold them yet)")
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

/** `lckv condense` in a child process: its report, and the seconds it took. */
function condense(ratio, method, out) {
  const args = [CLI, "condense", opt.model, "--out", out, "--calib", opt.calib, "--ratio", String(ratio), "--method", method,
    "--device", opt.device, "--calib-tokens", String(opt.calibTokens), "--json"];
  const t0 = Date.now();
  return new Promise((resolve, reject) => {
    execFile(process.execPath, args, { maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`lckv condense --method ${method} --ratio ${ratio} failed: ${stderr || err.message}`));
      else resolve({ report: JSON.parse(stdout), seconds: (Date.now() - t0) / 1e3 });
    });
  });
}

/** fn over every task, at most n at a time; the results in the order of the tasks. */
async function inPool(tasks, n, fn) {
  const results = new Array(tasks.length);
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) {
      const k = next++;
      results[k] = await fn(tasks[k]);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(n, tasks.length)) }, worker));
  return results;
}

(async () => {
  const probe = await loadModel(opt.model, { device: opt.device, dtype: "f32", kvCacheDtype: "f32", prefixCache: 0 });
  const ids = probe.tokenizer.encode(fs.readFileSync(opt.text, "utf8"), { addSpecialTokens: false }).slice(0, +opt.maxTokens);
  const layers = probe.config.numLayers;
  await probe.dispose();
  const work = opt.keep ?? fs.mkdtempSync(path.join(os.tmpdir(), "lckv-condense-study-"));
  fs.mkdirSync(work, { recursive: true });
  const rows = [];
  const types = list(opt.kvDtypes);
  if (!types.includes("f32")) types.unshift("f32");  // the reference every row is set against
  const base = {};
  for (const t of types) base[t] = await perplexity(opt.model, t, ids);
  for (const t of types) {
    rows.push({ method: "source", kept: 1, kvLayers: layers, kvCacheDtype: t, perplexity: base[t], vsSource: base[t] / base.f32 - 1 });
    log(`source ${t}: ${base[t].toFixed(4)}`);
  }
  const tasks = list(opt.ratios).map(Number).flatMap((ratio) => list(opt.methods).map((method) => ({ ratio, method, out: path.join(work, `${method}-${ratio}`) })));
  const made = await inPool(tasks, +opt.jobs, async ({ ratio, method, out }) => {
    const m = await condense(ratio, method, out);
    log(`condensed ${method} ${ratio}: ${m.report.layerTypes.join("_")} in ${m.seconds.toFixed(0)} s`);
    return m;
  });
  for (const [k, { ratio, method, out }] of tasks.entries()) {
    const { report: r, seconds } = made[k];
    for (const t of types) {
      const ppl = await perplexity(out, t, ids);
      const row = { method, kept: r.kvLayers.length / layers, ratio, kvLayers: r.kvLayers.length, layerTypes: r.layerTypes.join("_"), kvCacheDtype: t, perplexity: ppl, vsSource: ppl / base.f32 - 1, condenseSeconds: seconds, heldOut: r.perplexity };
      rows.push(row);
      log(`${method} ${ratio} (${row.layerTypes}) ${t}: ${ppl.toFixed(4)} (${(row.vsSource * 100).toFixed(2)}% vs the source in f32)`);
    }
    if (!opt.keep) fs.rmSync(out, { recursive: true, force: true });
  }
  const lines = [
    `| method | K/V kept | layer_types | K/V type | perplexity | vs source (f32 cache) |`,
    "|---|---|---|---|---|---|",
    ...rows.map((r) => `| ${r.method} | ${r.kvLayers}/${layers} (${Math.round(r.kept * 100)}%) | ${r.layerTypes ?? "-"} | ${r.kvCacheDtype} | ${r.perplexity.toFixed(4)} | ${r.method === "source" && r.kvCacheDtype === "f32" ? "-" : `${r.vsSource >= 0 ? "+" : ""}${(r.vsSource * 100).toFixed(2)}%`} |`),
  ];
  process.stdout.write(lines.join("\n") + "\n");
  if (opt.json) fs.writeFileSync(opt.json, JSON.stringify({ options: opt, rows }, null, 2));
  if (!opt.keep) fs.rmSync(work, { recursive: true, force: true });
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
