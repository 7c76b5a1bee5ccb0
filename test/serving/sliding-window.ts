/** Sliding-window models keep only their window's pages. */
import { InvalidInputError, InvalidOptionError, loadModel } from "../../lib";
import type { TestDevice } from "../helpers/device";
import { writeTinyModel } from "../helpers/tiny-model";

export function slidingWindowTests(dev: TestDevice): void {
  describe.each([
    ["mistral (every layer windowed)", { seed: 41, maxPositions: 512, config: { model_type: "mistral", architectures: ["MistralForCausalLM"], sliding_window: 24 } }],
    ["LCKV with windowed layers only", { layerTypes: "0s_3s_3s_3s", seed: 42, maxPositions: 512, config: { sliding_window: 24 } }],
  ])("%s", (_name, spec) => {
    test("a long generation holds only the window's pages and matches the full-sequence forward", async () => {
      const m = await loadModel(writeTinyModel(spec), { ...dev, prefixCache: 0 });
      const P = m.cacheStats().pageTokens;
      const seq = m.createSequence();
      const prompt = Array.from({ length: 40 }, (_, i) => (i * 5 + 1) % 32);
      await seq.append(prompt);
      let maxPages = m.cacheStats().pagesUsed;
      const tokens: number[] = [];
      for await (const c of seq.generate({ maxNewTokens: 300, temperature: 0, ignoreEos: true })) {
        tokens.push(c.token!);
        maxPages = Math.max(maxPages, m.cacheStats().pagesUsed);
      }
      expect(tokens.length).toBe(300);
      // The window (24) plus one spare position, rounded out to pages, plus the page being filled
      // (and an int4 cache's residual).
      expect(maxPages).toBeLessThanOrEqual(Math.ceil((24 + 2) / P) + 2 + m.cacheStats().residualPages);
      // Every greedy token is the argmax of the full forward over the whole text (which never
      // releases anything): released pages were never needed.
      const all = [...prompt, ...tokens];
      const logits = await m.logits(all.slice(0, -1), { prefill: "sequential" });
      const V = m.config.vocabSize;
      const argmax = (row: number) => {
        let b = 0;
        for (let v = 1; v < V; v++) if (logits[row * V + v] > logits[row * V + b]) b = v;
        return b;
      };
      tokens.forEach((t, i) => expect(argmax(prompt.length - 1 + i)).toBe(t));
      // Rewinding into what the window released is refused with a typed error; a short rewind works.
      expect(() => seq.truncate(10)).toThrow(InvalidInputError);
      seq.truncate(seq.length - 1);
      seq.dispose();
      // Its memory is already bounded by the window: a sink-window shift is refused, typed, before
      // anything is generated (not at the context limit, with the tokens so far lost).
      const endless = m.createSequence();
      await endless.append(prompt);
      let generated = 0;
      const run = async () => {
        for await (const c of endless.generate({ maxNewTokens: m.maxContext, temperature: 0, ignoreEos: true, contextShift: "sink-window" })) generated += c.text.length + 1;
      };
      const e = await run().catch((x) => x);
      expect(e).toBeInstanceOf(InvalidOptionError);
      expect(e.option).toBe("contextShift");
      expect(e.message).toMatch(/sliding window/);
      expect(generated).toBe(0);
      await expect(m.generate(prompt, { maxNewTokens: 4, contextShift: "sink-window" })).rejects.toThrow(InvalidOptionError);
      endless.dispose();
      expect(m.cacheStats().pagesUsed).toBe(0);
      expect(m.auditCache()).toBe("");
      await m.dispose();
    });

    test("a pool smaller than the request still runs it, and two at once: each promises its window's pages, not the request's", async () => {
      const dir = writeTinyModel(spec);
      const roomy = await loadModel(dir, { ...dev, prefixCache: 0 });
      const P = roomy.cacheStats().pageTokens;
      const pageBytes = roomy.cacheStats().pageBytes;
      const R = roomy.cacheStats().residualPages;  // an int4 cache's residual, held by each sequence (0 otherwise)
      const prompts = [0, 1].map((k) => Array.from({ length: 40 }, (_, i) => (i * 5 + 1 + k * 7) % 32));
      const opts = { maxNewTokens: 300, temperature: 0, ignoreEos: true };
      const alone = await Promise.all(prompts.map(async (p) => (await roomy.generate(p, opts)).tokens));
      await roomy.dispose();
      // 8 pages hold 128 tokens; each request reaches 340. While it decodes, a sequence holds the
      // pages of the window (24) and its spare position: at most ceil(25 / 16) + 1 = 3, and its
      // residual. The pool is the window's pages and k idle sequences' (a page and a residual
      // each, below), at least two windows: 8 pages without a residual.
      const windowPages = Math.ceil(25 / P) + 1 + R;
      let k = 1;
      while (windowPages + k * (1 + R) < Math.max(8, 2 * windowPages)) k++;
      const poolPages = windowPages + k * (1 + R);
      const m = await loadModel(dir, { ...dev, prefixCache: 0, kvCacheMemory: poolPages * pageBytes, queueTimeout: 10_000 });
      expect(m.maxContext).toBe(512);
      let maxPages = 0;
      let lateReserved = 0;
      const watch = (n: number) => {
        const st = m.cacheStats();
        maxPages = Math.max(maxPages, st.pagesUsed);
        expect(st.pagesUsed + st.pagesReserved).toBeLessThanOrEqual(st.pagesTotal);
        // Far past a first promise of 3 pages, released pages still go back into the promises.
        if (n > 200) lateReserved = Math.max(lateReserved, st.pagesReserved);
      };
      // One through model.generate() (its prompt reserved with the request), one through a
      // sequence of its own.
      const viaModel = (async () => {
        const tokens: number[] = [];
        for await (const c of m.stream(prompts[0], opts)) {
          tokens.push(c.token!);
          watch(tokens.length);
        }
        return tokens;
      })();
      const viaSequence = (async () => {
        const seq = m.createSequence();
        await seq.append(prompts[1]);
        const tokens: number[] = [];
        for await (const c of seq.generate(opts)) {
          tokens.push(c.token!);
          watch(tokens.length);
        }
        seq.dispose();
        return tokens;
      })();
      expect(await Promise.all([viaModel, viaSequence])).toEqual(alone);
      expect(maxPages).toBeLessThanOrEqual(2 * windowPages);
      expect(lateReserved).toBeGreaterThan(0);
      expect(m.cacheStats().pagesUsed).toBe(0);
      expect(m.cacheStats().pagesReserved).toBe(0);
      // Every page but the window's is held by idle sequences (a page each, and a residual: a
      // short sequence releases nothing): a generation, and one of a fork that shares its
      // source's pages, never needs a page beyond its promise.
      const hold = async (pages: number) =>
        Promise.all(Array.from({ length: Math.floor(pages / (1 + R)) }, async (_, k) => {
          const q = m.createSequence();
          await q.append(Array.from({ length: P }, (_, i) => (i * 3 + k) % 32));
          return q;
        }));
      // Once a generation runs, any page free and not promised is taken by another sequence too:
      // a page the generation was not promised would not be there for it.
      const runGrabbing = async (chunks: AsyncIterable<{ token: number | null }>) => {
        const tokens: number[] = [];
        let grabbed: Awaited<ReturnType<typeof hold>> = [];
        for await (const c of chunks) {
          if (c.token !== null) tokens.push(c.token);
          if (tokens.length === 1) grabbed = await hold(m.cacheStats().pagesFree - m.cacheStats().pagesReserved);
        }
        return { tokens, grabbed };
      };
      let idle = await hold(poolPages - windowPages);
      expect(m.cacheStats().pagesFree).toBe(windowPages);
      const r = await runGrabbing(m.stream(prompts[0], opts));
      expect(r.tokens).toEqual(alone[0]);
      for (const q of [...idle, ...r.grabbed]) q.dispose();
      const source = m.createSequence();
      await source.append(prompts[1]);
      const fork = source.fork();
      idle = await hold(m.cacheStats().pagesFree - windowPages);
      const f = await runGrabbing(fork.generate(opts));
      expect(f.tokens).toEqual(alone[1]);
      for (const q of [source, fork, ...idle, ...f.grabbed]) q.dispose();
      expect(m.cacheStats().pagesUsed).toBe(0);
      expect(m.auditCache()).toBe("");
      await m.dispose();
    });
  });
}
