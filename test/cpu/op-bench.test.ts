/** benchAttention, the attention-alone benchmark's entry (scripts/bench/run.js, experiment 5). */
import { loadAddon } from "../../lib/native";

const addon = loadAddon();

test("benchAttention times the CPU attention and counts the K/V, query and output bytes of a call", () => {
  const shape = { sequences: 3, context: 100, numHeads: 8, numKvHeads: 2, headDim: 16 };
  const r = addon.benchAttention({ backend: "cpu", ...shape, iterations: 2 });
  const kvDim = shape.numKvHeads * shape.headDim;
  const qFloats = shape.sequences * shape.numHeads * shape.headDim;
  expect(r.bytes).toBe(4 * (shape.sequences * shape.context * 2 * kvDim + 2 * qFloats));
  expect(Number.isFinite(r.ms)).toBe(true);
  expect(r.ms).toBeGreaterThan(0);
});

test("benchAttention with queries times a prompt's causal chunk and counts its products", () => {
  const shape = { sequences: 2, context: 50, queries: 20, numHeads: 4, numKvHeads: 2, headDim: 8 };
  const r = addon.benchAttention({ backend: "cpu", ...shape, iterations: 1 });
  // Row i of a sequence's 20 sees 31 + i keys: 31 + ... + 50 = 810 pairs, 4 x 8 products each per query head.
  expect(r.flops).toBe(shape.sequences * 810 * 4 * shape.headDim * shape.numHeads);
  // K/V of every key, the queries in f32 and the output (f32 on the CPU, whatever the weights).
  const kvDim = shape.numKvHeads * shape.headDim;
  expect(r.bytes).toBe(4 * (shape.sequences * shape.context * 2 * kvDim + 2 * shape.sequences * shape.queries * shape.numHeads * shape.headDim));
  expect(r.ms).toBeGreaterThan(0);
  // One query per sequence is the decode step: each sees the whole context.
  const decode = addon.benchAttention({ backend: "cpu", ...shape, queries: 1, iterations: 1 });
  expect(decode.flops).toBe(shape.sequences * shape.context * 4 * shape.headDim * shape.numHeads);
  expect(addon.benchAttention({ backend: "cpu", ...shape, dtype: "bf16", iterations: 1 }).flops).toBe(r.flops);
});

test.each([
  [{ queries: 0 }, /'queries' must be a positive integer/],
  [{ queries: 17 }, /'queries' \(17\) must be at most 'context' \(16\)/],
  [{ dtype: "f16" }, /dtype must be "f32" or "bf16"/],
  [{ sequences: 0 }, /'sequences' must be a positive integer/],
  [{ numKvHeads: 3 }, /numHeads must be a multiple of numKvHeads/],
  [{ iterations: -1 }, /'iterations' must be a positive integer/],
  [{ backend: "gpu" }, /backend must be 'cuda' or 'cpu'/],
])("benchAttention refuses %p with a typed error", (change, message) => {
  const opts = { backend: "cpu", sequences: 1, context: 16, numHeads: 4, numKvHeads: 2, headDim: 8, iterations: 1, ...change };
  expect(() => addon.benchAttention(opts as Parameters<typeof addon.benchAttention>[0])).toThrow(
    expect.objectContaining({ code: "LCKV_INVALID_ARGUMENT", message: expect.stringMatching(message) }),
  );
});
