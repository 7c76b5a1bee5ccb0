/**
 * The int4 K/V cache's rule (native/engine/kv_format.h), checked against an implementation of it
 * written here from its definition: a page's keys scaled per channel over its 16 tokens and its
 * values per token, both from their bf16 values, once the page is full; the page being written
 * kept in bf16 (the residual). Layer 0's K/V depends only on the tokens, so the f32 cache's K/V of
 * that layer is the input the int4 cache quantized, and what the int4 cache reads back must be
 * that rule's result bit for bit. Then the cache operations on such pages: truncation within the
 * page being written (exact) and into a quantized page (lossy once), fork, prefix reuse.
 */
import { loadModel, Model, Sequence } from "../../lib";
import type { NativeSequence } from "../../lib/native";
import { writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";

const P = 16;
const f32 = Math.fround;

/** x rounded to bf16 (nearest, ties to even), as a number. */
function bf16(x: number): number {
  const u = new Uint32Array(new Float32Array([x]).buffer)[0];
  const r = ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) << 16;
  return new Float32Array(new Uint32Array([r >>> 0]).buffer)[0];
}

/** Round half to even of a non-negative number. */
function rint(q: number): number {
  const f = Math.floor(q), d = q - f;
  return d > 0.5 || (d === 0.5 && f % 2 === 1) ? f + 1 : f;
}

/** x >= 0 (at most 65504) rounded to IEEE half, nearest, ties to even. */
function f16(x: number): number {
  if (x === 0) return 0;
  let e = Math.floor(Math.log2(x));
  if (2 ** e > x) e--;
  if (2 ** (e + 1) <= x) e++;
  const ulp = 2 ** Math.max(e - 10, -24);  // 11 significant bits; subnormals in units of 2^-24
  return rint(x / ulp) * ulp;
}

/** The int4 rule for values xs (one scale): each read back as code * scale, in f32. */
function int4(xs: number[]): number[] {
  const amax = xs.reduce((a, x) => Math.max(a, Math.abs(x)), 0);
  const s = f16(Math.min(f32(amax / 7), 65504));
  return xs.map((x) => {
    if (s === 0) return 0;
    const y = Math.max(-7, Math.min(7, f32(x / s)));
    const c = Math.sign(y) * rint(Math.abs(y));
    return c === 0 ? 0 : f32(c * s);
  });
}

/**
 * What the int4 cache reads back for positions [0, n) of one KV layer whose exact K and V are
 * k, v ([n][kvDim]): pages below `residualPage` quantized from their bf16 values (keys per
 * channel over the page, values per token and head), the rows of `residualPage` in bf16.
 */
function int4Cache(k: Float32Array, v: Float32Array, n: number, kvDim: number, headDim: number, residualPage: number) {
  const outK = new Float32Array(n * kvDim), outV = new Float32Array(n * kvDim);
  for (let page = 0; page * P < n; page++) {
    const rows = Math.min(P, n - page * P);
    if (page === residualPage) {
      for (let i = page * P * kvDim; i < (page * P + rows) * kvDim; i++) {
        outK[i] = bf16(k[i]);
        outV[i] = bf16(v[i]);
      }
      continue;
    }
    expect(rows).toBe(P);  // a page below the residual's is full
    for (let c = 0; c < kvDim; c++) {
      const q = int4(Array.from({ length: P }, (_, t) => bf16(k[(page * P + t) * kvDim + c])));
      q.forEach((x, t) => (outK[(page * P + t) * kvDim + c] = x));
    }
    for (let t = page * P; t < page * P + P; t++)
      for (let h = 0; h < kvDim / headDim; h++) {
        const at = t * kvDim + h * headDim;
        int4(Array.from(v.subarray(at, at + headDim), bf16)).forEach((x, i) => (outV[at + i] = x));
      }
  }
  return { k: outK, v: outV };
}

const native = (s: Sequence) => (s as unknown as { native: NativeSequence }).native;

/** K and V of KV slot `slot` at positions [0, n), as the cache reads them back. */
function readKv(s: Sequence, slot: number, n: number, kvDim: number) {
  const all = native(s).readKv(slot, 0, n);
  return { k: all.subarray(0, n * kvDim), v: all.subarray(n * kvDim) };
}

const bits = (a: Float32Array) => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));

describe("int4 K/V cache", () => {
  const dir = writeTinyModel({ seed: 61, maxPositions: 256 });
  const tokens = Array.from({ length: 120 }, (_, i) => (i * 13 + 7) % 64);
  let exact: Model, m: Model;
  let kvDim = 0, headDim = 0;
  beforeAll(async () => {
    exact = await loadModel(dir, { device: "cpu", kvCacheDtype: "f32", prefixCache: 0 });
    m = await loadModel(dir, { device: "cpu", kvCacheDtype: "int4", prefixCache: 0 });
    headDim = m.config.headDim;
    kvDim = m.config.numKvHeads * headDim;
  });
  afterAll(async () => {
    await exact.dispose();
    await m.dispose();
  });

  /** Layer 0's exact K/V of the first n tokens (an f32 cache holds them as computed). */
  async function exactKv(n: number) {
    const s = exact.createSequence();
    await s.append(tokens.slice(0, n + 1));  // the last token stays pending
    const kv = readKv(s, 0, n, kvDim);
    s.dispose();
    return kv;
  }

  test.each([
    [39, "a partial third page"],
    [48, "three full pages (the residual still holds the third)"],
    [97, "seven pages, one row in the residual"],
  ])("%i tokens (%s) read back as the rule computes them, bit for bit", async (n) => {
    const want = await exactKv(n);
    const s = m.createSequence();
    await s.append(tokens.slice(0, n + 1));
    const got = readKv(s, 0, n, kvDim);
    const rule = int4Cache(want.k, want.v, n, kvDim, headDim, Math.floor((n - 1) / P));
    expect(bits(got.k)).toEqual(bits(rule.k));
    expect(bits(got.v)).toEqual(bits(rule.v));
    // Not the bf16 values for the quantized pages: the rule did quantize them.
    expect(bits(got.k.subarray(0, P * kvDim))).not.toEqual(bits(want.k.subarray(0, P * kvDim).map(bf16)));
    s.dispose();
  });

  test("prefill in one call, token by token, or in two calls that split a page: the same logits", async () => {
    const prompt = tokens.slice(0, 70);
    const whole = await m.logits(prompt);
    expect(Array.from(await m.logits(prompt, { prefill: "sequential" }))).toEqual(Array.from(whole));
    // The tokens in two appends that split a page (the second starts in the residual's page).
    const s = m.createSequence();
    await native(s).append(Int32Array.from(prompt.slice(0, 21)), { mode: "sequential", logits: "none" });
    const rest = await native(s).append(Int32Array.from(prompt.slice(21)), { mode: "fixed-point", logits: "all" });
    const V = m.config.vocabSize;
    expect(Array.from(rest.logits!)).toEqual(Array.from(whole.subarray(21 * V)));
    s.dispose();
  });

  test("truncating within the page being written keeps the K/V exact; into a quantized page is lossy once", async () => {
    const s = m.createSequence();
    await s.append(tokens.slice(0, 41));  // 40 evaluated: pages 0 and 1 quantized, page 2 in the residual
    const before = readKv(s, 0, 40, kvDim);
    expect(s.exactRewind(36)).toBe(36);
    expect(s.exactRewind(32)).toBe(32);
    expect(s.exactRewind(20)).toBe(16);
    // Within the residual's page: nothing is re-read, appending continues exactly.
    s.truncate(36);
    expect(s.exact).toBe(true);
    await s.append(tokens.slice(36, 45));
    const within = readKv(s, 0, 44, kvDim);
    const exact44 = await exactKv(44);
    const rule44 = int4Cache(exact44.k, exact44.v, 44, kvDim, headDim, 2);
    expect(bits(within.k)).toEqual(bits(rule44.k));
    expect(bits(within.v)).toEqual(bits(rule44.v));
    // Into page 1 (quantized): its rows 16..19 are read back from their codes into the residual
    // at the next write, in bf16; the sequence is no longer the exact computation.
    s.truncate(20);
    expect(s.exact).toBe(false);
    await s.append(tokens.slice(20, 25));  // writes 20..23: page 1 partial again
    const after = readKv(s, 0, 24, kvDim);
    const restored = (a: Float32Array) => Array.from(a.subarray(16 * kvDim, 20 * kvDim), bf16);
    expect(Array.from(after.k.subarray(16 * kvDim, 20 * kvDim))).toEqual(restored(before.k));
    expect(Array.from(after.v.subarray(16 * kvDim, 20 * kvDim))).toEqual(restored(before.v));
    expect(bits(after.k.subarray(0, 16 * kvDim))).toEqual(bits(before.k.subarray(0, 16 * kvDim)));  // page 0 untouched
    // The rows written since are bf16 of the exact values.
    const want = await exactKv(24);
    expect(bits(after.k.subarray(20 * kvDim))).toEqual(bits(want.k.subarray(20 * kvDim).map(bf16)));
    s.dispose();
  });

  test("a failed append leaves the rows before it reading as they did: at a page's end and inside a page", async () => {
    for (const n of [32, 41]) {
      const s = m.createSequence();
      await native(s).append(Int32Array.from(tokens.slice(0, n)), { mode: "fixed-point", logits: "none" });
      const before = readKv(s, 0, n, kvDim);
      // Cancelled before its first token: it fails after moving the residual to its first page.
      const cancel = new Int32Array(new SharedArrayBuffer(4));
      cancel[0] = 1;
      await expect(native(s).append(Int32Array.from(tokens.slice(n, n + 20)), { mode: "sequential", logits: "none", cancel })).rejects.toThrow();
      expect(native(s).length).toBe(n);
      const after = readKv(s, 0, n, kvDim);
      expect(bits(after.k)).toEqual(bits(before.k));
      expect(bits(after.v)).toEqual(bits(before.v));
      expect(m.auditCache()).toBe("");
      s.dispose();
    }
  });

  test("a fork writes its own residual: the source's partial page reads as before", async () => {
    const s = m.createSequence();
    await s.append(tokens.slice(0, 41));
    const before = readKv(s, 0, 40, kvDim);
    const used = m.cacheStats().pagesUsed;
    const R = m.cacheStats().residualPages;
    expect(R).toBeGreaterThan(0);
    const f = s.fork();
    expect(m.cacheStats().pagesUsed).toBe(used);  // shared, residual included
    await f.append([5, 6, 7, 8, 9, 10, 11, 12]);  // into the shared partial page: it and the residual are copied
    expect(m.cacheStats().pagesUsed).toBe(used + 1 + R);
    expect(bits(readKv(s, 0, 40, kvDim).k)).toEqual(bits(before.k));
    expect(bits(readKv(s, 0, 40, kvDim).v)).toEqual(bits(before.v));
    expect(m.auditCache()).toBe("");
    f.dispose();
    s.dispose();
    expect(m.cacheStats().pagesUsed).toBe(0);
  });
});

test("prefix reuse rewinds an int4 sequence only where its K/V stays exact, and matches a fresh prefill", async () => {
  const dir = writeTinyModel({ layerTypes: "0_3_3_3", seed: 62, maxPositions: 256 });
  const m = await loadModel(dir, { device: "cpu", kvCacheDtype: "int4" });
  const fresh = await loadModel(dir, { device: "cpu", kvCacheDtype: "int4", prefixCache: 0 });
  const prefix = Array.from({ length: 50 }, (_, i) => (i * 7 + 3) % 64);
  const greedy = { maxNewTokens: 6, temperature: 0, ignoreEos: true };
  // The cached sequence ends at 50 + 2 + 6 tokens: its residual holds page 3 (48..63). A prompt
  // sharing 50 tokens rewinds to 50, inside that page: exact, all 50 reused.
  await m.generate([...prefix, 1, 2], greedy);
  const r1 = await m.generate([...prefix, 9, 8, 7], greedy);
  expect(m.cacheStats().prefixCache.reusedTokens).toBe(50);
  expect(r1.tokens).toEqual((await fresh.generate([...prefix, 9, 8, 7], greedy)).tokens);
  await m.dispose();
  // A longer cached sequence (its residual on a later page): 50 is inside quantized page 3, so
  // the reuse stops at 48.
  const m2 = await loadModel(dir, { device: "cpu", kvCacheDtype: "int4" });
  await m2.generate([...prefix, ...Array.from({ length: 30 }, (_, i) => i % 64)], greedy);
  const r2 = await m2.generate([...prefix, 40, 41], { ...greedy, maxNewTokens: 3 });
  expect(m2.cacheStats().prefixCache.hits).toBe(1);
  expect(m2.cacheStats().prefixCache.reusedTokens).toBe(48);
  expect(r2.tokens).toEqual((await fresh.generate([...prefix, 40, 41], { ...greedy, maxNewTokens: 3 })).tokens);
  await m2.dispose();
  await fresh.dispose();
});

test("capacity: the default model's int4 pool holds 6.5 times f32's tokens in sequences of 2048, residuals included", async () => {
  const kvCacheMemory = 64 << 20;
  const [f, q] = await Promise.all(["f32", "int4"].map((kvCacheDtype) => loadModel(undefined, { device: "cpu", kvCacheDtype: kvCacheDtype as "f32" | "int4", kvCacheMemory })));
  const fs = f.cacheStats(), qs = q.cacheStats();
  expect(q.kvBytesPerToken).toBe(456);  // 3 KV layers x (128 of codes + 16 of K scales per channel + 8 of V scales)
  expect(qs.residualPages).toBe(4);
  expect(qs.capacityTokens / fs.capacityTokens).toBeGreaterThan(6.7);
  // Sequences of 2048 tokens each: 128 pages, and in int4 4 more for the residual.
  const perSequence = 2048 / qs.pageTokens;
  const held = (s: typeof qs) => Math.floor(s.pagesTotal / (perSequence + s.residualPages)) * 2048;
  expect(held(qs) / held(fs)).toBeGreaterThanOrEqual(6.5);
  await f.dispose();
  await q.dispose();
});
