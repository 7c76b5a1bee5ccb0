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
