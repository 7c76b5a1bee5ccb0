/** The paged K/V pool: capacity, page sharing, the admission queue and its bounds. */
import { ContextOverflowError, KvCacheFullError, loadModel, Model, Sequence } from "../../lib";
import type { TestDevice } from "../helpers/device";
import { writeTinyModel } from "../helpers/tiny-model";

async function drain(it: AsyncGenerator<{ token: number | null }, { tokens: number[] }>): Promise<number[]> {
  for (;;) {
    const r = await it.next();
    if (r.done) return r.value.tokens;
  }
}

export function kvPoolTests(dev: TestDevice): void {
  test("a fork sharing a partial page may grow to the whole pool: it waits for the page instead of being too large", async () => {
    const dir = writeTinyModel({ maxPositions: 256, seed: 9 });
    const probe = await loadModel(dir, { ...dev, prefixCache: 0 });
    // An int4 cache's sequence also holds its residual: R pages (0 for the other types).
    const P = probe.cacheStats().pageTokens, perToken = probe.kvBytesPerToken, R = probe.cacheStats().residualPages;
    await probe.dispose();
    const m = await loadModel(dir, { ...dev, prefixCache: 0, kvCacheMemory: (4 + R) * P * perToken });
    try {
      expect(m.cacheStats().pagesTotal).toBe(4 + R);
      const ids = (n: number, k: number) => Array.from({ length: n }, (_, i) => (i * 5 + k) % 32);
      const a = m.createSequence();
      await a.append(ids(P + 5, 1)); // P + 4 tokens prefilled: two pages, the second partial
      const b = a.fork();
      // b ends at 4 pages (the shared partial page becomes its own copy) and its own residual:
      // the whole pool, but only once `a` lets go of the pages b would otherwise copy.
      let settled = false;
      const granted = b.reserveRequest(4 * P, 0).finally(() => (settled = true));
      await new Promise((r) => setImmediate(r));
      expect(settled).toBe(false);
      expect(m.cacheStats().queued).toBe(1);
      a.dispose();
      await expect(granted).resolves.toBe(true);
      await b.append(ids(4 * P - (P + 5), 2)); // 4P - 1 tokens prefilled
      expect(m.cacheStats().pagesFree).toBe(0);
      expect(m.auditCache()).toBe("");
      b.dispose();
      expect(m.cacheStats().pagesFree).toBe(4 + R);
    } finally {
      await m.dispose();
    }
  });

  test("capacity: with the same kvCacheMemory the LCKV twin holds numLayers / kvLayers times the tokens", async () => {
    const budget = 512 * 1024;
    const held: Record<string, { tokens: number; seqs: number; model: Model }> = {};
    for (const [name, layerTypes] of [
      ["standard", undefined],
      ["lckv", "0_6_6_6_6_6_6_7"], // 8 layers, 3 of them cache K/V
    ] as const) {
      // maxQueue 0: a request that does not fit now fails at once instead of waiting.
      const m = await loadModel(writeTinyModel({ layerTypes, numLayers: 8, maxPositions: 4096, seed: 3 }), { ...dev, kvCacheMemory: budget, maxQueue: 0, prefixCache: 0 });
      const st = m.cacheStats();
      expect(st.pagesTotal).toBe(Math.floor(budget / (m.kvBytesPerToken * st.pageTokens)));
      expect(st.capacityTokens).toBe(st.pagesTotal * st.pageTokens);
      // Fill the pool with sequences of 50 prefilled tokens until it refuses one.
      const seqs: Sequence[] = [];
      let tokens = 0;
      for (;;) {
        const s = m.createSequence();
        try {
          await s.append(Array.from({ length: 51 }, (_, i) => (i * 7 + seqs.length) % 32));
        } catch (e) {
          expect(e).toBeInstanceOf(KvCacheFullError);
          expect((e as KvCacheFullError).code).toBe("LCKV_QUEUE_FULL");
          s.dispose();
          break;
        }
        seqs.push(s);
        tokens += 50; // the 51st stays pending (evaluated lazily)
      }
      const full = m.cacheStats();
      // Each sequence wastes at most the rest of its last page (and holds its int4 residual's
      // pages), and less than one more sequence's worth is left free.
      const R = full.residualPages;
      expect(tokens).toBeLessThanOrEqual(full.capacityTokens);
      expect(tokens).toBeGreaterThanOrEqual(full.capacityTokens - seqs.length * (1 + R) * full.pageTokens - 50);
      expect(full.pagesFree).toBeLessThan(Math.ceil(50 / full.pageTokens) + R);
      expect(m.auditCache()).toBe("");
      held[name] = { tokens, seqs: seqs.length, model: m };
      for (const s of seqs) s.dispose();
      expect(m.cacheStats().pagesFree).toBe(full.pagesTotal);
    }
    const ratio = held.lckv.model.standardKvBytesPerToken / held.lckv.model.kvBytesPerToken;
    expect(ratio).toBe(8 / 3);
    const pools = held.lckv.model.cacheStats().capacityTokens / held.standard.model.cacheStats().capacityTokens;
    expect(pools).toBeGreaterThan(ratio * 0.97);
    expect(pools).toBeLessThan(ratio * 1.03);
    // Tokens actually held: the same ratio, to within one page per sequence.
    expect(held.lckv.tokens / held.standard.tokens).toBeGreaterThan(ratio * 0.9);
    expect(held.lckv.tokens / held.standard.tokens).toBeLessThan(ratio * 1.1);
    for (const h of Object.values(held)) await h.model.dispose();
  });

  describe("one small pool", () => {
    let m: Model;
    // Pages of an int4 cache's residual, which each sequence that has written holds (0 for the
    // other types): the pool has room for two of them beside its 8 pages of tokens.
    let R = 0;
    beforeAll(async () => {
      // 8 pages of 16 tokens: 128 tokens in all.
      const probe = await loadModel(writeTinyModel({ layerTypes: "0_3_3_3", seed: 9, maxPositions: 512 }), { ...dev, prefixCache: 0 });
      const pageBytes = probe.cacheStats().pageBytes;
      R = probe.cacheStats().residualPages;
      await probe.dispose();
      m = await loadModel(writeTinyModel({ layerTypes: "0_3_3_3", seed: 9, maxPositions: 512 }), { ...dev, kvCacheMemory: (8 + 2 * R) * pageBytes, prefixCache: 2 });
    });
    afterAll(() => m.dispose());
    afterEach(() => {
      m.clearPrefixCache();
      expect(m.cacheStats().pagesFree).toBe(8 + 2 * R);
      expect(m.auditCache()).toBe("");
    });

    test("fork shares every page; a write copies only the page it touches", async () => {
      const s = m.createSequence();
      await s.append(Array.from({ length: 41 }, (_, i) => i % 32)); // 40 evaluated: 3 pages, the last partial
      expect(m.cacheStats().pagesUsed).toBe(3 + R);
      const f = s.fork();
      expect(m.cacheStats().pagesUsed).toBe(3 + R); // shared, not copied
      const g = s.fork();
      const want = await drain(g.generate({ maxNewTokens: 6, temperature: 0 }));
      g.dispose();
      const base = m.cacheStats().pagesUsed;
      expect(base).toBe(3 + R);
      // The child writes position 40 (its pending token) into the shared partial page: one copy
      // (and one of the int4 residual, which holds that page's rows).
      const got = await drain(f.generate({ maxNewTokens: 6, temperature: 0 }));
      expect(got).toEqual(want);
      expect(m.cacheStats().pagesUsed).toBe(base + 1 + R);
      // The parent's pages were not touched by the child's writes.
      expect(await drain(s.generate({ maxNewTokens: 6, temperature: 0 }))).toEqual(want);
      f.dispose();
      s.dispose();
    });

    test("a request waits while the pool is full and runs when pages come back", async () => {
      const holder = m.createSequence();
      await holder.append(Array.from({ length: 101 }, (_, i) => (i * 3) % 32)); // 7 pages
      expect(m.cacheStats().pagesFree).toBe(1 + R);
      const p = m.generate([1, 2, 3, 4, 5], { maxNewTokens: 30, temperature: 0, ignoreEos: true }); // needs 3 pages
      await new Promise((r) => setTimeout(r, 20));
      expect(m.cacheStats().queued).toBe(1);
      holder.dispose();
      const r = await p;
      expect(r.tokens.length).toBe(30);
      expect(m.cacheStats().queued).toBe(0);
    });

    test("the queue's bound, its timeout and an abort while waiting", async () => {
      const holder = m.createSequence();
      await holder.append(Array.from({ length: 113 }, (_, i) => (i * 5) % 32)); // 7 pages
      const m2 = m as Model;
      // queueTimeout and maxQueue are load options; this model has the defaults (no timeout,
      // 1024), so make a strict one on the same files for the bound and the timeout.
      const strict = await loadModel(m2.directory, { ...dev, kvCacheMemory: m2.cacheStats().pageBytes * m2.cacheStats().pagesTotal, maxQueue: 1, queueTimeout: 50, prefixCache: 0 });
      const h2 = strict.createSequence();
      await h2.append(Array.from({ length: 113 }, (_, i) => (i * 5) % 32));
      const waiting = strict.generate([1, 2, 3], { maxNewTokens: 40 });
      await new Promise((r) => setImmediate(r));
      await expect(strict.generate([4, 5, 6], { maxNewTokens: 40 })).rejects.toMatchObject({ code: "LCKV_QUEUE_FULL" });
      await expect(waiting).rejects.toMatchObject({ code: "LCKV_KV_CACHE_FULL" });
      expect(strict.cacheStats().queued).toBe(0);
      h2.dispose();
      await strict.dispose();
      // An abort while waiting ends the request with finishReason "abort" and leaves the queue.
      const ac = new AbortController();
      const aborted = m.generate([7, 8, 9], { maxNewTokens: 40, signal: ac.signal });
      await new Promise((r) => setTimeout(r, 10));
      expect(m.cacheStats().queued).toBe(1);
      ac.abort();
      expect((await aborted).finishReason).toBe("abort");
      expect(m.cacheStats().queued).toBe(0);
      // The same for a sequence's own generate(): aborted while queued, it is usable afterwards.
      const own = m.createSequence();
      await own.append([1, 2, 3]);
      const ac2 = new AbortController();
      const it = own.generate({ maxNewTokens: 40, signal: ac2.signal });
      const first = it.next();
      await new Promise((r) => setTimeout(r, 10));
      expect(m.cacheStats().queued).toBe(1);
      ac2.abort();
      const end = await first;
      expect(end.done).toBe(true);
      expect((end.value as { finishReason: string }).finishReason).toBe("abort");
      holder.dispose();
      await own.append([4, 5]);  // not busy
      expect(own.length).toBe(5);
      own.dispose();
    });

    test("a sink-window generation that shifts while others wait takes its pages back first, then the others run", async () => {
      // A reserves the whole pool (128 tokens of context and two residuals'); B waits. A's shifts give pages back
      // and A must get them again (B needs them too: queueing A behind B would deadlock).
      const a = m.generate([1, 2, 3, 4], { maxNewTokens: 300, temperature: 0, ignoreEos: true, contextShift: "sink-window" });
      await new Promise((r) => setTimeout(r, 5));
      const b = m.generate([5, 6, 7], { maxNewTokens: 40, temperature: 0, ignoreEos: true });
      const [ra, rb] = await Promise.all([a, b]);
      expect(ra.tokens.length).toBe(300);
      expect(rb.tokens.length).toBe(40);
    });

    test("when the first waiting request gives up, the one behind it runs if it fits", async () => {
      const holder = m.createSequence();
      await holder.append(Array.from({ length: 101 }, (_, i) => (i * 3) % 32)); // 7 pages: 1 free (and a residual's)
      const ac = new AbortController();
      const big = m.generate([1, 2, 3], { maxNewTokens: 40, signal: ac.signal }); // 3 pages: waits
      await new Promise((r) => setTimeout(r, 5));
      const small = m.generate([4, 5], { maxNewTokens: 5, temperature: 0, ignoreEos: true }); // 1 page: queued behind
      await new Promise((r) => setTimeout(r, 5));
      expect(m.cacheStats().queued).toBe(2);
      ac.abort();
      expect((await big).finishReason).toBe("abort");
      expect((await small).tokens.length).toBe(5); // nothing else happened to wake it
      holder.dispose();
    });

    test("a prompt that could never fit fails at once, even while the pool is busy", async () => {
      const holder = m.createSequence();
      await holder.append([1, 2, 3]);
      const t0 = Date.now();
      // The context is the pool, less a sequence's residual: 128 tokens and another residual's.
      await expect(m.generate(Array(129 + R * 16).fill(1), { maxNewTokens: 1 })).rejects.toBeInstanceOf(ContextOverflowError);
      expect(Date.now() - t0).toBeLessThan(1000);
      holder.dispose();
    });

    test("finished requests kept for prefix reuse are evicted when a new request needs their pages", async () => {
      await m.generate(Array.from({ length: 60 }, (_, i) => i % 32), { maxNewTokens: 4, temperature: 0 });
      await m.generate(Array.from({ length: 60 }, (_, i) => (i + 9) % 32), { maxNewTokens: 4, temperature: 0 });
      const before = m.cacheStats();
      expect(before.prefixCache.sequences).toBe(2);
      expect(before.pagesCached).toBe(before.pagesUsed);
      expect(before.pagesCached).toBeGreaterThanOrEqual(8 + 2 * R);
      // 70 tokens need 5 pages: the least recently used entry goes, the other stays.
      const r = await m.generate(Array.from({ length: 50 }, (_, i) => (i * 11) % 32), { maxNewTokens: 20, temperature: 0, ignoreEos: true });
      expect(r.tokens.length).toBe(20);
      // Both 4-page entries had to go for 5 pages; the finished request is the one kept now.
      expect(m.cacheStats().prefixCache.sequences).toBe(1);
    });
  });
}
