/** Sequences: multi-turn use keeps the cache, fork() branches it, truncate() rewinds it. */
import { ContextOverflowError, DisposedError, loadModel, LckvError, Model, Sequence } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";


import type { TestDevice } from "../helpers/device";

export function sequenceTests(dev: TestDevice): void {
  async function collect(it: AsyncGenerator<{ token: number | null }, { tokens: number[] }>) {
    for (;;) {
      const r = await it.next();
      if (r.done) return r.value.tokens;
    }
  }

  describe.each([
    ["standard", undefined],
    ["lckv", "0_3_3_3"],
  ])("%s pattern", (_name, layerTypes) => {
    let model: Model;
    const A = [3, 14, 15, 9, 26, 5];
    const B = [35, 8, 9, 7];
    const greedy = { maxNewTokens: 5, temperature: 0 };
    beforeAll(async () => {
      model = await loadModel(writeTinyModel({ layerTypes, seed: 21, maxPositions: 64 }), { ...dev });
    });
    afterAll(() => model.dispose());

    test("a multi-turn sequence continues exactly as a one-shot generation of the whole text", async () => {
      const seq = model.createSequence();
      await seq.append(A);
      const g1 = await collect(seq.generate(greedy));
      await seq.append(B);
      const g2 = await collect(seq.generate(greedy));
      expect(seq.tokens).toEqual([...A, ...g1, ...B, ...g2]);
      const one = await model.generate([...A, ...g1, ...B], greedy);
      expect(g2).toEqual(one.tokens);
      expect(g1).toEqual((await model.generate(A, greedy)).tokens);
      seq.dispose();
    });

    test("fork() shares the past and diverges independently", async () => {
      const seq = model.createSequence();
      await seq.append(A);
      const child = seq.fork();
      const a = await collect(child.generate({ maxNewTokens: 6, temperature: 1.5, seed: 1 }));
      const b = await collect(seq.generate({ maxNewTokens: 6, temperature: 1.5, seed: 1 }));
      expect(a).toEqual(b);
      // The child's later turns do not touch the parent's cache.
      await child.append(B);
      await collect(child.generate(greedy));
      const parentNext = await collect(seq.generate(greedy));
      expect(parentNext).toEqual((await model.generate([...A, ...b], greedy)).tokens);
      expect(child.tokens.slice(0, A.length)).toEqual(A);
      seq.dispose();
      child.dispose();
    });

    test("truncate() rewinds, and generation from there repeats", async () => {
      const seq = model.createSequence();
      await seq.append(A);
      const first = await collect(seq.generate(greedy));
      seq.truncate(A.length);
      expect(seq.tokens).toEqual(A);
      expect(await collect(seq.generate(greedy))).toEqual(first);
      seq.truncate(2);
      await seq.append(A.slice(2));
      expect(await collect(seq.generate(greedy))).toEqual(first);
      expect(() => seq.truncate(seq.length + 1)).toThrow(/at most the sequence length/);
      seq.dispose();
    });

    test("lifecycle: busy, context, dispose", async () => {
      const seq = model.createSequence();
      await expect(collect(seq.generate(greedy))).rejects.toThrow(/append\(\) input first/);
      await seq.append(A);
      const it = seq.generate({ maxNewTokens: 3 });
      await it.next();
      await expect(seq.append(B)).rejects.toThrow(LckvError);
      await collect(it);
      await expect(seq.append(Array(64).fill(1))).rejects.toThrow(ContextOverflowError);
      {
        using s2 = seq.fork();
        expect(s2.length).toBe(seq.length);
      }
      seq.dispose();
      await expect(seq.append(B)).rejects.toThrow(DisposedError);
      const s3: Sequence = model.createSequence();
      await model.dispose();
      await expect(s3.append(A)).rejects.toThrow(DisposedError);
      model = await loadModel(writeTinyModel({ layerTypes, seed: 21, maxPositions: 64 }), { ...dev });
    });
  });

  test("a prompt longer than one prefill chunk gives the same result as shorter ones would", async () => {
    const m = await loadModel(writeTinyModel({ layerTypes: "0_3_3_3", seed: 4, maxPositions: 700 }), { ...dev });
    const ids = Array.from({ length: 600 }, (_, i) => (i * 17 + 3) % 64);
    // Sequential prefill is exact and not chunk-dependent: the chunked append must match it.
    const seq = m.createSequence();
    await seq.append(ids, { prefill: "fixed-point", prefillTolerance: 0 });
    const it = seq.generate({ maxNewTokens: 4, temperature: 0 });
    const chunked: number[] = [];
    for (;;) {
      const r = await it.next();
      if (r.done) break;
      chunked.push(r.value.token!);
    }
    const whole = await m.logits(ids, { prefill: "sequential" });
    const V = m.config.vocabSize;
    let best = 0;
    for (let j = 1; j < V; j++) if (whole[(ids.length - 1) * V + j] > whole[(ids.length - 1) * V + best]) best = j;
    expect(chunked[0]).toBe(best);
    seq.dispose();
    await m.dispose();
  });
}
