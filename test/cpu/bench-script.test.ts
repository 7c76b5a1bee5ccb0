/**
 * `npm run bench` (scripts/bench/run.js) on tiny shapes and the CPU: the script's own logic —
 * batch accounting verified by the pool, full generations, warm-up then median, the decode bound
 * beside every row, a part of the full protocol in a results file of its own, the report and its
 * charts — runs here, where CI sees it, and not only on the GPU machine. Its figures mean nothing
 * at these shapes.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { testTempDir } from "../helpers/temp-dir";

/* eslint-disable @typescript-eslint/no-var-requires */
const { decodeGainBound, forwardFlops, fullGenerationFloorMs } = require("../../scripts/bench/costs.js");
const { TINY_SHAPES } = require("../../scripts/bench/models.js");
const { renderReport } = require("../../scripts/bench/report.js");

const root = path.join(__dirname, "..", "..");
const runJs = path.join(root, "scripts", "bench", "run.js");
let out: string;
let results: Record<string, any>;
let part: Record<string, any>;
let stacked: Record<string, any>;
let report: string;

function bench(args: string[]) {
  return spawnSync(process.execPath, [runJs, "--tiny", "--device", "cpu", "--out", out, "--work", path.join(out, "models"), "--llama-peer", path.join(out, "no-llama-peer"), ...args], { encoding: "utf8", timeout: 120_000 });
}

beforeAll(() => {
  out = testTempDir("lckv-bench-script-");
  // The default set's experiments (the Python peers need the GPU), then one part of the full
  // protocol at the other shape (no GQA), which goes into a file of its own.
  const first = bench(["--only", "1,2,3,5,6,7,8", "--models", "standard,lckv-w2", "--kv-memory", "0.002", "--repeats", "2"]);
  if (first.status !== 0) throw new Error(first.stderr);
  const second = bench(["--full", "--only", "1", "--shapes", "7b", "--lengths", "32+64", "--models", "standard,lckv-w2,cla", "--kv-memory", "0.002", "--repeats", "2"]);
  if (second.status !== 0) throw new Error(second.stderr);
  // The same part with LCKV's cache in int4 beside the standard model in bf16 (the stacked table).
  const third = bench(["--full", "--only", "1", "--shapes", "7b", "--lengths", "32+64", "--models", "standard,lckv-w2", "--kv-dtypes", "bf16,int4", "--kv-memory", "0.002", "--repeats", "2"]);
  if (third.status !== 0) throw new Error(third.stderr);
  stacked = JSON.parse(fs.readFileSync(path.join(out, "bench", "full-custom-1-7b.bf16+int4.json"), "utf8"));
  results = JSON.parse(fs.readFileSync(path.join(out, "bench", "results.json"), "utf8"));
  part = JSON.parse(fs.readFileSync(path.join(out, "bench", "full-custom-1-7b.json"), "utf8"));
  report = fs.readFileSync(path.join(out, "benchmarks.md"), "utf8");
}, 360_000);

afterAll(() => fs.rmSync(out, { recursive: true, force: true }));

test("experiment 1: full generations of every request, at the batch the pool verified, with the bound's inputs", () => {
  const rows = results.throughput as any[];
  expect(rows).toHaveLength(6);
  for (const r of rows) {
    expect(r.shape).toBe("1.1b");
    expect(r.verified).toBe(true);
    expect(r.batch).toBeGreaterThan(0);
    // Every token of every request, twice (two timed runs after the warm-up).
    expect(r.generatedTokens).toBe(r.batch * r.gen);
    expect(r.tokPerS.samples).toHaveLength(2);
    r.tokPerS.samples.forEach((t: number, i: number) => expect(t).toBeCloseTo((r.generatedTokens / r.wallMs.samples[i]) * 1e3, 6));
    expect(r.lastFirstTokenMs.median).toBeLessThanOrEqual(r.wallMs.median);
    // The generation phase alone, at the same batch, mid-generation.
    expect(r.decodeContext).toBe(r.prompt + Math.floor(r.gen / 2));
    // Each sequence of the decode timing holds a prefix of its own: no pages shared.
    expect(r.decodePrefixes).toBe(r.batch);
    expect(r.decodeMsPerStep.samples).toHaveLength(2);
    expect(r.decodeTokPerS).toBeCloseTo((r.batch * 1e3) / r.decodeMsPerStep.median, 6);
    // A = layers x context x 2 x K/V heads x head size x bytes: 6 layers, 2 K/V heads of 32, in
    // the engine's default K/V type (bf16).
    expect(r.kvBytesPerElement).toBe(2);
    expect(r.attentionBytes).toBe(6 * r.decodeContext * 2 * 2 * 32 * 2);
    expect(r.weightBytes).toBeGreaterThan(0);
  }
  // LCKV prefills exactly, as batched token steps among the other requests; the standard model
  // takes the default, its chunks mixed into the decode steps: every prompt token but the last a
  // row of a shared step either way, at these batches (the last goes with the request's first
  // sampled step, which counts as decoding).
  for (const r of rows) {
    expect(r.prefill).toBe(r.model === "lckv-w2" ? "sequential" : "default");
    expect(r.batch).toBeGreaterThan(1);
    expect(r.sharedPromptShare).toBeCloseTo((r.prompt - 1) / r.prompt, 12);
  }
  for (const [prompt, gen] of [[32, 64], [128, 128], [5, 251]]) {
    const of = (m: string) => rows.find((r) => r.model === m && r.prompt === prompt && r.gen === gen);
    expect(of("lckv-w2").batch).toBeGreaterThan(of("standard").batch);
    expect(of("lckv-w2").kvBytesPerToken).toBeLessThan(of("standard").kvBytesPerToken);
    // LCKV drops the K/V projections of the layers that do not cache: fewer weight bytes; the same A.
    expect(of("lckv-w2").weightBytes).toBeLessThan(of("standard").weightBytes);
    expect(of("lckv-w2").attentionBytes).toBe(of("standard").attentionBytes);
  }
  // The variants link to the shape's one weights file instead of writing their own.
  const lckvWeights = path.join(out, "models", "tiny-gqa", "lckv-w2", "model.safetensors");
  expect(fs.lstatSync(lckvWeights).isSymbolicLink()).toBe(true);
  expect(fs.realpathSync(lckvWeights)).toBe(fs.realpathSync(path.join(out, "models", "tiny-gqa", "standard", "model.safetensors")));
});

test("a part of the full protocol: its own file, the other shape (no GQA), one timed generation, the lengths asked for", () => {
  expect(part.full).toBe(true);
  expect(part.generationRuns).toBe(1);
  // The invocation as recorded: the options that only name directories (--out, --work,
  // --llama-peer) are left out.
  expect(part.command).toBe("npm run bench -- --tiny --device cpu --full --only 1 --shapes 7b --lengths 32+64 --models standard,lckv-w2,cla --kv-memory 0.002 --repeats 2");
  const rows = part.throughput as any[];
  expect(rows.map((r) => r.model)).toEqual(["standard", "lckv-w2", "cla"]);
  for (const r of rows) {
    expect([r.shape, r.prompt, r.gen]).toEqual(["7b", 32, 64]);
    expect(r.tokPerS.samples).toHaveLength(1);
    expect(r.generatedTokens).toBe(r.batch * r.gen);
  }
  // No GQA: 4 K/V heads of 32, bf16 (the default), 6 layers for the standard model.
  expect(rows[0].kvBytesPerToken).toBe(6 * 2 * 4 * 32 * 2);
  // The default set's file was left alone.
  expect(results.throughput.every((r: any) => r.shape === "1.1b")).toBe(true);
});

test("the stacked table: LCKV in int4 against the standard model in bf16, at the same shape, lengths and pool", () => {
  const rows = stacked.throughput as any[];
  expect(rows.map((r) => `${r.model} ${r.kvDtype}`).sort()).toEqual(["lckv-w2 bf16", "lckv-w2 int4", "standard bf16", "standard int4"]);
  const of = (m: string, t: string) => rows.find((r) => r.model === m && r.kvDtype === t);
  const std = of("standard", "bf16"), lckv = of("lckv-w2", "int4");
  // int4 and the condensed layers both shrink the cache: the pool holds a larger batch, and every
  // request of it ran (an int4 sequence's residual pages counted: without them the batch was
  // larger than the pool admits, and the run waited for pages forever).
  expect(lckv.batch).toBeGreaterThan(std.batch);
  for (const r of rows) {
    expect(r.verified).toBe(true);
    expect(r.generatedTokens).toBe(r.batch * r.gen);
  }
  const section = report.slice(report.indexOf("### Stacked: a condensed cache in a compact type against the standard model in bf16"));
  expect(section.length).toBeGreaterThan(0);
  const ratio = (x: number) => `${x.toFixed(2)}x`;
  expect(section).toContain(
    `| lckv-w2 | int4 | 32+64 | ${lckv.batch} vs ${std.batch} (${(lckv.batch / std.batch).toFixed(1)}x) | ${ratio(lckv.tokPerS.median / std.tokPerS.median)} | ${ratio(lckv.decodeTokPerS / std.decodeTokPerS)} |`,
  );
  // Only compact types are stacked: LCKV's bf16 row is compared in the main table, not here.
  expect(section.split("\n\n")[2]).not.toContain("| lckv-w2 | bf16 |");
});

test("experiment 8: a running stream's gaps while a prompt arrives, per model and mode, over the arrivals", () => {
  const rows = results.streamGap as any[];
  expect(rows.map((r) => `${r.model} ${r.mode}`)).toEqual(["standard default", "lckv-w2 sequential", "lckv-w2 iterative"]);
  for (const r of rows) {
    expect(r.tokens).toBe(128);
    // Two arrivals each (--repeats 2); the longest gap while the prompt was prefilled is at
    // least the stream's typical step, and the prefill took time.
    for (const k of ["stepMs", "longestGapMs", "prefillMs"]) expect(r[k].samples).toHaveLength(2);
    r.stepMs.samples.forEach((step: number, i: number) => {
      expect(step).toBeGreaterThan(0);
      expect(r.longestGapMs.samples[i]).toBeGreaterThan(0);
      expect(r.prefillMs.samples[i]).toBeGreaterThan(0);
    });
  }
  expect(report).toContain("## 8. A running stream while a prompt arrives");
  expect(report).toMatch(/\| lckv-w2 \| .* \| iterative \| 128 \| /);
});

test("experiments 2, 3 and 5 wrote their rows with finite timings; experiment 6 says why it has none", () => {
  for (const key of ["decode", "prefill", "attention"]) {
    const rows = results[key] as any[];
    expect(rows.length).toBeGreaterThan(0);
    for (const r of rows) expect(Number.isFinite(r.ms?.median ?? r.msPerStep?.median)).toBe(true);
  }
  // Experiment 2: small batches time sequences of their own (one prefix a row); a batch past what
  // the pool holds that way forks fewer prefixes, and the report marks it.
  const decode = (results.decode as any[]).filter((r) => !r.context);
  for (const r of decode) expect(r.prefixes).toBeLessThanOrEqual(r.batch);
  expect(decode.filter((r) => r.batch > 1).some((r) => r.prefixes === r.batch)).toBe(true);
  for (const r of decode) {
    // (The tiny run's context: 128 tokens.)
    const line = report.split("\n").find((l) => l.includes(` | ${r.model} | `) && new RegExp(`\\| 128 \\| ${r.batch}( \\(max\\))?( ‡)? \\| ${r.msPerStep.median.toFixed(2)} \\|`).test(l));
    expect(line).toBeDefined();
    expect(line!.includes(" ‡ ")).toBe(r.prefixes < r.batch);
  }
  const modes = new Set((results.prefill as any[]).filter((r) => r.model === "lckv-w2").map((r) => r.mode));
  expect([...modes].sort()).toEqual(["fixed-point", "iterative", "sequential"]);
  expect(Object.keys(results.experimentSeconds).sort()).toEqual(["attention", "decode", "kvTypes", "llamaPeer", "prefill", "setup", "streamGap", "throughput"]);
  expect(results.llamaPeer).toEqual([{ shape: "1.1b", error: expect.stringContaining("node-llama-cpp is not installed") }]);
  expect(results.llamaPeer[0].error).toContain("prepare.sh");
});

test("experiment 3, many prompts at once: every prompt a row of the shared steps, timed together", () => {
  const rows = results.prefill as any[];
  const many = rows.filter((r) => r.prompts > 1);
  // --tiny's counts: the standard model in its default mode (mixed steps), LCKV w=2 in sequential
  // mode (batched token steps).
  expect(many.map((r) => [r.shape, r.model, r.mode, r.prompts, r.tokens])).toEqual([
    ["1.1b", "standard", "default", 4, 128],
    ["1.1b", "lckv-w2", "sequential", 8, 128],
  ]);
  // The tiny GQA shape (models.js): 6 layers, hidden 128, 4 heads of 32, 2 K/V heads, MLP 256,
  // vocab 512; LCKV w=2 caches layers 0, 4 and 5.
  const config = (kvLayers: number[]) => ({ hiddenSize: 128, intermediateSize: 256, numHeads: 4, numKvHeads: 2, headDim: 32, numLayers: 6, vocabSize: 512, kvLayers });
  const kvLayers: Record<string, number[]> = { standard: [0, 1, 2, 3, 4, 5], "lckv-w2": [0, 4, 5] };
  for (const r of many) {
    expect(r.ms.samples).toHaveLength(2);
    expect(r.tokPerS).toBeGreaterThan(0);
    expect(r.tokPerS).toBeCloseTo((r.prompts * r.tokens * 1e3) / r.ms.median, 6);
    const flops = r.prompts * forwardFlops(config(kvLayers[r.model]), r.tokens);
    expect(r.tflops).toBeCloseTo(flops / (r.ms.median / 1e3) / 1e12, 12);
    // Every prompt went in whole, all of it as rows of the scheduler's shared steps (the pool held
    // every prompt, so none waited for pages and went in alone after the others).
    expect(r.prefilledTokens).toBe(r.prompts * r.tokens);
    expect(r.batchedTokens).toBe(r.prompts * r.tokens);
    expect(r.rowsPerStep).toBeCloseTo(r.batchedTokens / r.steps, 10);
    expect(r.rowsPerStep).toBeGreaterThan(1);
    expect(r.passes).toBe(1);
  }
  // Batched token steps: one token of each prompt a step, so at least a step per token, at most a
  // row per prompt in each, and some step carried every prompt.
  const lckv = many.find((r) => r.model === "lckv-w2");
  expect(lckv.steps).toBeGreaterThanOrEqual(lckv.tokens);
  expect(lckv.rowsPerStep).toBeLessThanOrEqual(lckv.prompts);
  expect(lckv.maxStepSequences).toBe(lckv.prompts);
  // Mixed steps: the prompts take turns at the CPU's chunk of 64 rows a step.
  const std = many.find((r) => r.model === "standard");
  expect(std.rowsPerStep).toBeLessThanOrEqual(64);
  expect(std.steps).toBeGreaterThanOrEqual((std.prompts * std.tokens) / 64);
  // One prompt at a time: native prefill calls, no scheduler rows.
  // Each of their samples is k prompts back to back and one host sync, over k (k from the warm-up).
  for (const r of rows.filter((x) => x.prompts === 1)) {
    expect(r.rowsPerStep).toBeUndefined();
    expect(Number.isInteger(r.promptsPerSample) && r.promptsPerSample >= 2 && r.promptsPerSample <= 16).toBe(true);
    expect(r.ms.samples).toHaveLength(2);
    expect(r.tokPerS).toBeCloseTo((r.tokens * 1e3) / r.ms.median, 6);
  }
  for (const r of rows) expect(Number.isInteger(r.prompts) && r.prompts >= 1).toBe(true);
  // The report's table gives each row its prompts and rows per step.
  expect(report).toContain("| shape | model | K/V | mode | prompts | tokens each | ms | tokens/s | passes | rows per step | TFLOP/s | of GEMM rate | spread |");
  expect(report).toContain(`| lckv-w2 | bf16 | sequential | 8 | 128 | ${lckv.ms.median.toFixed(1)} | ${lckv.tokPerS.toFixed(0)} | 1 | ${lckv.rowsPerStep.toFixed(1)} |`);
});

test("experiment 7: every K/V type's capacity from the engine's pages, decode against its roofline, attention counting its own bytes", () => {
  const rows = results.kvTypes as any[];
  expect(rows.map((r) => r.kvCacheDtype)).toEqual(["f32", "bf16", "fp8", "int8", "int4"]);
  const of = (t: string) => rows.find((r) => r.kvCacheDtype === t);
  // The standard tiny model: 6 layers x 2 K/V heads of 32; fp8 and int8 add 4 bytes of scales per
  // K/V head, int4 2 (V's) and one f16 K scale per channel and page of 16 tokens.
  const perToken = { f32: 6 * 2 * 2 * 32 * 4, bf16: 6 * 2 * 2 * 32 * 2, fp8: 6 * (2 * 2 * 32 + 2 * 4), int8: 6 * (2 * 2 * 32 + 2 * 4), int4: 6 * (2 * 32 + (2 * 32 * 2) / 16 + 2 * 2) };
  for (const r of rows) {
    expect(r.decode.kvBytesPerToken).toBe(perToken[r.kvCacheDtype as keyof typeof perToken]);
    // A sequence holds its context's pages, and in int4 its residual's (the bf16 page being written).
    expect(r.residualPages).toBe(r.kvCacheDtype === "int4" ? 4 : 0);
    expect(r.capacity).toBe(Math.floor(Math.floor((r.poolGiB * 2 ** 30) / r.pageBytes) / (r.capacityContext / 16 + r.residualPages)));
    expect(Number.isFinite(r.decode.ms.median) && Number.isFinite(r.batch1.ms.median)).toBe(true);
    for (const a of r.attention) expect(a.gbps).toBeGreaterThan(0);
  }
  // Fewer bytes per token, more sequences in the same pool; and the attention's bytes are the type's own.
  expect(of("int4").capacity).toBeGreaterThan(of("int8").capacity);
  expect(of("int8").capacity).toBeGreaterThan(of("bf16").capacity);
  expect(of("bf16").capacity).toBeGreaterThan(of("f32").capacity);
  expect(of("int4").attention[0].bytes).toBeLessThan(of("f32").attention[0].bytes / 4);
  expect(report).toContain("## 7. K/V cache types");
});

test("the report: both results files, the bound beside every row of full generations, the losses, the parts", () => {
  for (const heading of ["## 1. The paper's throughput experiment", "## The bound beside every row", "## Where LCKV loses, where it wins, and why", "## 2. Decode against batch size", "## 3. Prefill", "## 5. Attention alone", "## 6. node-llama-cpp"])
    expect(report).toContain(heading);
  expect(report).not.toContain("## 4.");
  expect(report).toContain("npm run bench -- --tiny --device cpu");
  expect(report).toContain("full-custom-1-7b.json");
  expect(report).toContain("Not measured: node-llama-cpp is not installed");
  expect(report).toContain("bound = (W_std / B_std + A) / (W / B + A)");
  // Full generations are called throughput, and each non-standard row carries its bound, computed
  // from its row and the standard row of the same cell.
  expect(report).toContain("| throughput, tokens/s (prefill included; spread) |");
  expect(report).not.toContain("NOT throughput");
  const std = (results.throughput as any[]).find((r) => r.model === "standard" && r.prompt === 128);
  const lckv = (results.throughput as any[]).find((r) => r.model === "lckv-w2" && r.prompt === 128);
  const bound = decodeGainBound({ wStd: std.weightBytes, batchStd: std.batch, w: lckv.weightBytes, batch: lckv.batch, a: lckv.attentionBytes });
  const line = report.split("\n").find((l) => /\| lckv-w2 \| .* \| 128\+128 \|/.test(l))!;
  expect(line.split(" | ")[12]).toBe(`${bound.toFixed(2)}x`);
  // A prefix of its own for each sequence of its decode timing: no mark.
  expect(line.split(" | ")[10]).not.toContain("‡");
  // No floor without the card's rates (a CPU run measures none).
  expect(results.rates.copyGBps).toBeNull();
  expect(line.split(" | ").slice(8, 10)).toEqual(["-", "-"]);
  // Its prefill column: the mode and the share of its prompt tokens in shared steps.
  expect(line.split(" | ")[4]).toBe("sequential (99%)");
  // The run's decode steps after the last first token, against the decode column's step.
  const runStep = (lckv.wallMs.median - lckv.lastFirstTokenMs.median) / (lckv.gen - 1) / lckv.decodeMsPerStep.median;
  expect(line.split(" | ")[15]).toBe(`${runStep.toFixed(2)}x`);
  for (const k of Object.keys(require("../../scripts/bench/parts.js").PARTS)) expect(report).toContain(`| \`${k}\` |`);
  for (const chart of ["throughput-vs-batch.svg", "memory-vs-context.svg", "memory-vs-context-7b.svg"]) {
    const svg = fs.readFileSync(path.join(out, "bench", chart), "utf8");
    expect(svg.startsWith("<svg")).toBe(true);
  }
});

test("the report's end-to-end floor: each row's, at its file's rates, and the floors' ratio to the standard row", () => {
  const docs = testTempDir("lckv-bench-floor-");
  try {
    fs.mkdirSync(path.join(docs, "bench"));
    const rates = { ...results.rates, copyGBps: 50, bf16Tflops: 0.5 };
    fs.writeFileSync(path.join(docs, "bench", "results.json"), JSON.stringify({ ...results, rates }));
    renderReport(docs);
    const md = fs.readFileSync(path.join(docs, "benchmarks.md"), "utf8");
    const shape = TINY_SHAPES["1.1b"];
    const floor = (r: any) => (r.batch * r.gen * 1000) / fullGenerationFloorMs({
      weightBytes: r.weightBytes, headBytes: shape.vocab * shape.hidden * 2, a1: r.attentionBytes / r.decodeContext, batch: r.batch, prompt: r.prompt, gen: r.gen,
      tokenStepShare: r.prefill === "sequential" ? r.sharedPromptShare : 0, copyGBps: 50, tflops: 0.5,
    });
    const std = (results.throughput as any[]).find((r) => r.model === "standard" && r.prompt === 128);
    const lckv = (results.throughput as any[]).find((r) => r.model === "lckv-w2" && r.prompt === 128);
    const cell = (model: string) => md.split("\n").find((l) => new RegExp(`\\| ${model} \\| .* \\| 128\\+128 \\|`).test(l))!.split(" | ");
    expect(cell("lckv-w2")[8]).toBe(`${floor(lckv).toFixed(0)} (${((100 * lckv.tokPerS.median) / floor(lckv)).toFixed(0)}%)`);
    expect(cell("lckv-w2")[9]).toBe(`${(floor(lckv) / floor(std)).toFixed(2)}x`);
    expect(cell("standard")[9]).toBe("1.00x");
    // LCKV's prompts went as token steps: its floor counts their bytes, so it is below the same run's with its prompts in chunks.
    expect(lckv.prefill).toBe("sequential");
    expect(floor(lckv)).toBeLessThan(floor({ ...lckv, prefill: "default" }));
    expect(md).toMatch(/end to end [0-9.]+x \(the floors' ratio [0-9.]+x; [0-9]+% of its floor, the standard model [0-9]+%\)/);
    // The headline gives the floors' ratio beside the measured one.
    expect(md).toContain(`- \`lckv-w2\` (default set): `);
    expect(md).toMatch(new RegExp(`\\(${(floor(lckv) / floor(std)).toFixed(2)}x( to [0-9.]+x)? at the end-to-end floors\\)|\\([0-9.]+x to ${(floor(lckv) / floor(std)).toFixed(2)}x at the end-to-end floors\\)`));
  } finally {
    fs.rmSync(docs, { recursive: true, force: true });
  }
});

test("results from truncated generations are rendered, and never called throughput", () => {
  const docs = testTempDir("lckv-bench-old-");
  try {
    fs.mkdirSync(path.join(docs, "bench"));
    fs.copyFileSync(path.join(root, "docs", "bench", "results.json"), path.join(docs, "bench", "results.json"));
    renderReport(docs);
    const md = fs.readFileSync(path.join(docs, "benchmarks.md"), "utf8");
    expect(md).toContain("tokens/s over the first 32 generated tokens (prefill included; NOT throughput; spread)");
    // Their decode figures came from forks of a few shared prefixes: marked.
    const lckvRow = md.split("\n").find((l) => /\| lckv-w2 \| .* \| 2048\+2048 \|/.test(l))!;
    expect(lckvRow.split(" | ")[10]).toMatch(/ ‡$/);
    expect(md).not.toContain("| throughput, tokens/s");
    expect(md).toMatch(/`lckv-w2` \(default set\): .* tokens\/s over the first 32 generated tokens .* \(not throughput: truncated generations\)/);
  } finally {
    fs.rmSync(docs, { recursive: true, force: true });
  }
});

test("bad options: an unknown K/V type or shape, lengths no shape runs, --full without a part, are refused by name", () => {
  const kv = bench(["--kv-dtypes", "f16"]);
  expect(kv.status).toBe(2);
  expect(kv.stderr).toContain("--kv-dtypes: unknown K/V cache type 'f16' (known: f32, bf16, fp8, int8, int4)");
  const shape = bench(["--shapes", "13b"]);
  expect(shape.status).toBe(2);
  expect(shape.stderr).toContain("--shapes: unknown shape '13b'");
  const lengths = bench(["--only", "1", "--shapes", "7b", "--lengths", "32+64,512+1024"]);
  expect(lengths.status).toBe(2);
  expect(lengths.stderr).toContain("--lengths: no shape of this run has 512+1024 (known with --tiny: 32+64, 128+128)");
  const full = bench(["--full"]);
  expect(full.status).toBe(2);
  expect(full.stderr).toContain("--full runs in parts of under 10 minutes: add --part <name> (1.1b, 7b-a, 7b-b, kernels, peers, llama-7b)");
});

test("--kv-dtypes reaches loadModel as kvCacheDtype, and the row records the type", () => {
  const r = bench(["--only", "1", "--models", "standard", "--lengths", "32+64", "--kv-dtypes", "bf16", "--kv-memory", "0.002", "--repeats", "1", "--out", path.join(out, "kv")]);
  if (r.status === 0) {
    const rows = JSON.parse(fs.readFileSync(path.join(out, "kv", "bench", "results.json"), "utf8")).throughput;
    expect(rows.map((x: any) => x.kvDtype)).toEqual(["bf16"]);
    expect(rows[0].kvBytesPerElement).toBe(2);
  } else {
    // An engine without the option names it in its refusal.
    expect(r.stderr).toContain("kvCacheDtype");
  }
});
