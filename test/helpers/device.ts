import type { KvCacheDtype } from "../../lib/kv-cache-dtype";
import { loadAddon } from "../../lib/native";

/**
 * The load options that put a test's models on one backend and K/V cache type (the serving
 * suites run on both backends, in every type).
 */
export interface TestDevice {
  device: "cpu" | "cuda";
  dtype?: "f32" | "bf16";
  kvCacheDtype?: KvCacheDtype;
}

/**
 * The load options under which a test may expect a sequence's results not to depend on the batch
 * it runs in. The CPU computes each row as it would alone at any batch size, and so does the
 * GPU with f32 weights (its GEMV takes any number of rows, 16 at a time), so their default
 * maxBatch stays, and the default is what such a test checks. With bf16 weights (the GPU's
 * default) steps above 16 rows take cuBLASLt, whose results depend on the batch; `maxBatch: 16`,
 * the documented opt-in, keeps decode steps on the GEMVs.
 */
export function batchInvariant(dev: TestDevice): { maxBatch?: number } {
  return dev.device === "cuda" && dev.dtype !== "f32" ? { maxBatch: 16 } : {};
}

/**
 * `describe` on a build that can use a GPU; elsewhere `describe.skip`, after one warning that
 * says which suite is skipped and why (CI has no GPU, and must say so rather than pass silently).
 */
export function describeIfGpu(suite: string): jest.Describe {
  const backends = loadAddon().backends;
  if (!backends.cuda) {
    // eslint-disable-next-line no-console
    console.warn(`${suite} SKIPPED: ${backends.cudaBuilt ? backends.cudaProblem : "this build has no CUDA backend"}`);
  }
  return backends.cuda ? describe : describe.skip;
}
