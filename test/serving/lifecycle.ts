/**
 * No leaks: many requests with random lengths, aborts, disposals, forks and truncations; after
 * them only the prefix cache's sequences are alive, and the accounting agrees.
 */
import { loadModel, LckvError } from "../../lib";
import { rng, writeTinyModel } from "../helpers/tiny-model";


import type { TestDevice } from "../helpers/device";

export function lifecycleTests(dev: TestDevice): void {
  test("1000 random requests leave nothing behind but the prefix cache", async () => {
    const m = await loadModel(writeTinyModel({ layerTypes: "0_3_3_3", seed: 2, vocab: 64, maxPositions: 64 }), { ...dev, prefixCache: 4, threads: 1 });
    const r = rng(99);
    const pick = (n: number) => Math.floor(r() * n);
    const prompt = () => Array.from({ length: 1 + pick(12) }, () => pick(64));
    let done = 0;
    let aborted = 0;
    let failed = 0;
    const one = async (i: number) => {
      const kind = i % 5;
      if (kind === 0) {
        // a one-shot request, sometimes aborted part-way
        const ac = new AbortController();
        const p = m.generate(prompt(), { maxNewTokens: 1 + pick(6), temperature: r() < 0.5 ? 0 : 1, seed: i, signal: ac.signal });
        if (r() < 0.3) setImmediate(() => ac.abort());
        const res = await p;
        if (res.finishReason === "abort") aborted++;
      } else if (kind === 1) {
        // a sequence that is forked, truncated, continued and disposed
        const s = m.createSequence();
        await s.append(prompt());
        const f = s.fork();
        if (r() < 0.5) s.truncate(pick(s.length + 1));
        if (s.length > 0) for await (const c of s.generate({ maxNewTokens: 1 + pick(3) })) void c;
        await f.append(prompt());
        s.dispose();
        if (r() < 0.5) for await (const c of f.generate({ maxNewTokens: 2 })) void c;
        f.dispose();
      } else if (kind === 2) {
        // a sequence disposed in the middle of its generation
        const s = m.createSequence();
        await s.append(prompt());
        try {
          for await (const c of s.generate({ maxNewTokens: 8 })) {
            void c;
            if (r() < 0.4) s.dispose();
          }
        } catch (e) {
          expect(e).toBeInstanceOf(LckvError);
          failed++;
        }
        s.dispose();
      } else {
        await m.generate(prompt(), { maxNewTokens: 1 + pick(4) });
      }
      done++;
    };
    // 1000 requests, 25 at a time.
    for (let i = 0; i < 1000; i += 25) await Promise.all(Array.from({ length: 25 }, (_, j) => one(i + j)));
    expect(done).toBe(1000);
    const stats = m.cacheStats();
    expect(stats.liveSequences).toBe(stats.prefixCache.sequences);
    expect(stats.prefixCache.sequences).toBeLessThanOrEqual(4);
    expect(stats.kvBytes).toBeGreaterThan(0);
    expect(aborted + failed).toBeGreaterThan(0);
    // Every page is free or held by the prefix cache, and the pool's counts add up: each page's
    // reference count equals the page tables that hold it, nothing is reserved or queued.
    expect(stats.pagesUsed).toBe(stats.pagesCached);
    expect(stats.pagesUsed).toBeGreaterThan(0);
    expect(stats.pagesUsed + stats.pagesFree).toBe(stats.pagesTotal);
    expect(stats.pagesReserved).toBe(0);
    expect(stats.queued).toBe(0);
    expect(m.auditCache()).toBe("");
    m.clearPrefixCache();
    expect(m.cacheStats().pagesFree).toBe(stats.pagesTotal);
    await m.dispose();
    expect(m.cacheStats().liveSequences).toBe(0);
  });
}
