/** Continuous batching: concurrent generations share decode steps and get what each gets alone. */
import { DisposedError, loadModel, Model } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";


import type { TestDevice } from "../helpers/device";

export function batchingTests(dev: TestDevice): void {
  describe.each([
    ["standard", undefined],
    ["lckv", "0_3_3_3"],
  ])("%s pattern", (_name, layerTypes) => {
    let model: Model;
    beforeAll(async () => {
      // No prefix reuse: the batched runs must compute everything themselves.
      model = await loadModel(writeTinyModel({ layerTypes, seed: 5, vocab: 64, maxPositions: 128 }), { ...dev, prefixCache: 0 });
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
}
