/**
 * scripts/bench/costs.js: the bytes a decode step reads and the bound on LCKV's decode gain that
 * the bench report prints beside every row, checked against the published sizes of the two shapes
 * and against hand-computed cases.
 */
/* eslint-disable @typescript-eslint/no-var-requires */
const { weightBytes, kvBytesPerElement, attentionBytes, bytesPerGeneratedToken, decodeGainBound, prefillTakeover, forwardFlops } = require("../../scripts/bench/costs.js");

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
