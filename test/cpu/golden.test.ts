/**
 * The CPU engine against goldens from an independent reference (scripts/reference: transformers'
 * own classes for Llama and GPT-2, a readable PyTorch implementation for layer_types patterns).
 * f32: max |logit error| <= 1e-4 of the logits' scale; greedy continuations identical.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { loadModel, Model } from "../../lib";

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
  for (const name of ["llama-mha-hd16", "llama-gqa-hd32", "llama-sharded-f16", "gpt2", "gpt2-lckv", "lckv-w2", "lckv-cla", "lckv-sandwich", "lckv-sliding", "lckv-nodiag"]) {
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
    model = await loadModel(dir, { device: "cpu" });
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
    if (!model.tokenizer) return;
    const text = "It is a truth universally acknowledged, that a single man in possession of a good fortune";
    expect(model.tokenizer.decode(model.tokenizer.encode(text))).toBe(text);
  });
});
