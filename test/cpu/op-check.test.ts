/**
 * checkBackendOps, the op checks' entry (native/engine/op_check.cpp), with the CPU backend under
 * test: the GPU project runs every op against the CPU; here, where CI sees it, the op filter and
 * the tolerance each case carries. The CPU against itself computes the same values, so cheap op
 * families stand for the rest.
 */
import { loadAddon } from "../../lib/native";

const addon = loadAddon();
const check = (ops: string[], dtype: "f32" | "bf16" = "f32") => addon.checkBackendOps({ backend: "cpu", dtype, seed: 1234, ops });

test.each([
  [["rope"], ["rope"]],
  [["add_rms_norm"], ["add_rms_norm", "add_rms_norm residual"]],
  [["add_rms_norm residual"], ["add_rms_norm residual"]],
  [["gelu_tanh", "embed"], ["embed", "gelu_tanh"]],
])("the filter %p selects those ops alone: %p", (ops, selected) => {
  const results = check(ops);
  expect([...new Set(results.map((r) => r.op))].sort()).toEqual(selected);
});

test.each(["f32", "bf16"] as const)("every case carries a positive finite tolerance and passes it (%s weights)", (dtype) => {
  const results = check(["rms_norm", "layer_norm", "rope", "swiglu", "embed"], dtype);
  expect(results.length).toBeGreaterThan(10);
  for (const r of results) {
    expect(Number.isFinite(r.tolerance)).toBe(true);
    expect(r.tolerance).toBeGreaterThan(0);
    expect(r.relErr).toBeLessThanOrEqual(r.tolerance);
    expect(r.allWritten).toBe(true);
  }
});

test("an int4 page written whole by ropeKvWrite is checked from its residual and from its codes", () => {
  const results = check(["rope_kv_write residual", "rope_kv_write page"]);
  expect(results.map((r) => `${r.op} ${r.shape}`)).toEqual(
    ["rows=16 heads=4 kvHeads=2 headDim=16", "rows=16 heads=32 kvHeads=4 headDim=64", "rows=16 heads=8 kvHeads=1 headDim=128"].flatMap(
      (shape) => [`rope_kv_write residual ${shape} kv=int4`, `rope_kv_write page ${shape} kv=int4`],
    ),
  );
  for (const r of results) {
    expect(r.allWritten).toBe(true);
    expect(r.relErr).toBeLessThanOrEqual(r.tolerance);
  }
});

test("the token-choice cases, penalties, logit bias and log-probabilities included, pass the CPU against itself", () => {
  const results = check(["sample", "sample_rows"]);
  expect([...new Set(results.map((r) => r.op))].sort()).toEqual(["sample", "sample logprobs", "sample_rows", "sample_rows logprobs"]);
  for (const r of results) expect(r.relErr).toBeLessThanOrEqual(r.tolerance);
});

test.each([
  [{ ops: ["no_such_op"] }, /no op is named 'no_such_op'/],
  [{ ops: ["line"] }, /no op is named 'line'/],
  [{ ops: "rope" }, /'ops' must be an array of op names/],
  // An unknown weights' type is refused, not taken for bf16.
  [{ ops: ["rope"], dtype: "fp16" }, /checkBackendOps: dtype must be "f32", "f16" or "bf16"/],
  [{ ops: ["rope"], dtype: 16 }, /checkBackendOps: dtype must be "f32", "f16" or "bf16"/],
])("checkBackendOps refuses %p with a typed error", (change, message) => {
  const opts = { backend: "cpu", dtype: "f32", seed: 1, ...change };
  expect(() => addon.checkBackendOps(opts as Parameters<typeof addon.checkBackendOps>[0])).toThrow(
    expect.objectContaining({ code: "LCKV_INVALID_ARGUMENT", message: expect.stringMatching(message) }),
  );
});

test("kv_write range: a head past what a finite f16 scale covers saturates, in every type, and reads back finite", () => {
  // Heads of magnitude 1e9, 3e38 and infinity beside ordinary ones: before scales were capped at
  // f16's largest value, the scaled types read these heads back as NaN.
  const results = check(["kv_write range"]);
  expect(results.map((r) => r.shape.replace(/.* kv=/, ""))).toEqual(["f32", "bf16", "fp8", "int8", "int4"]);
  for (const r of results) {
    expect(Number.isFinite(r.relErr)).toBe(true);
    expect(r.relErr).toBeLessThanOrEqual(r.tolerance);
  }
});

test("fp8 codes: all 256 read back as e4m3fn defines them (0x7f and 0xff as NaN), and no write makes a NaN code", () => {
  // The GPU's e4m3 conversion reads 0x7f and 0xff as NaN; the CPU once read them as +-480.
  // Attention covers each GPU kernel path's shape (tensor-core decode, CUDA-core decode,
  // prefill); kv_write covers every finite value, the midpoints between neighbours, and NaN.
  const results = check(["kv_write fp8 codes", "attention fp8 codes", "kv_read fp8 codes"]);
  expect(results.map((r) => r.op)).toEqual([
    "kv_write fp8 codes",
    "attention fp8 codes",
    "kv_read fp8 codes",
    "attention fp8 codes",
    "kv_read fp8 codes",
    "attention fp8 codes",
    "attention fp8 codes",
  ]);
  // Attention averages equal values and may round (within its 1e-5); the codes match exactly.
  for (const r of results) {
    const bound = r.op === "attention fp8 codes" ? 1e-5 : 0;
    expect({ case: `${r.op} ${r.shape}`, tolerance: r.tolerance, within: r.relErr <= bound }).toEqual({
      case: `${r.op} ${r.shape}`,
      tolerance: r.op === "attention fp8 codes" ? 1e-5 : 1e-12,
      within: true,
    });
  }
});

test("kv_motion: in every K/V type an unchanged range is the same and a rewritten one moves, as the host loop finds", () => {
  // The CPU against itself: both sides are the host loop over kvRead (the GPU project checks the
  // device's comparison against it); each case passes only when both say the expected `same`.
  const results = check(["kv_motion"]);
  const shape = "start=3 n=120 kvHeads=2 headDim=64";
  expect(results.map((r) => `${r.op} ${r.shape}`)).toEqual([
    ...["f32", "bf16", "fp8", "int8", "int4"].flatMap((t) => [
      `kv_motion ${shape} kv=${t} unchanged`,
      `kv_motion ${shape} kv=${t} rewritten`,
      ...(t === "f32" || t === "bf16" ? [`kv_motion ${shape} kv=${t} nan and inf`] : []),
    ]),
  ]);
  for (const r of results) expect(r.relErr).toBeLessThanOrEqual(r.tolerance);
});
