/**
 * GPU out-of-memory is a typed error (OutOfMemoryError, LCKV_OUT_OF_MEMORY); the process and the
 * other models keep working, and the failed work gives its memory back.
 * Runs with `npm run test:gpu` on a machine with an NVIDIA GPU; elsewhere it says it skipped.
 */
import { KV_PAGE_TOKENS, LckvError, loadModel, Model, OutOfMemoryError } from "../../lib";
import type { LoadOptions } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU out-of-memory tests");

const MiB = 2 ** 20;
/** A K/V pool far larger than any GPU (4 TiB). */
const HUGE_POOL = 4 * 2 ** 40;
/** How much free device memory may drop across a failed load without counting as a leak. */
const LEAK_TOLERANCE = 4 * MiB;
/** f32 weights and K/V cache on both backends, so the GPU's greedy tokens are the CPU's. */
const dev = { device: "cuda", dtype: "f32", kvCacheDtype: "f32" } as const;
const greedy = { maxNewTokens: 12, temperature: 0, ignoreEos: true };
const prompt = [3, 14, 15, 9, 26, 5, 35, 8];

/** The error loadModel rejects with; a model that loads after all is disposed and fails the test. */
async function failedLoad(dir: string, options: LoadOptions): Promise<LckvError> {
  let m: Model;
  try {
    m = await loadModel(dir, options);
  } catch (e) {
    return e as LckvError;
  }
  await m.dispose();
  throw new Error(`loadModel(${JSON.stringify(options)}) was expected to fail but loaded`);
}

describeGpu("cuda: out of memory", () => {
  // ~21 MiB of f32 weights (mostly the 16384 x 256 embedding): far above LEAK_TOLERANCE, so a
  // failed load that kept its weights would show.
  const spec = { hidden: 256, heads: 4, kvHeads: 2, intermediate: 512, vocab: 16384, numLayers: 2, seed: 11 };
  let dir: string;
  /** Loaded before any failure; no prefix cache, so each generation runs the whole forward again. */
  let resident: Model;
  let residentTokens: number[];
  const freeBytes = () => resident.nativeModel().memoryInfo().free;

  beforeAll(async () => {
    dir = writeTinyModel(spec);
    resident = await loadModel(dir, { ...dev, prefixCache: 0 });
    residentTokens = (await resident.generate(prompt, greedy)).tokens;
    expect(residentTokens).toHaveLength(greedy.maxNewTokens);
  });
  afterAll(async () => {
    await resident?.dispose();
  });

  test("a K/V pool larger than the GPU: loadModel rejects with OutOfMemoryError naming the pool", async () => {
    const pageBytes = resident.kvBytesPerToken * KV_PAGE_TOKENS;
    const pages = Math.floor(HUGE_POOL / pageBytes);
    // The request reaches cudaMalloc: within the engine's page count (below 2^31), and more
    // bytes than the device has.
    expect(pages).toBeLessThan(2 ** 31);
    expect(HUGE_POOL).toBeGreaterThan(resident.nativeModel().memoryInfo().total);
    const err = await failedLoad(dir, { ...dev, kvCacheMemory: HUGE_POOL });
    expect(err).toBeInstanceOf(OutOfMemoryError);
    expect(err.code).toBe("LCKV_OUT_OF_MEMORY");
    expect(err.message).toContain(`K/V pool of ${pages} pages`);
  });

  test("after the failure the model loaded before it and a newly loaded one generate what the CPU does", async () => {
    expect(await failedLoad(dir, { ...dev, kvCacheMemory: HUGE_POOL })).toBeInstanceOf(OutOfMemoryError);
    expect((await resident.generate(prompt, greedy)).tokens).toEqual(residentTokens);
    const cpu = await loadModel(dir, { device: "cpu", kvCacheDtype: dev.kvCacheDtype });
    const fresh = await loadModel(dir, dev);
    try {
      expect(fresh.device).toBe("cuda");
      const want = (await cpu.generate(prompt, greedy)).tokens;
      expect((await fresh.generate(prompt, greedy)).tokens).toEqual(want);
      expect(residentTokens).toEqual(want);
    } finally {
      await cpu.dispose();
      await fresh.dispose();
    }
  });

  test("a failed load gives back the device memory it took", async () => {
    expect(resident.nativeModel().memoryInfo().total).toBeGreaterThan(0);
    // Free memory is the device's: npm run test:gpu runs one file at a time, but a plain `jest`
    // runs the GPU test files in parallel processes on the same device, so one reading can be
    // off by their allocations (or frees).
    // A real effect repeats; their noise does not: up to three tries, one must be clean.
    // First, the measurement sees memory that is kept: a loaded model holds at least its pool and weights.
    const shortfalls: number[] = [];
    for (let attempt = 0; attempt < 3; attempt++) {
      const before = freeBytes();
      const kept = await loadModel(dir, { ...dev, kvCacheMemory: 64 * MiB });
      shortfalls.push(64 * MiB + kept.nativeModel().weightBytes - (before - freeBytes()));
      await kept.dispose();
      if (shortfalls[shortfalls.length - 1] <= 0) break;
    }
    expect(Math.min(...shortfalls)).toBeLessThanOrEqual(0);
    // Then a failed load keeps nothing.
    const drops: number[] = [];
    for (let attempt = 0; attempt < 3; attempt++) {
      const before = freeBytes();
      expect(await failedLoad(dir, { ...dev, kvCacheMemory: HUGE_POOL })).toBeInstanceOf(OutOfMemoryError);
      drops.push(before - freeBytes());
      if (drops[drops.length - 1] <= LEAK_TOLERANCE) break;
    }
    expect(Math.min(...drops)).toBeLessThanOrEqual(LEAK_TOLERANCE);
  });

  test("a prefill whose activations cannot fit fails with OutOfMemoryError; the sequence and the model keep working", async () => {
    // Iterative prefill runs the whole input as one forward (lib/sequence.ts does not cut it into
    // chunks), so with 2^19 tokens and an MLP of 2^17 features its gate and up activations need
    // 2^19 * 2^17 * 4 bytes = 256 GiB each, while the weights are 48 MiB and the K/V pool 128 MiB.
    const contextTokens = 2 ** 19;
    const wideDir = writeTinyModel({ numLayers: 1, hidden: 32, heads: 4, kvHeads: 2, intermediate: 2 ** 17, vocab: 64, maxPositions: contextTokens, seed: 5 });
    const wide = await loadModel(wideDir, { ...dev, kvCacheMemory: 128 * MiB, prefixCache: 0 });
    try {
      expect(wide.maxContext).toBe(contextTokens);
      const short = [7, 1, 42, 3, 3, 60];
      const wideTokens = (await wide.generate(short, greedy)).tokens;
      const seq = wide.createSequence();
      const long = Array.from({ length: contextTokens }, (_, i) => (i * 31 + 7) % 64);
      let err: unknown = null;
      try {
        await seq.append(long, { prefill: "iterative" });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(OutOfMemoryError);
      expect((err as LckvError).code).toBe("LCKV_OUT_OF_MEMORY");
      expect((err as LckvError).message).toContain(`forward for ${contextTokens - 1} tokens`);
      // Nothing of the failed append stays: no tokens, no pages, no reservation.
      expect(seq.length).toBe(0);
      const st = wide.cacheStats();
      expect(st.pagesUsed).toBe(0);
      expect(st.pagesReserved).toBe(0);
      expect(wide.auditCache()).toBe("");
      // The same sequence and the model go on as before, and so does the other model.
      await seq.append(short);
      const again: number[] = [];
      for await (const c of seq.generate(greedy)) again.push(c.token!);
      expect(again).toEqual(wideTokens);
      seq.dispose();
      expect((await wide.generate(short, greedy)).tokens).toEqual(wideTokens);
      expect((await resident.generate(prompt, greedy)).tokens).toEqual(residentTokens);
    } finally {
      await wide.dispose();
    }
  });
});
