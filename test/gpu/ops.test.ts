/**
 * Every CUDA op against the CPU backend (the reference), on fresh random inputs each run, with
 * outputs poisoned (NaN) beforehand so an unwritten element fails. Tolerance by weight dtype:
 * f32 1e-5; bf16 1e-2 (the large-batch GEMM rounds its input activations to bf16).
 */
import { loadAddon } from "../../lib/native";
import { describeIfGpu } from "../helpers/device";

const addon = loadAddon();
const gpu = addon.backends.cuda;
const describeGpu = describeIfGpu("GPU op tests");

describeGpu.each([
  ["f32", 1e-5],
  ["bf16", 1e-2],
] as const)("cuda ops, %s weights", (dtype, tol) => {
  const seed = Date.now() % 1_000_000;
  const results = gpu ? addon.checkBackendOps({ backend: "cuda", dtype, seed }) : [];

  test(`every op writes every output element (seed ${seed})`, () => {
    expect(results.length).toBeGreaterThan(20);
    expect(results.filter((r) => !r.allWritten).map((r) => `${r.op} ${r.shape}`)).toEqual([]);
  });

  if (results.length > 0) {
    test.each(results.map((r) => [`${r.op} ${r.shape}`, r.relErr]))(`%s: relative error <= ${tol}`, (_name, err) => {
      expect(err).toBeLessThanOrEqual(tol);
    });
  }
});
