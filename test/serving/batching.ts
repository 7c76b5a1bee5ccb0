/** Continuous batching: concurrent generations share decode steps and get what each gets alone. */
import { DisposedError, loadModel, Model } from "../../lib";
import { batchInvariant, TestDevice } from "../helpers/device";
import { writeTinyModel } from "../helpers/tiny-model";

export function batchingTests(dev: TestDevice): void {
  describe.each([
    ["standard", undefined],
    ["lckv", "0_3_3_3"],
  ])("%s pattern", (_name, layerTypes) => {
    let model: Model;
    beforeAll(async () => {
      // No prefix reuse: the batched runs must compute everything themselves. Bit for bit as
      // alone is what the tests ask of 32 requests at once: the default's on the CPU and with
      // f32 weights on the GPU (as the GPU suite runs these), maxBatch 16's with bf16 weights
      // (batchInvariant).
      model = await loadModel(writeTinyModel({ layerTypes, seed: 5, vocab: 64, maxPositions: 128 }), { ...dev, prefixCache: 0, ...batchInvariant(dev) });
    });
    afterAll(() => model.dispose());

    test("32 concurrent requests, greedy and seeded, each exactly as alone, in shared steps", async () => {
      const reqs = Array.from({ length: 32 }, (_, i) => ({
        prompt: Array.from({ length: 2 + ((i * 7) % 19) }, (_, j) => (i * 13 + j * 5 + 1) % 64),
        opts: { maxNewTokens: 4 + (i % 9), temperature: i % 3 === 0 ? 0 : 0.7 + (i % 4) * 0.2, topK: i % 5 === 0 ? 8 : 0, seed: 1000 + i, ignoreEos: true },
      }));
      const alone: number[][] = [];
      for (const q of reqs) alone.push((await model.generate(q.prompt, q.opts)).tokens);
      const before = model.schedulerStats();
      const together = await Promise.all(reqs.map((q) => model.generate(q.prompt, q.opts)));
      const after = model.schedulerStats();
      expect(together.map((r) => r.tokens)).toEqual(alone);
      // Batching happened: fewer steps than tokens, and batches larger than one.
      expect(after.maxBatch).toBeGreaterThan(8);
      expect(after.steps - before.steps).toBeLessThan(after.tokens - before.tokens);
    });

    test("a sequence disposed mid-batch fails alone; the others finish", async () => {
      const a = model.createSequence();
      const b = model.createSequence();
      await a.append([1, 2, 3]);
      await b.append([4, 5, 6]);
      const ga = a.generate({ maxNewTokens: 5, temperature: 0 });
      const gb = b.generate({ maxNewTokens: 5, temperature: 0 });
      const pa = (async () => {
        for (;;) if ((await ga.next()).done) return "done";
      })();
      const pb = (async () => {
        await gb.next();
        b.dispose();
        for (;;) if ((await gb.next()).done) return "done";
      })();
      const [ra, rb] = await Promise.allSettled([pa, pb]);
      expect(ra).toEqual({ status: "fulfilled", value: "done" });
      expect(rb.status).toBe("rejected");
      expect((rb as PromiseRejectedResult).reason).toBeInstanceOf(DisposedError);
      a.dispose();
    });
  });

  test("by default a step runs all 40 sequences (maxBatch is 256 on every device); maxBatch: 16 caps it at 16", async () => {
    const dir = writeTinyModel({ seed: 6, vocab: 64, maxPositions: 64 });
    const n = 40;
    // A pool that holds every sequence at once: a page each, and an int4 cache's residual.
    const probe = await loadModel(dir, { ...dev, prefixCache: 0 });
    const { pageBytes, residualPages } = probe.cacheStats();
    await probe.dispose();
    const kvCacheMemory = n * (1 + residualPages) * pageBytes;
    for (const maxBatch of [undefined, 16]) {
      const m = await loadModel(dir, { ...dev, prefixCache: 0, kvCacheMemory, ...(maxBatch ? { maxBatch } : {}) });
      // Prefilled first, so that the generations start together: every sequence's first decode
      // request reaches the scheduler before its first step runs.
      const seqs = [];
      for (let i = 0; i < n; i++) {
        const s = m.createSequence();
        await s.append([1 + (i % 60), 2, 3]);
        seqs.push(s);
      }
      const before = m.schedulerStats().steps;
      const tokens = await Promise.all(seqs.map(async (s) => {
        const out: number[] = [];
        for await (const c of s.generate({ maxNewTokens: 3, temperature: 0, ignoreEos: true })) out.push(c.token!);
        return out.length;
      }));
      expect(tokens).toEqual(seqs.map(() => 3));
      const cap = maxBatch ?? n;
      expect(m.schedulerStats().maxBatch).toBe(cap);
      // 3 tokens of n sequences: at least 3n / cap steps, at most 3 rounds of ceil(n / cap).
      const steps = m.schedulerStats().steps - before;
      expect(steps).toBeGreaterThanOrEqual(Math.ceil((3 * n) / cap));
      expect(steps).toBeLessThanOrEqual(3 * Math.ceil(n / cap));
      for (const s of seqs) s.dispose();
      await m.dispose();
    }
  });
}
