/**
 * The serving suites (test/serving) on the CPU backend: continuous batching, sequences, prefix
 * reuse, the paged pool and a 1000-request lifecycle, in the default bf16 K/V cache and in int4
 * (codes packed two a byte, with scales). test/gpu/serving.test.ts runs the same suites on the
 * CUDA backend in every type.
 */
import { batchingTests } from "../serving/batching";
import { contextShiftTests } from "../serving/context-shift";
import { kvPoolTests } from "../serving/kv-pool";
import { lifecycleTests } from "../serving/lifecycle";
import { prefixCacheTests } from "../serving/prefix-cache";
import { sequenceTests } from "../serving/sequence";
import { slidingWindowTests } from "../serving/sliding-window";

process.env.LCKV_QUIET = "1";

describe.each(["bf16", "int4"] as const)("%s K/V", (kvCacheDtype) => {
  const dev = { device: "cpu", kvCacheDtype } as const;
  describe("batching", () => batchingTests(dev));
  describe("sequences", () => sequenceTests(dev));
  describe("prefix cache", () => prefixCacheTests(dev));
  describe("K/V pool", () => kvPoolTests(dev));
  describe("lifecycle", () => lifecycleTests(dev));
  describe("context shift", () => contextShiftTests(dev));
  describe("sliding window", () => slidingWindowTests(dev));
});
