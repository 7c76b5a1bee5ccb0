/**
 * The serving suites (test/serving) on the CPU backend: continuous batching, sequences, prefix
 * reuse, the paged pool and a 1000-request lifecycle, in the default bf16 K/V cache and in int4
 * (codes packed two a byte, with scales). test/gpu/serving.test.ts runs the same suites on the
 * CUDA backend in every type.
 */
import { servingSuites } from "../serving/suites";

process.env.LCKV_QUIET = "1";

describe.each(["bf16", "int4"] as const)("%s K/V", (kvCacheDtype) => {
  const dev = { device: "cpu", kvCacheDtype } as const;
  servingSuites(dev);
});
