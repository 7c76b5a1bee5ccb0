/**
 * The CPU engine against goldens from an independent reference (scripts/reference: transformers'
 * own classes for Llama and GPT-2, a readable PyTorch implementation for layer_types patterns).
 * f32 (weights and K/V cache): max |logit error| <= 1e-4 of the logits' scale; greedy
 * continuations identical. The compact K/V types are checked against the same goldens at the
 * end, within bounds of their own.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { loadModel, Model } from "../../lib";
import { COMPACT_KV_DTYPES, GOLDEN_BOUND, reportError } from "../helpers/kv-bounds";

process.env.LCKV_QUIET = "1";
const FIXTURES = path.join(__dirname, "..", "fixtures");

interface Golden {
  source: string;
  prompt_ids: number[];
  logits: number[];
  iterative?: { passes: number; logits: number[] };
  greedy: { prompt_ids: number[]; tokens: number[]; min_top2_gap: number };
  max_abs_logit: number;
}

const fixtures = fs.existsSync(FIXTURES)
  ? fs.readdirSync(FIXTURES).filter((d) => fs.existsSync(path.join(FIXTURES, d, "golden.json"))).sort()
  : [];

test("the golden fixtures are present", () => {
  // Every architecture and pattern the foundation promises is covered.
  for (const name of ["llama-mha-hd16", "llama-gqa-hd32", "llama-sharded-f16", "gpt2", "gpt2-lckv", "lckv-w2", "lckv-cla", "lckv-sandwich", "lckv-sliding", "lckv-nodiag", "condensed-llama", "condensed-gpt2"]) {
    expect(fixtures).toContain(name);
  }
});

function relErr(got: Float32Array, want: number[], scale: number): number {
  expect(got.length).toBe(want.length);
  let d = 0;
  for (let i = 0; i < want.length; i++) {
    const e = Math.abs(got[i] - want[i]);
    if (!(e <= d)) d = Number.isNaN(e) ? Infinity : e;
  }
  return d / Math.max(scale, 1e-6);
}

describe.each(fixtures)("%s", (name) => {
  const dir = path.join(FIXTURES, name);
  let golden: Golden;
  let model: Model;
  beforeAll(async () => {
    golden = JSON.parse(fs.readFileSync(path.join(dir, "golden.json"), "utf8"));
    model = await loadModel(dir, { device: "cpu", kvCacheDtype: "f32" });
  });
  afterAll(() => model?.dispose());

  test("prefill logits match the reference (sequential and the default exact prefill)", async () => {
    for (const prefill of ["sequential", "fixed-point"] as const) {
      const got = await model.logits(golden.prompt_ids, { prefill });
      expect(relErr(got, golden.logits, golden.max_abs_logit)).toBeLessThanOrEqual(1e-4);
    }
  });

  test("iterative prefill matches the reference's m + b pass scheme", async () => {
    if (!golden.iterative) {
      expect(model.config.plan.cyclicGroup).toBeNull();
      return;
    }
    const r = await model.forward(golden.prompt_ids, { prefill: "iterative", prefillPasses: golden.iterative.passes });
    expect(r.passes).toBe(golden.iterative.passes);
    expect(relErr(r.logits, golden.iterative.logits, golden.max_abs_logit)).toBeLessThanOrEqual(1e-4);
  });

  test("greedy continuation of 32 tokens is identical", async () => {
    const r = await model.generate(golden.greedy.prompt_ids, { maxNewTokens: golden.greedy.tokens.length, temperature: 0, ignoreEos: true });
    expect(r.tokens).toEqual(golden.greedy.tokens);
  });

  test("the tokenizer round-trips text", () => {
    if (!model.tokenizer) throw new Error(`${name} has no tokenizer.json: every fixture ships one`);
    const text = "It is a truth universally acknowledged, that a single man in possession of a good fortune";
    expect(model.tokenizer.decode(model.tokenizer.encode(text))).toBe(text);
  });
});

// The compact K/V types against the same goldens. A quantized cache changes the logits by its
// rounding: the bound is the type's, measured on these fixtures with a margin (GOLDEN_BOUND in
// test/helpers/kv-bounds.ts). And a cache of codes still has one exact result: fixed-point
// prefill at tolerance 0 (which stops when a pass rewrites the codes it read) equals
// token-by-token prefill bit for bit.
describe.each(fixtures.flatMap((name) => COMPACT_KV_DTYPES.map((kv) => [name, kv] as const)))("%s, %s K/V", (name, kvCacheDtype) => {
  const dir = path.join(FIXTURES, name);
  let golden: Golden;
  let model: Model;
  beforeAll(async () => {
    golden = JSON.parse(fs.readFileSync(path.join(dir, "golden.json"), "utf8"));
    model = await loadModel(dir, { device: "cpu", kvCacheDtype });
  });
  afterAll(() => model?.dispose());

  test("prefill logits are within the type's bound of the reference, and fixed-point equals sequential", async () => {
    const seq = await model.logits(golden.prompt_ids, { prefill: "sequential" });
    const err = relErr(seq, golden.logits, golden.max_abs_logit);
    reportError(`cpu ${name} ${kvCacheDtype} vs golden`, err);
    expect(err).toBeLessThanOrEqual(GOLDEN_BOUND[kvCacheDtype]);
    const fp = await model.logits(golden.prompt_ids, { prefill: "fixed-point", prefillTolerance: 0 });
    expect(Array.from(fp)).toEqual(Array.from(seq));
  });
});
