/**
 * The serving suites (test/serving) on the CUDA backend, with the same assertions as on the
 * CPU: continuous batching, sequences, prefix reuse, the paged pool, a 1000-request lifecycle.
 * f32 weights, so that a prompt prefilled in one chunk or in several (prefix reuse, multi-turn)
 * gives the same greedy tokens as the CPU tests expect of every backend. Every suite runs in
 * every K/V cache type: copy-on-write, forks, prefix reuse, truncation, shifts and windows work
 * on pages of codes and scales as they do on floats.
 */
import { describeIfGpu } from "../helpers/device";
import { KV_CACHE_DTYPES } from "../../lib/kv-cache-dtype";
import { servingSuites } from "../serving/suites";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU serving tests");

describeGpu.each(KV_CACHE_DTYPES)("cuda, %s K/V", (kvCacheDtype) => {
  const dev = { device: "cuda", dtype: "f32", kvCacheDtype } as const;
  servingSuites(dev);
});
