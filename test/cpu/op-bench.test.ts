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

test.each([
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
