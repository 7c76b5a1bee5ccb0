/**
 * Every serving suite (test/serving), for one backend and K/V cache type: the CPU and the GPU
 * test files run the same list.
 */
import type { TestDevice } from "../helpers/device";
import { batchingTests } from "./batching";
import { contextShiftTests } from "./context-shift";
import { kvPoolTests } from "./kv-pool";
import { lifecycleTests } from "./lifecycle";
import { prefixCacheTests } from "./prefix-cache";
import { sequenceTests } from "./sequence";
import { slidingWindowTests } from "./sliding-window";

export function servingSuites(dev: TestDevice): void {
  describe("batching", () => batchingTests(dev));
  describe("sequences", () => sequenceTests(dev));
  describe("prefix cache", () => prefixCacheTests(dev));
  describe("K/V pool", () => kvPoolTests(dev));
  describe("lifecycle", () => lifecycleTests(dev));
  describe("context shift", () => contextShiftTests(dev));
  describe("sliding window", () => slidingWindowTests(dev));
}
