/**
 * The serving suites (test/serving) on the CUDA backend, with the same assertions as on the
 * CPU: continuous batching, sequences, prefix reuse, the paged pool, a 1000-request lifecycle.
 * f32 weights, so that a prompt prefilled in one chunk or in several (prefix reuse, multi-turn)
 * gives the same greedy tokens as the CPU tests expect of every backend.
 */
import { batchingTests } from "../serving/batching";
import { contextShiftTests } from "../serving/context-shift";
import { kvPoolTests } from "../serving/kv-pool";
import { lifecycleTests } from "../serving/lifecycle";
import { prefixCacheTests } from "../serving/prefix-cache";
import { sequenceTests } from "../serving/sequence";
import { slidingWindowTests } from "../serving/sliding-window";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU serving tests");
const dev = { device: "cuda", dtype: "f32" } as const;

describeGpu("cuda: batching", () => batchingTests(dev));
describeGpu("cuda: sequences", () => sequenceTests(dev));
describeGpu("cuda: prefix cache", () => prefixCacheTests(dev));
describeGpu("cuda: K/V pool", () => kvPoolTests(dev));
describeGpu("cuda: lifecycle", () => lifecycleTests(dev));
describeGpu("cuda: context shift", () => contextShiftTests(dev));
describeGpu("cuda: sliding window", () => slidingWindowTests(dev));
