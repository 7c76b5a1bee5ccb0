/**
 * The K/V cache's value types (native/engine/kv_format.h has the layout and the quantization rule).
 * bf16 is the default on both backends: half the bytes of f32, and within rounding of it.
 */
export type KvCacheDtype = "f32" | "bf16" | "fp8" | "int8" | "int4";

export const KV_CACHE_DTYPES: readonly KvCacheDtype[] = ["f32", "bf16", "fp8", "int8", "int4"];
export const DEFAULT_KV_CACHE_DTYPE: KvCacheDtype = "bf16";

export function isKvCacheDtype(x: unknown): x is KvCacheDtype {
  return typeof x === "string" && (KV_CACHE_DTYPES as readonly string[]).includes(x);
}
