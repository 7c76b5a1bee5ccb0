/**
 * The serving suites (test/serving) on the CPU backend: continuous batching, sequences, prefix
 * reuse, the paged pool and a 1000-request lifecycle. test/gpu/serving.test.ts runs the same
 * suites on the CUDA backend.
 */
import { batchingTests } from "../serving/batching";
import { contextShiftTests } from "../serving/context-shift";
import { kvPoolTests } from "../serving/kv-pool";
import { lifecycleTests } from "../serving/lifecycle";
import { prefixCacheTests } from "../serving/prefix-cache";
import { sequenceTests } from "../serving/sequence";
import { slidingWindowTests } from "../serving/sliding-window";

process.env.LCKV_QUIET = "1";
const dev = { device: "cpu" } as const;

describe("batching", () => batchingTests(dev));
describe("sequences", () => sequenceTests(dev));
describe("prefix cache", () => prefixCacheTests(dev));
describe("K/V pool", () => kvPoolTests(dev));
describe("lifecycle", () => lifecycleTests(dev));
describe("context shift", () => contextShiftTests(dev));
describe("sliding window", () => slidingWindowTests(dev));
