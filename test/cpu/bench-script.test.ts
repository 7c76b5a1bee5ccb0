/**
 * `npm run bench` (scripts/bench/run.js) on tiny shapes and the CPU: the script's own logic —
 * batch accounting verified by the pool, warm-up then median, report and charts — runs here,
 * where CI sees it, and not only on the GPU machine. Its figures mean nothing at these shapes.
 */
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

const root = path.join(__dirname, "..", "..");
let out: string;
let results: Record<string, any>;
let report: string;

beforeAll(() => {
  out = fs.mkdtempSync(path.join(os.tmpdir(), "lckv-bench-script-"));
  const args = ["--tiny", "--device", "cpu", "--only", "1,2,3,5", "--models", "standard,lckv-w2", "--kv-memory", "0.002", "--repeats", "2"];
  execFileSync(process.execPath, [path.join(root, "scripts", "bench", "run.js"), ...args, "--out", out, "--work", path.join(out, "models")], {
    stdio: ["ignore", "ignore", "pipe"],
    timeout: 120_000,
  });
  results = JSON.parse(fs.readFileSync(path.join(out, "bench", "results.json"), "utf8"));
  report = fs.readFileSync(path.join(out, "benchmarks.md"), "utf8");
}, 150_000);

afterAll(() => fs.rmSync(out, { recursive: true, force: true }));

test("experiment 1: every length pair of both models ran at the batch the pool verified, and LCKV fits more", () => {
  const rows = results.throughput as any[];
  expect(rows).toHaveLength(6);
  for (const r of rows) {
    expect(r.verified).toBe(true);
    expect(r.batch).toBeGreaterThan(0);
    expect(r.tokPerS.samples).toHaveLength(2); // --repeats 2, after the warm-up
    expect(r.tokPerS.median).toBeGreaterThan(0);
    // The generation phase alone, at the same batch, mid-generation.
    expect(r.decodeContext).toBe(r.prompt + Math.floor(r.gen / 2));
    expect(r.decodeMsPerStep.samples).toHaveLength(2);
    expect(r.decodeTokPerS).toBeCloseTo((r.batch * 1e3) / r.decodeMsPerStep.median, 6);
  }
  for (const [prompt, gen] of [[32, 64], [128, 128], [5, 251]]) {
    const of = (m: string) => rows.find((r) => r.model === m && r.prompt === prompt && r.gen === gen);
    expect(of("lckv-w2").batch).toBeGreaterThan(of("standard").batch);
    expect(of("lckv-w2").kvBytesPerToken).toBeLessThan(of("standard").kvBytesPerToken);
  }
});

test("experiments 2, 3 and 5 wrote their rows with finite timings", () => {
  for (const key of ["decode", "prefill", "attention"]) {
    const rows = results[key] as any[];
    expect(rows.length).toBeGreaterThan(0);
    for (const r of rows) expect(Number.isFinite(r.ms?.median ?? r.msPerStep?.median)).toBe(true);
  }
  // Prefill: the LCKV model runs each of its modes.
  const modes = new Set((results.prefill as any[]).filter((r) => r.model === "lckv-w2").map((r) => r.mode));
  expect([...modes].sort()).toEqual(["fixed-point", "iterative", "sequential"]);
  expect(Object.keys(results.experimentSeconds).sort()).toEqual(["attention", "decode", "prefill", "setup", "throughput"]);
});

test("the report has a section per experiment run, the command, and both charts", () => {
  expect(report).toContain("decode tokens/s at this batch");
  for (const heading of ["## 1. The paper's throughput experiment", "## 2. Decode against batch size", "## 3. Prefill", "## 5. Attention alone"])
    expect(report).toContain(heading);
  expect(report).not.toContain("## 4. Peers");
  expect(report).toContain("npm run bench -- --tiny --device cpu");
  for (const chart of ["throughput-vs-batch.svg", "memory-vs-context.svg"]) {
    const svg = fs.readFileSync(path.join(out, "bench", chart), "utf8");
    expect(svg.startsWith("<svg")).toBe(true);
  }
});
