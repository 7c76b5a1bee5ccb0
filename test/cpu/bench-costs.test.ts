/**
 * scripts/bench/costs.js: the bytes a decode step reads and the bound on LCKV's decode gain that
 * the bench report prints beside every row, checked against the published sizes of the two shapes
 * and against hand-computed cases.
 */
/* eslint-disable @typescript-eslint/no-var-requires */
import * as path from "node:path";
const { weightBytes, kvBytesPerElement, attentionBytes, bytesPerGeneratedToken, decodeGainBound, prefillTakeover, fullGenerationFloorMs, forwardFlops } = require("../../scripts/bench/costs.js");

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const llama7b = { hiddenSize: 4096, intermediateSize: 11008, numHeads: 32, numKvHeads: 32, headDim: 128, numLayers: 32, kvLayers: range(32), vocabSize: 32000 };
const tinyLlama = { hiddenSize: 2048, intermediateSize: 5632, numHeads: 32, numKvHeads: 4, headDim: 64, numLayers: 22, kvLayers: range(22), vocabSize: 32000 };

test("W: every matrix a decode step reads; with the embedding, the shapes' published parameter counts less their norms", () => {
  // Llama-2-7B: 6,738,415,616 parameters, of which 32 x 2 x 4096 + 4096 are norm weights.
  expect(weightBytes(llama7b) + 32000 * 4096 * 2).toBe(2 * (6738415616 - (32 * 2 * 4096 + 4096)));
  // TinyLlama-1.1B: 1,100,048,384 parameters, of which 22 x 2 x 2048 + 2048 are norm weights.
  expect(weightBytes(tinyLlama) + 32000 * 2048 * 2).toBe(2 * (1100048384 - (22 * 2 * 2048 + 2048)));
  // LCKV w=2 at 7B caches K/V in layers 0, 30 and 31 only: 29 layers without K and V projections.
  const lckv = { ...llama7b, kvLayers: [0, 30, 31] };
  expect(weightBytes(llama7b) - weightBytes(lckv)).toBe(29 * 2 * 4096 * 4096 * 2);
});

test("A: every layer attends; Llama-2-7B's standard K/V is 512 KiB per token in bf16, TinyLlama's 44 KiB in f32", () => {
  expect(attentionBytes(llama7b, 1, 2)).toBe(512 * 1024);
  expect(attentionBytes(tinyLlama, 1, 4)).toBe(44 * 1024);
  expect(attentionBytes(llama7b, 3072, 2)).toBe(3072 * 512 * 1024);
  // An LCKV model reads as many K/V bytes per token of context as the standard one...
  const lckv = { ...llama7b, kvLayers: [0, 30, 31] };
  expect(attentionBytes(lckv, 1000, 2)).toBe(attentionBytes(llama7b, 1000, 2));
  // ...though it stores only its K/V layers: the engine's bytes per token give the element size back.
  expect(kvBytesPerElement(lckv, 3 * 2 * 32 * 128 * 2)).toBe(2);
  expect(kvBytesPerElement(tinyLlama, 22 * 2 * 4 * 64 * 0.5)).toBe(0.5);
});

test("the bound: (W_std / B_std + A) / (W / B + A)", () => {
  // No attention bytes: the gain is the batch ratio (same W).
  expect(decodeGainBound({ wStd: 100, batchStd: 2, w: 100, batch: 20, a: 0 })).toBeCloseTo(10, 12);
  // Attention dominates: barely above 1, however large the batch.
  expect(decodeGainBound({ wStd: 100, batchStd: 2, w: 100, batch: 2000, a: 1e6 })).toBeCloseTo((50 + 1e6) / (0.05 + 1e6), 12);
  // The same batch: no gain, except what the fewer weight bytes give.
  expect(decodeGainBound({ wStd: 100, batchStd: 4, w: 80, batch: 4, a: 10 })).toBeCloseTo(35 / 30, 12);
  // 7B, 2048+2048 (context 3072 mid-generation), bf16 K/V, a pool of 8 GiB: the standard model holds
  // 4 sequences of 4096 tokens (2 GiB each), LCKV w=2 about 32/3 times that.
  const a = attentionBytes(llama7b, 3072, 2);
  const lckv = { ...llama7b, kvLayers: [0, 30, 31] };
  const b = decodeGainBound({ wStd: weightBytes(llama7b), batchStd: 4, w: weightBytes(lckv), batch: 42, a });
  expect(b).toBeCloseTo(bytesPerGeneratedToken(weightBytes(llama7b), 4, a) / bytesPerGeneratedToken(weightBytes(lckv), 42, a), 12);
  // (13.21 GB / 4 + 1.61 GB) / (11.27 GB / 42 + 1.61 GB): 4.91 / 1.88.
  expect(b).toBeCloseTo(2.615, 3);
});

test("where prefill takes over: the wall time decode does not explain, and the generation length that would match it", () => {
  expect(prefillTakeover({ wallMs: 1000, gen: 100, decodeMsPerStep: 5 })).toEqual({ prefillMs: 500, prefillShare: 0.5, breakEvenGen: 100 });
  expect(prefillTakeover({ wallMs: 1000, gen: 400, decodeMsPerStep: 3 })).toEqual({ prefillMs: 0, prefillShare: 0, breakEvenGen: 0 });
});

test("prefill flops: 2 per weight per token plus the causal products", () => {
  const params = weightBytes(tinyLlama) / 2;
  expect(forwardFlops(tinyLlama, 1)).toBe(2 * params + 4 * 22 * 2048 * 1);
  expect(forwardFlops(tinyLlama, 10, 5)).toBe(2 * params * 10 + 4 * 22 * 2048 * (10 * 5 + 55));
});

test("the end-to-end floor: the larger of the run's bytes and its flops", () => {
  // Rates of 1 byte and 1 flop per ms. W = 100 bytes (50 weights: 100 flops a token), LM head 10
  // bytes, 1 byte of K/V a token of context, 2 sequences, 3 + 4 tokens.
  const unit = { weightBytes: 100, headBytes: 10, a1: 1, batch: 2, prompt: 3, gen: 4, copyGBps: 1e-6, tflops: 1e-9 };
  // Flops: 2 x ((3 + 4 - 1) x 90 + 4 x 10) = 1160. Bytes: 3 decode steps at contexts 3, 4, 5:
  // 3 x 100 + 2 x 12 = 324; prompts in chunks add none.
  expect(fullGenerationFloorMs(unit)).toBeCloseTo(1160, 9);
  // As token steps the prompts add 3 x 90 + 2 x (0 + 1 + 2) = 276 bytes: 600, still under the flops...
  expect(fullGenerationFloorMs({ ...unit, tokenStepShare: 1 })).toBeCloseTo(1160, 9);
  // ...but not on a card whose flops are 10x cheaper (116 ms of them).
  expect(fullGenerationFloorMs({ ...unit, tokenStepShare: 1, tflops: 1e-8 })).toBeCloseTo(600, 9);
  expect(fullGenerationFloorMs({ ...unit, tokenStepShare: 0, tflops: 1e-8 })).toBeCloseTo(324, 9);
  expect(fullGenerationFloorMs({ ...unit, tokenStepShare: 1 / 3, tflops: 1e-8 })).toBeCloseTo(324 + 90, 9);
});

test("the end-to-end floor at 2048+2048 on the 1.1B shape: token-step prompts cost LCKV w=2 much of its decode gain", () => {
  // An H100's rates (3,000 GB/s copy, 740 TFLOP/s bf16); bf16 K/V, 22 layers x 2 x 4 heads x 64 x 2 bytes.
  const card = { copyGBps: 3000, tflops: 740 };
  const a1 = attentionBytes(tinyLlama, 1, 2), head = 32000 * 2048 * 2;
  const lckv = { ...tinyLlama, kvLayers: [0, 20, 21] };
  const run = (W: number, batch: number, tokenStepShare: number) => (batch * 2048) / fullGenerationFloorMs({ weightBytes: W, headBytes: head, a1, batch, prompt: 2048, gen: 2048, tokenStepShare, ...card });
  const std = run(weightBytes(tinyLlama), 23, 0);
  // The decode bound at mid-generation context is ~1.96x; with its 2048 prompt steps reading the
  // weights and K/V, the floors' ratio falls to ~1.38x. Prefilled in chunks it would stay ~1.96x.
  expect(run(weightBytes(lckv), 170, 1) / std).toBeCloseTo(1.38, 2);
  expect(run(weightBytes(lckv), 170, 0) / std).toBeCloseTo(1.96, 2);
});

test("no committed full-generation row runs faster than its end-to-end floor", () => {
  const dir = path.join(__dirname, "..", "..", "docs", "bench");
  const { figures, throughputEntries } = require("../../scripts/bench/report-throughput.js");
  const { loadResultSets } = require("../../scripts/bench/report-format.js");
  const entries = throughputEntries(loadResultSets(dir));
  const floored = entries.map((e: any) => figures(e, entries)).filter((f: any) => f.ofFloor !== undefined);
  expect(floored.length).toBeGreaterThanOrEqual(12);
  for (const f of floored) expect(f.ofFloor).toBeLessThan(1);
});
