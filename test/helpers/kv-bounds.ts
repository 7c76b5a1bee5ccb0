/**
 * How far the compact K/V cache types may move a fixture's logits (largest |error| over the
 * logits' scale). The fixtures are tiny random models, where one rounded K/V value weighs more
 * than in a trained model; docs/quality.md has the quality of each type on trained models.
 */
import type { KvCacheDtype } from "../../lib/kv-cache-dtype";

export const COMPACT_KV_DTYPES = ["bf16", "fp8", "int8", "int4"] as const;
export type CompactKvDtype = (typeof COMPACT_KV_DTYPES)[number];

/**
 * Against the f32 PyTorch golden: the type's own rounding, twice the largest error measured over
 * the fixtures on the CPU (bf16 1.9e-2, int8 5.3e-2, fp8 3.0e-1, int4 2.8e-1). int4 with one scale
 * per token moved these random models' logits by up to 1.2 times their scale; with keys per
 * channel and the page being written in bf16 (kv_format.h) it is within fp8's.
 */
export const GOLDEN_BOUND: Record<CompactKvDtype, number> = { bf16: 4e-2, fp8: 6e-1, int8: 1e-1, int4: 6e-1 };

/**
 * The GPU against the CPU in the same type: both quantize with one rule, so they store the same
 * codes for the same values (the op checks compare them byte for byte). The K and V they compute
 * differ in the last bits (another order of the sums, the large-batch GEMM), which now and then
 * rounds a value to the neighbouring code: then the logits move by one code step of one value.
 * Measured on an H100 over every fixture, 80-token prompts (short ones stay near 1e-6): bf16
 * 5.6e-3, fp8 3.3e-4, int8 1.1e-3, int4 1.9e-2; the bounds keep a margin of 2 to 15 times.
 */
export const SAME_TYPE_BOUND: Record<CompactKvDtype, number> = { bf16: 2e-2, fp8: 5e-3, int8: 5e-3, int4: 8e-2 };

/** With LCKV_REPORT_ERRORS=1, each measured error goes to stderr (to set the bounds above from measurements). */
export function reportError(what: string, err: number): void {
  if (process.env.LCKV_REPORT_ERRORS) process.stderr.write(`kv-error ${what} ${err.toExponential(3)}\n`);
}

export type { KvCacheDtype };
