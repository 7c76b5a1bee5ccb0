/**
 * Prefill modes of a model whose layers read K/V from above (the cyclic group):
 * sequential and fixed-point are exact and agree bit for bit; iterative with p passes is exact
 * for the first p positions only.
 */
import { FIXED_POINT_MAX_PASSES, loadModel, Model } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";

function maxDiffRows(a: Float32Array, b: Float32Array, V: number, from: number, to: number): number {
  let d = 0;
  for (let i = from * V; i < to * V; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

describe.each(["0_3_3_3", "0_2_2_3_4_5", "0_4_4_4_4_5"])("layer_types %s", (lt) => {
  let m: Model;
  const n = 14;
  const ids = Array.from({ length: n }, (_, i) => (i * 11 + 3) % 64);
  beforeAll(async () => {
    // No prefix reuse: each call must run its own prefill.
    m = await loadModel(writeTinyModel({ layerTypes: lt, numLayers: lt.split("_").length, seed: 11 }), { device: "cpu", prefixCache: 0 });
  });
  afterAll(() => m.dispose());

  test("fixed-point with tolerance 0 equals sequential bit for bit", async () => {
    const seq = await m.forward(ids, { prefill: "sequential" });
    const fp = await m.forward(ids, { prefill: "fixed-point", prefillTolerance: 0 });
    expect(Array.from(fp.logits)).toEqual(Array.from(seq.logits));
    expect(fp.passes).toBeGreaterThanOrEqual(1);
    expect(fp.passes).toBeLessThanOrEqual(n);
    expect(seq.passes).toBe(1);
  });

  test("fixed-point with the default tolerance matches sequential to f32 rounding, in fewer passes", async () => {
    const V = m.config.vocabSize;
    const seq = await m.forward(ids, { prefill: "sequential" });
    const fp = await m.forward(ids, { prefill: "fixed-point" });
    let scale = 0;
    for (const x of seq.logits) scale = Math.max(scale, Math.abs(x));
    expect(maxDiffRows(fp.logits, seq.logits, V, 0, n) / scale).toBeLessThan(1e-5);
    console.log(lt, "passes", fp.passes, "of", n);
    expect(fp.passes).toBeLessThanOrEqual(n);
  });

  test("iterative with p passes is exact for the first p positions, approximate after", async () => {
    const V = m.config.vocabSize;
    const exact = (await m.forward(ids, { prefill: "sequential" })).logits;
    for (const p of [1, 3, 6]) {
      const it = await m.forward(ids, { prefill: "iterative", prefillPasses: p });
      expect(it.passes).toBe(p);
      expect(maxDiffRows(it.logits, exact, V, 0, p)).toBeLessThan(1e-5);
      expect(maxDiffRows(it.logits, exact, V, p, n)).toBeGreaterThan(1e-4);
    }
    const full = await m.forward(ids, { prefill: "iterative", prefillPasses: n });
    expect(maxDiffRows(full.logits, exact, V, 0, n)).toBeLessThan(1e-5);
  });

  test("the default prefill on the CPU is sequential (its fastest exact mode), with m + b passes for iterative", async () => {
    const def = await m.forward(ids);
    const seq = await m.forward(ids, { prefill: "sequential" });
    expect(def.passes).toBe(1);
    expect(Array.from(def.logits)).toEqual(Array.from(seq.logits));
    expect(m.generationDefaults().prefill).toBe("sequential");
    const it = await m.forward(ids, { prefill: "iterative" });
    expect(it.passes).toBe(m.config.forwardPasses + m.config.backwardPasses);
  });

  test("generation after each exact prefill mode is the same", async () => {
    const a = await m.generate(ids, { maxNewTokens: 6, prefill: "sequential" });
    const b = await m.generate(ids, { maxNewTokens: 6, prefill: "fixed-point" });
    expect(b.tokens).toEqual(a.tokens);
    expect(b.prefillPasses).toBeGreaterThanOrEqual(1);
  });
});

test("fixed-point that has not converged after 64 passes finishes token by token, still equal to sequential", async () => {
  // At tolerance 0 the last bits of late positions keep moving until the induction reaches
  // them (about n passes): with 100 tokens the pass limit (FIXED_POINT_MAX_PASSES, the
  // engine's, which the passes reported below must equal) is reached first.
  // An f32 cache: in bf16 the K/V stop changing (in their 16 bits) within the pass limit.
  const m = await loadModel(writeTinyModel({ layerTypes: "0_2_2_3", numLayers: 4, seed: 5 }), { device: "cpu", prefixCache: 0, kvCacheDtype: "f32" });
  try {
    const ids = Array.from({ length: 100 }, (_, i) => (i * 7 + 1) % 64);
    const seq = await m.forward(ids, { prefill: "sequential" });
    const fp = await m.forward(ids, { prefill: "fixed-point", prefillTolerance: 0 });
    expect(fp.passes).toBe(FIXED_POINT_MAX_PASSES);
    expect(Array.from(fp.logits)).toEqual(Array.from(seq.logits));
    // Generation after it (the K/V the token-by-token tail left) matches too, and so does the
    // last row alone (generate asks for the last logits only).
    const a = await m.generate(ids, { maxNewTokens: 5, prefill: "sequential" });
    const b = await m.generate(ids, { maxNewTokens: 5, prefill: "fixed-point", prefillTolerance: 0 });
    expect(b.tokens).toEqual(a.tokens);
    // generate() prefills in chunks (64 tokens on the CPU), each converging within its length.
    expect(b.prefillPasses).toBeGreaterThan(1);
    expect(b.prefillPasses).toBeLessThanOrEqual(FIXED_POINT_MAX_PASSES);
  } finally {
    await m.dispose();
  }
});

test("a model without upward targets needs one pass in every mode", async () => {
  for (const lt of [undefined, "0_0_2_2"]) {
    const m = await loadModel(writeTinyModel({ layerTypes: lt }), { device: "cpu" });
    const ids = [5, 6, 7, 8, 9];
    const a = await m.forward(ids, { prefill: "fixed-point" });
    const b = await m.forward(ids, { prefill: "iterative", prefillPasses: 4 });
    const c = await m.forward(ids, { prefill: "sequential" });
    expect([a.passes, b.passes]).toEqual([1, 1]);
    expect(Array.from(b.logits)).toEqual(Array.from(a.logits));
    expect(Array.from(c.logits)).toEqual(Array.from(a.logits));
    await m.dispose();
  }
});
