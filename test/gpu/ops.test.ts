/**
 * Every CUDA op against the CPU backend (the reference), on fresh random inputs each run, with
 * outputs poisoned (NaN) beforehand so an unwritten element fails. Each case carries its own
 * tolerance (native/engine/op_check.cpp sets it: by weight dtype, f32 1e-5 and bf16 1e-2, since
 * the large-batch GEMM rounds its input activations to bf16).
 */
import { loadAddon } from "../../lib/native";
import { describeIfGpu } from "../helpers/device";

const addon = loadAddon();
const gpu = addon.backends.cuda;
const describeGpu = describeIfGpu("GPU op tests");

describeGpu.each(["f32", "bf16"] as const)("cuda ops, %s weights", (dtype) => {
  const seed = Date.now() % 1_000_000;
  const results = gpu ? addon.checkBackendOps({ backend: "cuda", dtype, seed }) : [];

  test(`every op writes every output element (seed ${seed})`, () => {
    expect(results.length).toBeGreaterThan(20);
    expect(results.filter((r) => !r.allWritten).map((r) => `${r.op} ${r.shape}`)).toEqual([]);
  });

  if (results.length > 0) {
    test.each(results.map((r) => [`${r.op} ${r.shape}`, r.tolerance, r.relErr]))("%s: relative error <= %p", (_name, tol, err) => {
      expect(tol).toBeGreaterThan(0);
      expect(err).toBeLessThanOrEqual(tol);
    });
  }
});
