/**
 * The page bookkeeping of run-ahead's early pages (Model::decodeBatch takes the page of each
 * sequence's next position when it will queue a step ahead), checked alike on the CPU
 * (test/cpu/run-ahead-pages.test.ts, its backend queuing token choices through the addon's
 * setCpuQueuedSampling) and on the GPU (test/gpu/run-ahead.test.ts). Each check takes a loader of
 * the same tiny model with a pool of `pages` pages of 16 tokens on its device.
 */
import { loadModel, LoadOptions, Model } from "../../lib";
import { NativeSamplingParams, NativeSequence } from "../../lib/native";
import { writeTinyModel } from "./tiny-model";

export type LoadWithPages = (pages: number, options?: LoadOptions) => Promise<Model>;

/** The checks' loader on `device`: one tiny model, f32, no prefix cache, a pool of `pages` pages of 16 tokens. */
export function earlyPageLoader(device: "cpu" | "cuda"): LoadWithPages {
  const dir = writeTinyModel({ seed: 61, hidden: 64, vocab: 256, maxPositions: 512 });
  return async (pages, options = {}) => {
    const probe = await loadModel(dir, { device, dtype: "f32", prefixCache: 0 });
    const pageBytes = probe.kvBytesPerToken * 16;
    await probe.dispose();
    return loadModel(dir, { device, dtype: "f32", prefixCache: 0, kvCacheMemory: pages * pageBytes, ...options });
  };
}

const greedy: NativeSamplingParams = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };

export function earlyPagePrompt(model: Model, length: number, salt: number): number[] {
  return Array.from({ length }, (_, k) => (k * 31 + salt * 7 + 3) % model.config.vocabSize);
}
async function prefill(ns: NativeSequence, tokens: number[]): Promise<number> {
  const r = await ns.append(Int32Array.from(tokens), { mode: "sequential", passes: 1, tolerance: 0, logits: "none", sample: greedy });
  return r.token!;
}
// Decodes `seq` alone until it holds `length` tokens; returns its last token.
async function decodeTo(m: Model, seq: NativeSequence, token: number, length: number): Promise<number> {
  while (seq.length < length) token = (await m.nativeModel().decodeBatch([seq], Int32Array.of(token), [greedy]))[0];
  return token;
}
async function using<T>(m: Model, body: (m: Model) => Promise<T>): Promise<T> {
  try {
    return await body(m);
  } finally {
    await m.dispose();
  }
}

/** A step that could run ahead takes its sequence's next page early; without run-ahead it does not. */
export async function expectEarlyPage(load: LoadWithPages): Promise<void> {
  for (const runAhead of [true, false])
    await using(await load(6, { runAhead }), async (m) => {
      const nm = m.nativeModel();
      const a = nm.createSequence(m.maxContext);
      await decodeTo(m, a, await prefill(a, earlyPagePrompt(m, 14, 1)), 16);
      // 16 tokens fill page 0; position 16 opens page 1.
      expect(nm.poolStats().pagesUsed).toBe(runAhead ? 2 : 1);
      expect(nm.auditPool()).toBe("");
      a.dispose();
    });
}

/** A batch (a, b or b, a) refused by a full pool leaves the pool as it was, a's early page included. */
export async function expectFailedBatchKeepsPool(load: LoadWithPages, aFirst: boolean): Promise<void> {
  await using(await load(6), async (m) => {
    const nm = m.nativeModel();
    const a = nm.createSequence(m.maxContext), b = nm.createSequence(m.maxContext);
    const ta = await decodeTo(m, a, await prefill(a, earlyPagePrompt(m, 14, 1)), 16);  // pages 0 and (early) 1
    const tb = await prefill(b, earlyPagePrompt(m, 16 * (nm.poolStats().pagesTotal - 2), 2));  // every other page, full to its end
    const before = nm.poolStats();
    expect(before.pagesFree).toBe(0);
    const e = await nm
      .decodeBatch(aFirst ? [a, b] : [b, a], Int32Array.from(aFirst ? [ta, tb] : [tb, ta]), [greedy, greedy])
      .then(() => null, (x) => x);
    expect(e?.code).toBe("LCKV_KV_CACHE_FULL");
    expect(nm.poolStats()).toEqual(before);
    expect(nm.auditPool()).toBe("");
    // a's page 1 is still its own: it decodes on with no page free.
    await nm.decodeBatch([a], Int32Array.of(ta), [greedy], false);
    expect(a.length).toBe(17);
    a.dispose();
    b.dispose();
  });
}

/** A request keeps its reservation when a batch fails before its row's turn. */
export async function expectReservationKept(load: LoadWithPages): Promise<void> {
  await using(await load(8), async (m) => {
    const nm = m.nativeModel();
    const a = nm.createSequence(m.maxContext), b = nm.createSequence(m.maxContext);
    let ta = await prefill(a, earlyPagePrompt(m, 14, 1));
    a.reserve(48);  // promised the pages up to 48 tokens
    ta = await decodeTo(m, a, ta, 16);  // its page 1 taken early, from that promise
    let tb = await prefill(b, earlyPagePrompt(m, 16 * (nm.poolStats().pagesTotal - 3), 2));  // every page nobody is promised
    const e = await nm.decodeBatch([b, a], Int32Array.of(tb, ta), [greedy, greedy]).then(() => null, (x) => x);
    expect(e?.code).toBe("LCKV_KV_CACHE_FULL");
    // What the scheduler does next: each row alone, b without a page to spare.
    tb = (await nm.decodeBatch([b], Int32Array.of(tb), [greedy], false).catch(() => [tb]))[0];
    await decodeTo(m, a, ta, 47);  // within its promise of 48: no LCKV_KV_CACHE_FULL
    expect(a.length).toBe(47);
    expect(nm.auditPool()).toBe("");
    a.dispose();
    b.dispose();
  });
}

/** An early page never takes the page another row of the same step needs. */
export async function expectOwnPagesFirst(load: LoadWithPages): Promise<void> {
  await using(await load(5), async (m) => {
    const nm = m.nativeModel();
    const a = nm.createSequence(m.maxContext), b = nm.createSequence(m.maxContext), c = nm.createSequence(m.maxContext);
    const ta = await prefill(a, earlyPagePrompt(m, 15, 1));  // page 0: writes 15 next, then 16 (a new page)
    const tb = await prefill(b, earlyPagePrompt(m, 32, 2));  // pages 1 and 2: writes 32 next (a new page)
    await prefill(c, earlyPagePrompt(m, 16, 3));  // page 3
    expect(nm.poolStats().pagesFree).toBe(1);
    await nm.decodeBatch([a, b], Int32Array.of(ta, tb), [greedy, greedy]);  // b's page, not a's early one
    expect([a.length, b.length]).toEqual([16, 33]);
    expect(nm.poolStats().pagesFree).toBe(0);
    expect(nm.auditPool()).toBe("");
    a.dispose();
    b.dispose();
    c.dispose();
  });
}
