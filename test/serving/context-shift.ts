/** contextShift "sink-window": endless generation in constant memory (StreamingLLM). */
import * as path from "node:path";
import { loadModel, Model } from "../../lib";
import type { NativeSequence } from "../../lib/native";
import type { TestDevice } from "../helpers/device";
import { writeTinyModel } from "../helpers/tiny-model";

const FIXTURES = path.join(__dirname, "..", "fixtures");

async function collect(it: AsyncGenerator<{ token: number | null }, { tokens: number[]; finishReason: string }>, onStep?: () => void) {
  for (;;) {
    const r = await it.next();
    if (r.done) return r.value;
    onStep?.();
  }
}

export function contextShiftTests(dev: TestDevice): void {
  describe.each([
    ["standard llama", () => writeTinyModel({ seed: 31, maxPositions: 64 })],
    ["LCKV llama", () => writeTinyModel({ layerTypes: "0_3_3_3", seed: 32, maxPositions: 64 })],
    ["LCKV gpt2 (learned positions)", () => path.join(FIXTURES, "gpt2-lckv")],
  ])("%s", (_name, dir) => {
    test("generates 10x the context in constant memory", async () => {
      const m: Model = await loadModel(dir(), { ...dev, prefixCache: 0 });
      const ctx = m.maxContext;
      expect(ctx).toBe(64);
      const seq = m.createSequence();
      await seq.append([1, 2, 3, 4, 5]);
      let maxPages = 0;
      const r = await collect(seq.generate({ maxNewTokens: 10 * ctx, temperature: 0.8, seed: 7, ignoreEos: true, contextShift: "sink-window" }), () => {
        maxPages = Math.max(maxPages, m.cacheStats().pagesUsed);
        expect(seq.length).toBeLessThanOrEqual(ctx + 1);
      });
      expect(r.tokens.length).toBe(10 * ctx);
      expect(r.finishReason).toBe("length");
      // (and an int4 cache's residual)
      expect(maxPages).toBeLessThanOrEqual(ctx / m.cacheStats().pageTokens + m.cacheStats().residualPages);
      // The attention sinks stay at the front.
      expect(seq.tokens.slice(0, 5)).toEqual([1, 2, 3, 4, 5]);
      seq.dispose();
      expect(m.cacheStats().pagesUsed).toBe(0);
      expect(m.auditCache()).toBe("");
      // Without a shift the same request stops at the context limit.
      const s2 = m.createSequence();
      await s2.append([1, 2, 3, 4, 5]);
      const r2 = await collect(s2.generate({ maxNewTokens: 10 * ctx, temperature: 0, ignoreEos: true }));
      expect(5 + r2.tokens.length).toBe(ctx);
      s2.dispose();
      await m.dispose();
    });

    test("sinkTokens is refused by name without the shift, or when it leaves no page to drop", async () => {
      const m: Model = await loadModel(dir(), { ...dev, prefixCache: 0 });
      try {
        const refusal = (options: object) => m.generate([1, 2, 3], { maxNewTokens: 2, ...options }).catch((e) => e);
        const alone = await refusal({ sinkTokens: 4 });
        expect(alone).toMatchObject({ code: "LCKV_INVALID_OPTION", option: "sinkTokens" });
        expect(alone.message).toMatch(/applies to contextShift "sink-window" only/);
        const wide = await refusal({ contextShift: "sink-window", sinkTokens: 49 });
        expect(wide).toMatchObject({ code: "LCKV_INVALID_OPTION", option: "sinkTokens" });
        expect(wide.message).toMatch(/keeps 64 tokens .* context of 64: at most 48/);
        // The shift alone, in a context too small for its default sink, is named as the shift.
        const tiny = await loadModel(dir(), { ...dev, prefixCache: 0, maxContext: 16 });
        const shift = await tiny.generate([1, 2, 3], { maxNewTokens: 2, contextShift: "sink-window" }).catch((x) => x);
        await tiny.dispose();
        expect(shift).toMatchObject({ code: "LCKV_INVALID_OPTION", option: "contextShift" });
        expect(shift.message).toMatch(/keeps a sink of 16 tokens \(the default, whole pages of 16\), which leaves no page to drop in a context of 16/);
        // 48 leaves a page: accepted.
        const r = await m.generate([1, 2, 3], { maxNewTokens: 2, contextShift: "sink-window", sinkTokens: 48 });
        expect(r.tokens.length).toBeGreaterThan(0);
        expect(m.cacheStats().liveSequences).toBe(0);
      } finally {
        await m.dispose();
      }
    });
  });

  describe("a generation that will shift while it shares pages (a fork) promises their copies from the start", () => {
    // 8 pages of 16 tokens: a holds 4, its fork b shares them, c holds 3 and leaves 1 free. b's
    // generation needs that page to copy its shared last page, and 2 more for the moved pages it
    // will rotate at 64 tokens (still shared with a), so it waits until pages come back. (An
    // int4 cache has room for the residuals of a and c too; b needs a copy of a's.)
    async function setUp() {
      const dir = writeTinyModel({ seed: 34, maxPositions: 64 });
      const probe = await loadModel(dir, { ...dev, prefixCache: 0 });
      const pageBytes = probe.cacheStats().pageBytes, R = probe.cacheStats().residualPages;
      await probe.dispose();
      const m = await loadModel(dir, { ...dev, prefixCache: 0, kvCacheMemory: (8 + 2 * R) * pageBytes, queueTimeout: 20_000 });
      const a = m.createSequence();
      await a.append(Array.from({ length: 61 }, (_, i) => (i * 5 + 1) % 32));
      const b = a.fork();
      const c = m.createSequence();
      await c.append(Array.from({ length: 49 }, (_, i) => (i * 3 + 2) % 32));
      expect(m.cacheStats().pagesFree).toBe(1);
      let done = false;
      const run = collect(b.generate({ maxNewTokens: 12, temperature: 0, ignoreEos: true, contextShift: "sink-window" })).then((r) => {
        done = true;
        return r;
      });
      for (let i = 0; i < 200 && m.cacheStats().queued === 0 && !done; i++) await new Promise((r) => setTimeout(r, 5));
      expect(done).toBe(false);
      expect(m.cacheStats().queued).toBe(1); // waiting, not failed
      return { m, a, b, c, run };
    }
    async function greedy(m: Model, tokens: readonly number[]) {
      const s = m.createSequence();
      await s.append([...tokens]);
      const r = await collect(s.generate({ maxNewTokens: 3, temperature: 0, ignoreEos: true }));
      s.dispose();
      return r.tokens;
    }

    test("pages come back: it runs, shifts, and the fork's source keeps its K/V", async () => {
      const { m, a, b, c, run } = await setUp();
      c.dispose();
      const r = await run;
      expect(r.tokens.length).toBe(12);
      expect(r.finishReason).toBe("length");
      expect(b.length).toBeLessThan(64); // the shift happened
      expect(m.auditCache()).toBe("");
      b.dispose();
      // a reads what it wrote: its continuation equals a fresh sequence's of the same tokens.
      const fresh = await greedy(m, a.tokens);
      const own = await collect(a.generate({ maxNewTokens: 3, temperature: 0, ignoreEos: true }));
      expect(own.tokens).toEqual(fresh);
      a.dispose();
      expect(m.cacheStats().pagesUsed).toBe(0);
      await m.dispose();
    });

    test("the pages stop being shared while it waits: it needs none of them and runs", async () => {
      const { m, a, b, c, run } = await setUp();
      a.dispose(); // b's pages are its own now: no copy-on-write, no copies at the shift
      const r = await run;
      expect(r.tokens.length).toBe(12);
      expect(b.length).toBeLessThan(64);
      expect(m.auditCache()).toBe("");
      b.dispose();
      c.dispose();
      expect(m.cacheStats().pagesUsed).toBe(0);
      await m.dispose();
    });
  });

  test("the moved keys are re-rotated exactly: a one-layer model continues as if the dropped tokens were never there", async () => {
    // With one layer, each token's K/V depends only on the token and its position, so after a
    // shift the cache must equal that of a fresh sequence holding the kept tokens. (In f32: a
    // compact type rounds the re-rotated keys to its codes again.)
    const m = await loadModel(writeTinyModel({ numLayers: 1, seed: 33, maxPositions: 64 }), { ...dev, prefixCache: 0, kvCacheDtype: "f32" });
    const seq = m.createSequence();
    await seq.append(Array.from({ length: 60 }, (_, i) => (i * 7 + 3) % 32));
    await collect(seq.generate({ maxNewTokens: 8, temperature: 0, ignoreEos: true, contextShift: "sink-window" }));
    expect(seq.length).toBeLessThan(60); // a shift happened
    const fresh = m.createSequence();
    await fresh.append(seq.tokens);
    // Both hold the same tokens with the last one pending; evaluate it and one more, and
    // compare the logits (through the native sequences: the public API returns tokens only).
    const next = Int32Array.from([seq.tokens[seq.length - 1], 5]);
    const native = (s: unknown) => (s as { native: NativeSequence }).native;
    const a = await native(seq).append(next, { mode: "sequential", logits: "all" });
    const b = await native(fresh).append(next, { mode: "sequential", logits: "all" });
    let diff = 0;
    let scale = 0;
    for (let i = 0; i < b.logits!.length; i++) {
      diff = Math.max(diff, Math.abs(a.logits![i] - b.logits![i]));
      scale = Math.max(scale, Math.abs(b.logits![i]));
    }
    expect(diff / scale).toBeLessThan(1e-5);
    await m.dispose();
  });
}
