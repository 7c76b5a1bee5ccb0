/** Prefix reuse: a request that shares a prefix with a finished one prefills only the rest. */
import { KV_PAGE_TOKENS, loadModel } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";


import type { TestDevice } from "../helpers/device";

export function prefixCacheTests(dev: TestDevice): void {
  describe.each([
    ["standard", undefined],
    ["lckv", "0_3_3_3"],
  ])("%s pattern", (_name, layerTypes) => {
    const dir = writeTinyModel({ layerTypes, seed: 8, vocab: 64, maxPositions: 512 });
    const prefix = Array.from({ length: 200 }, (_, i) => (i * 11 + 5) % 64);
    const a = [...prefix, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    const b = [...prefix, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49];
    const greedy = { maxNewTokens: 8, temperature: 0, ignoreEos: true };

    test("a shared 200-token prefix is not prefilled again, and the output is the same as without reuse", async () => {
      const m = await loadModel(dir, { ...dev });
      await m.generate(a, greedy);
      const before = m.cacheStats();
      const reused = await m.generate(b, greedy);
      const after = m.cacheStats();
      // An int4 cache rewinds exactly only to the start of a page or within the page it writes
      // (a's sequence of 218 tokens writes page 13): 192 of the 200 tokens are reused.
      const P = before.pageTokens;
      const kept = before.residualPages > 0 ? Math.floor(prefix.length / P) * P : prefix.length;
      // Only b's 12 new tokens run (and those of the prefix past `kept`): 11 in the prefill, the
      // last one in the first decode step.
      expect(after.prefilledTokens - before.prefilledTokens).toBe(b.length - kept - 1);
      expect(after.prefixCache.hits - before.prefixCache.hits).toBe(1);
      expect(after.prefixCache.reusedTokens - before.prefixCache.reusedTokens).toBe(kept);

      const fresh = await loadModel(dir, { ...dev, prefixCache: 0 });
      const s0 = fresh.cacheStats().prefilledTokens;
      const plain = await fresh.generate(b, greedy);
      expect(fresh.cacheStats().prefilledTokens - s0).toBe(b.length - 1);
      expect(reused.tokens).toEqual(plain.tokens);
      await fresh.dispose();
      await m.dispose();
    });

    test("least recently used requests leave the cache first", async () => {
      // Prompts of one whole page (16 tokens) each, so that a match is long enough to be a hit.
      const page = (first: number) => Array.from({ length: 16 }, (_, i) => (first + i) % 64);  // the test models' vocabulary is 64
      const m = await loadModel(dir, { ...dev, prefixCache: 2 });
      for (const p of [page(1), page(20), page(40)]) await m.generate(p, { maxNewTokens: 2 });
      expect(m.cacheStats().prefixCache.sequences).toBe(2);
      await m.generate([...page(1), 3], { maxNewTokens: 2 }); // page(1) was evicted
      expect(m.cacheStats().prefixCache.hits).toBe(0);
      await m.generate([...page(40), 3], { maxNewTokens: 2 });
      expect(m.cacheStats().prefixCache.hits).toBe(1);
      expect(m.cacheStats().prefixCache.reusedTokens).toBe(16);
      await m.dispose();
    });

    test("a shared prefix shorter than one page is not a hit", async () => {
      const m = await loadModel(dir, { ...dev, prefixCache: 4 });
      const first = Array.from({ length: 20 }, (_, i) => 5 + i);
      await m.generate(first, { maxNewTokens: 2 });
      // 15 tokens in common (one short of a page; a BOS token alone is the usual case): prefilled whole.
      const s0 = m.cacheStats().prefilledTokens;
      const near = [...first.slice(0, 15), 63, 62, 61];
      await m.generate(near, { maxNewTokens: 1 });
      expect(m.cacheStats().prefixCache.hits).toBe(0);
      expect(m.cacheStats().prefilledTokens - s0).toBe(near.length - 1);
      // 16 in common: a hit that reuses exactly that page.
      await m.generate([...first.slice(0, 16), 63], { maxNewTokens: 1 });
      expect(m.cacheStats().prefixCache.hits).toBe(1);
      expect(m.cacheStats().prefixCache.reusedTokens).toBe(16);
      await m.dispose();
    });
  });

  test("an LCKV prompt prefilled with the approximate iterative scheme serves only requests that prefill iteratively too", async () => {
    const dir = writeTinyModel({ layerTypes: "0_3_3_3", seed: 8, maxPositions: 128 });
    const p = Array.from({ length: 40 }, (_, i) => (i * 3 + 1) % 64);
    const greedy = { maxNewTokens: 4, temperature: 0, ignoreEos: true };
    const iterative = { ...greedy, prefill: "iterative" as const };
    const fresh = await loadModel(dir, { ...dev, prefixCache: 0 });
    // Sequential and fixed-point requests do not take it: no hit, and the output of a model
    // without a prefix cache. (Each on a cache holding the iterative request alone: a finished
    // exact request would serve the next one.)
    for (const opts of [{ ...greedy, prefill: "sequential" as const }, { ...greedy, prefill: "fixed-point" as const }]) {
      const other = await loadModel(dir, { ...dev });
      await other.generate(p, iterative);
      expect(other.cacheStats().prefixCache.sequences).toBe(1);
      const out = await other.generate([...p, 5], opts);
      expect(other.cacheStats().prefixCache.hits).toBe(0);
      expect(out.tokens).toEqual((await fresh.generate([...p, 5], opts)).tokens);
      await other.dispose();
    }
    // An iterative request does: all 40 tokens are reused, none prefilled again.
    const m = await loadModel(dir, { ...dev });
    await m.generate(p, iterative);
    const s0 = m.cacheStats().prefilledTokens;
    const reused = await m.generate([...p, 7], iterative);
    expect(m.cacheStats().prefixCache.hits).toBe(1);
    expect(m.cacheStats().prefixCache.reusedTokens).toBe(p.length);
    expect(m.cacheStats().prefilledTokens - s0).toBe(0);
    // Its output is the one of that cut: the first request's iterative prefill of tokens 0-38,
    // token 39 alone (there its first decode step), then 7 and the greedy steps.
    const cut = fresh.createSequence();
    await cut.append(p, { prefill: "iterative" });
    await cut.append([7]);
    const tokens: number[] = [];
    for await (const x of cut.generate(greedy)) if (x.token !== null) tokens.push(x.token);
    cut.dispose();
    expect(reused.tokens).toEqual(tokens);
    await fresh.dispose();
    await m.dispose();
  });

  test("iterated K/V serves no request that asks for more passes than it ran", async () => {
    const dir = writeTinyModel({ layerTypes: "0_3_3_3", seed: 8, maxPositions: 128 });
    const p = Array.from({ length: 40 }, (_, i) => (i * 5 + 3) % 64);
    const greedy = { maxNewTokens: 4, temperature: 0, ignoreEos: true, prefill: "iterative" as const };
    const m = await loadModel(dir, { ...dev });
    const fresh = await loadModel(dir, { ...dev, prefixCache: 0 });
    await m.generate(p, { ...greedy, prefillPasses: 1 });
    // Four passes asked for: the one-pass K/V is passed over, and the output is a fresh prefill's.
    const four = await m.generate([...p, 7], { ...greedy, prefillPasses: 4 });
    expect(m.cacheStats().prefixCache.hits).toBe(0);
    expect(four.tokens).toEqual((await fresh.generate([...p, 7], { ...greedy, prefillPasses: 4 })).tokens);
    // One pass asked for: either entry serves (the four-pass one is iterated more than asked).
    await m.generate([...p, 9], { ...greedy, prefillPasses: 1 });
    expect(m.cacheStats().prefixCache.hits).toBe(1);
    await fresh.dispose();
    await m.dispose();
  });

  test("logits() takes its pages through admission: it evicts cached prefixes rather than failing", async () => {
    const dir = writeTinyModel({ seed: 8, vocab: 64, maxPositions: 256 });
    const probe = await loadModel(dir, { ...dev });
    const pageBytes = probe.kvBytesPerToken * KV_PAGE_TOKENS;
    await probe.dispose();
    const m = await loadModel(dir, { ...dev, kvCacheMemory: 8 * pageBytes });
    // Two finished requests of 60 tokens each: 8 pages, all held by the prefix cache.
    for (const first of [1, 2]) await m.generate(Array.from({ length: 40 }, (_, i) => (first + i * 3) % 64), { maxNewTokens: 20, ignoreEos: true });
    expect(m.cacheStats().pagesCached).toBe(8);
    const ids = Array.from({ length: 60 }, (_, i) => (i * 7 + 5) % 64);
    const logits = await m.logits(ids);
    expect(logits.length).toBe(60 * m.config.vocabSize);
    expect(m.cacheStats().prefixCache.sequences).toBeLessThan(2);
    await m.dispose();
  });

  test("an LCKV prompt prefilled to a loose tolerance serves only requests at least as loose", async () => {
    const dir = writeTinyModel({ layerTypes: "0_3_3_3", seed: 8, maxPositions: 128 });
    const m = await loadModel(dir, { ...dev });
    const p = Array.from({ length: 40 }, (_, i) => (i * 5 + 2) % 64);
    const greedy = { maxNewTokens: 6, temperature: 0, ignoreEos: true };
    const loose = { ...greedy, prefill: "fixed-point" as const, prefillTolerance: 0.5 };
    const fixedPoint = { ...greedy, prefill: "fixed-point" as const };
    await m.generate(p, loose);
    expect(m.cacheStats().prefixCache.sequences).toBe(1);
    // Fixed-point at its default tolerance (1e-6) and sequential prefill do not accept it: no
    // hit, and the same output as a model without a prefix cache.
    const exact = await m.generate([...p, 7], fixedPoint);
    const sequential = await m.generate([...p, 8], { ...greedy, prefill: "sequential" });
    expect(m.cacheStats().prefixCache.hits).toBe(0);
    const fresh = await loadModel(dir, { ...dev, prefixCache: 0 });
    expect(exact.tokens).toEqual((await fresh.generate([...p, 7], fixedPoint)).tokens);
    expect(sequential.tokens).toEqual((await fresh.generate([...p, 8], { ...greedy, prefill: "sequential" })).tokens);
    await fresh.dispose();
    // A request as loose reuses it.
    await m.generate([...p, 9], loose);
    expect(m.cacheStats().prefixCache.hits).toBe(1);
    await m.dispose();
  });
}
