/**
 * GenerationStream: `result` in every way a stream can end (to the end, an early return or
 * break, an error), timings, Sequence.generate()'s stream, and streamMany() (n completions of one
 * prefill).
 */
import { GenerateResult, GenerationStream, InvalidOptionError, loadModel, Model, StreamChunk } from "../../lib";
import { forkSeed } from "../../lib/model";
import { writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";

const prompt = [3, 14, 15, 9, 26, 5, 35, 40, 41, 7];
let model: Model;

beforeAll(async () => {
  // No prefix cache: each request prefills its whole prompt, so prefill counts compare.
  model = await loadModel(writeTinyModel({ seed: 5, vocab: 64, maxPositions: 128 }), { device: "cpu", prefixCache: 0 });
});
afterAll(() => model.dispose());

/** A tiny model whose K/V pool holds `pages` pages, with no prefix cache. */
async function modelWithPages(pages: number): Promise<Model> {
  const dir = writeTinyModel({ seed: 5, vocab: 64, maxPositions: 128 });
  const probe = await loadModel(dir, { device: "cpu", prefixCache: 0 });
  const pageBytes = probe.cacheStats().pageBytes;
  await probe.dispose();
  return loadModel(dir, { device: "cpu", prefixCache: 0, kvCacheMemory: pages * pageBytes });
}

async function drain(s: GenerationStream): Promise<{ chunks: StreamChunk[]; result: GenerateResult }> {
  const chunks: StreamChunk[] = [];
  for await (const c of s) chunks.push(c);
  return { chunks, result: await s.result };
}

describe("stream().result", () => {
  test("iterated to the end: the generator's return value", async () => {
    const s = model.stream(prompt, { maxNewTokens: 7 });
    const chunks: StreamChunk[] = [];
    let ret: IteratorResult<StreamChunk, GenerateResult>;
    while (!(ret = await s.next()).done) chunks.push(ret.value);
    const r = await s.result;
    expect(r).toBe(ret.value);
    expect(r.finishReason).toBe("length");
    expect(r.tokens).toEqual(chunks.map((c) => c.token));
    expect(r.usage).toEqual({ promptTokens: prompt.length, completionTokens: 7 });
    expect(r).toMatchObject(await model.generate(prompt, { maxNewTokens: 7 }).then(({ timings: _, ...rest }) => rest));
  });

  test("ended by break: finishReason abort with the tokens so far, and the sequence is freed", async () => {
    const live = model.cacheStats().liveSequences;
    const s = model.stream(prompt, { maxNewTokens: 20 });
    const got: StreamChunk[] = [];
    for await (const c of s) {
      got.push(c);
      if (got.length === 3) break;
    }
    const r = await s.result;
    expect(r.finishReason).toBe("abort");
    expect(r.tokens).toEqual(got.map((c) => c.token));
    expect(r.text).toBe(got.map((c) => c.text).join(""));
    expect(r.usage).toEqual({ promptTokens: prompt.length, completionTokens: 3 });
    expect(r.timings.totalMs).toBeGreaterThanOrEqual(r.timings.timeToFirstTokenMs);
    expect(model.cacheStats().liveSequences).toBe(live);
    expect(model.auditCache()).toBe("");
  });

  test("return() resolves with the abort result; before the first next() nothing runs", async () => {
    const s = model.stream(prompt, { maxNewTokens: 20 });
    await s.next();
    const ret = await s.return();
    expect(ret.done).toBe(true);
    expect(ret.value).toBe(await s.result);
    expect(ret.value.finishReason).toBe("abort");
    expect(ret.value.tokens).toHaveLength(1);
    // Once ended, the stream stays ended with the same result.
    expect(await s.next()).toEqual({ done: true, value: undefined });

    const before = model.cacheStats().prefilledTokens;
    const never = model.stream(prompt, { maxNewTokens: 20 });
    await never.return();
    expect(await never.result).toMatchObject({ finishReason: "abort", tokens: [], usage: { completionTokens: 0 } });
    expect(model.cacheStats().prefilledTokens).toBe(before);
  });

  test("an error rejects the result with it, and an unobserved rejection is not reported", async () => {
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown) => unhandled.push(e);
    process.on("unhandledRejection", onUnhandled);
    try {
      const s = model.stream(prompt, { maxNewTokens: 2, temperature: -1 });
      const seen = await (async () => {
        for await (const _ of s) void _;
      })().catch((e) => e);
      expect(seen).toBeInstanceOf(InvalidOptionError);
      await expect(s.result).rejects.toBe(seen);
      // A stream whose result nobody reads.
      const t = model.stream(prompt, { maxNewTokens: 2, topP: 0 });
      await expect(t.next()).rejects.toThrow(InvalidOptionError);
      await new Promise((r) => setImmediate(r));
      await new Promise((r) => setTimeout(r, 10));
    } finally {
      process.off("unhandledRejection", onUnhandled);
    }
    expect(unhandled).toEqual([]);
  });

  test("awaited before any iteration, the result runs the stream to its end; read alone it starts nothing", async () => {
    const live = model.cacheStats().liveSequences;
    const alone = await model.stream(prompt, { maxNewTokens: 6, ignoreEos: true }).result;
    const { timings: _t, ...expected } = await model.generate(prompt, { maxNewTokens: 6, ignoreEos: true });
    expect(alone).toMatchObject(expected);
    expect(model.cacheStats().liveSequences).toBe(live);

    // Given a then() first, iterated in the same turn: the loop gets every chunk.
    const s = model.stream(prompt, { maxNewTokens: 6, ignoreEos: true });
    const done = s.result.then((r) => r);
    const tokens: (number | null)[] = [];
    for await (const c of s) tokens.push(c.token);
    expect(tokens).toEqual(expected.tokens);
    expect((await done).tokens).toEqual(expected.tokens);

    // Read to await later, iterated after other awaits: reading starts nothing.
    const later = model.stream(prompt, { maxNewTokens: 6, ignoreEos: true });
    const kept = later.result;
    await new Promise((r) => setTimeout(r, 20));
    const laterTokens: (number | null)[] = [];
    for await (const c of later) laterTokens.push(c.token);
    expect(laterTokens).toEqual(expected.tokens);
    expect((await kept).tokens).toEqual(expected.tokens);

    // An awaited result runs the stream and keeps its chunks: a later loop gets every one.
    const t = model.stream(prompt, { maxNewTokens: 6, ignoreEos: true });
    const result = t.result.then((r) => r);
    await new Promise((r) => setTimeout(r, 20));
    const replayed: (number | null)[] = [];
    for await (const c of t) replayed.push(c.token);
    expect(replayed).toEqual(expected.tokens);
    expect((await result).tokens).toEqual(expected.tokens);
    expect(t.result).toBeInstanceOf(Promise);
    expect(model.cacheStats().liveSequences).toBe(live);
    expect(model.auditCache()).toBe("");

    // A failure rejects the result.
    await expect(model.stream(prompt, { maxNewTokens: 2, topP: 0 }).result).rejects.toThrow(InvalidOptionError);
  });

  test("return() ends a step in flight: a stream its awaited result runs, waiting for pages", async () => {
    const small = await modelWithPages(8);
    try {
      // a reserves 7 of the 8 pages; b needs 4 and waits for them (no queue timeout).
      const a = small.stream(prompt, { maxNewTokens: 100, ignoreEos: true });
      await a.next();
      const b = small.stream(prompt, { maxNewTokens: 40, ignoreEos: true });
      const bResult = b.result.then((r) => r);
      await new Promise((r) => setTimeout(r, 50));
      expect(small.cacheStats().queued).toBe(1);
      const ended = await b.return();
      expect(ended.value).toMatchObject({ finishReason: "abort", tokens: [] });
      expect(await bResult).toBe(ended.value);
      expect(small.cacheStats().queued).toBe(0);
      // a is untouched and goes on.
      expect((await a.next()).done).toBe(false);
      await a.return();
      expect(small.cacheStats().liveSequences).toBe(0);
      expect(small.auditCache()).toBe("");
    } finally {
      await small.dispose();
    }
  });

  test("an aborted signal ends the stream with finishReason abort", async () => {
    const ac = new AbortController();
    const s = model.stream(prompt, { maxNewTokens: 30, signal: ac.signal });
    let n = 0;
    for await (const _ of s) if (++n === 2) ac.abort();
    const r = await s.result;
    expect(r.finishReason).toBe("abort");
    expect(r.tokens).toHaveLength(2);
  });

  test("Sequence.generate() is a GenerationStream too", async () => {
    using seq = model.createSequence();
    await seq.append(prompt);
    const { chunks, result } = await drain(seq.generate({ maxNewTokens: 5 }));
    expect(result.tokens).toEqual(chunks.map((c) => c.token));
    expect(result.tokens).toEqual((await model.generate(prompt, { maxNewTokens: 5 })).tokens);
    const s = seq.generate({ maxNewTokens: 5 });
    await s.next();
    await s.return();
    expect((await s.result).finishReason).toBe("abort");
    // The sequence is free again and holds the token generated before the break.
    expect(seq.length).toBe(prompt.length + 5 + 1);
  });
});

describe("timings", () => {
  test("present and consistent", async () => {
    const r = await model.generate(prompt, { maxNewTokens: 12, ignoreEos: true });
    const t = r.timings;
    expect(t.timeToFirstTokenMs).toBeGreaterThan(0);
    expect(t.totalMs).toBeGreaterThanOrEqual(t.timeToFirstTokenMs);
    expect(t.tokensPerSecond).toBeGreaterThan(0);
    expect(Number.isFinite(t.tokensPerSecond)).toBe(true);
    // The definition: tokens after the first over the time after the first, to the clock's grain.
    const after = (t.totalMs - t.timeToFirstTokenMs) / 1000;
    expect(Math.abs(t.tokensPerSecond * after - 11)).toBeLessThan(0.5);
  });

  test("fewer than two tokens: 0 tokens per second; none: time to first token is the whole time", async () => {
    const one = await model.generate(prompt, { maxNewTokens: 1 });
    expect(one.timings.tokensPerSecond).toBe(0);
    const none = await model.generate(prompt, { maxNewTokens: 0 });
    expect(none.timings.tokensPerSecond).toBe(0);
    expect(none.timings.timeToFirstTokenMs).toBe(none.timings.totalMs);
  });
});

describe("streamMany", () => {
  test("greedy n = 3: three completions equal to generate(), the prompt prefilled once", async () => {
    const alone = await model.generate(prompt, { maxNewTokens: 9 });
    const p0 = model.cacheStats().prefilledTokens;
    await model.generate(prompt, { maxNewTokens: 9 });
    const once = model.cacheStats().prefilledTokens - p0;
    expect(once).toBe(prompt.length - 1);
    const live = model.cacheStats().liveSequences;

    const p1 = model.cacheStats().prefilledTokens;
    const streams = model.streamMany(prompt, 3, { maxNewTokens: 9 });
    expect(streams).toHaveLength(3);
    const results = await Promise.all(streams.map(async (s) => (await drain(s)).result));
    expect(model.cacheStats().prefilledTokens - p1).toBe(once);
    for (const r of results) {
      expect(r.tokens).toEqual(alone.tokens);
      expect(r.usage).toEqual(alone.usage);
      expect(r.finishReason).toBe(alone.finishReason);
    }
    expect(model.cacheStats().liveSequences).toBe(live);
    expect(model.auditCache()).toBe("");
  });

  test("sampled: completion i is what generate() gives with seed + i", async () => {
    const opts = { maxNewTokens: 10, temperature: 1.5, seed: 100 };
    const streams = model.streamMany(prompt, 4, opts);
    // Consumed one after another: each fork waits for its stream.
    const results: GenerateResult[] = [];
    for (const s of streams) results.push((await drain(s)).result);
    for (const [i, r] of results.entries()) {
      expect(r.tokens).toEqual((await model.generate(prompt, { ...opts, seed: 100 + i })).tokens);
    }
    expect(new Set(results.map((r) => r.tokens.join())).size).toBeGreaterThan(1);
  });

  test("a stream returned before it starts frees its fork; the others go on", async () => {
    const live = model.cacheStats().liveSequences;
    const [a, b, c] = model.streamMany(prompt, 3, { maxNewTokens: 4 });
    await c.return();
    const ra = await drain(a);
    await b.return();
    expect(ra.result.tokens).toHaveLength(4);
    expect((await b.result).finishReason).toBe("abort");
    expect((await c.result).tokens).toEqual([]);
    expect(model.cacheStats().liveSequences).toBe(live);
    expect(model.auditCache()).toBe("");
  });

  test("completion i samples with seed + i, wrapped past 2^53 - 1 to 0: the largest seed works for every completion", async () => {
    const max = Number.MAX_SAFE_INTEGER;
    expect([0, 1, 2].map((i) => forkSeed(max, i))).toEqual([max, 0, 1]);
    expect([0, 1, 2].map((i) => forkSeed(max - 1, i))).toEqual([max - 1, max, 0]);
    expect([0, 1].map((i) => forkSeed(-5, i))).toEqual([-5, -4]);
    const sampled = { maxNewTokens: 8, temperature: 1.5, ignoreEos: true };
    const results = await Promise.all(model.streamMany(prompt, 3, { ...sampled, seed: max }).map((s) => s.result));
    const alone = await Promise.all([max, 0, 1].map((seed) => model.generate(prompt, { ...sampled, seed })));
    expect(results.map((r) => r.tokens)).toEqual(alone.map((r) => r.tokens));
  });

  test("forks whose copies of the shared last page the pool cannot hold beside it are refused at once, not left waiting on each other", async () => {
    const small = await modelWithPages(8); // 128 tokens, the model's context
    try {
      // A 10-token prompt's last token goes at position 9, mid-page: each fork copies that page
      // while its sibling keeps it, so 123 tokens (8 pages) need 9 pages each.
      const refused = await Promise.allSettled(small.streamMany(prompt, 2, { maxNewTokens: 113, ignoreEos: true }).map((s) => s.result));
      for (const r of refused) {
        expect(r.status).toBe("rejected");
        const e = (r as PromiseRejectedResult).reason;
        expect(e.code).toBe("LCKV_REQUEST_TOO_LARGE");
        expect(e.message).toMatch(/each needs 9 pages of 16 tokens for 123 tokens, but the whole K\/V cache has 8/);
      }
      expect(small.cacheStats().queued).toBe(0);
      expect(small.cacheStats().liveSequences).toBe(0);
      expect(small.auditCache()).toBe("");
      // One completion of it fits, and so do two that need 8 pages each: they run in turn.
      expect((await small.generate(prompt, { maxNewTokens: 113, ignoreEos: true })).tokens).toHaveLength(113);
      const fits = await Promise.all(small.streamMany(prompt, 2, { maxNewTokens: 102, ignoreEos: true }).map((s) => s.result));
      expect(fits.map((r) => r.tokens.length)).toEqual([102, 102]);
      // A 17-token prompt's last token starts page 1: no fork copies a page, and the whole
      // context (128 tokens, 8 pages) fits each completion in turn.
      const onBoundary = Array.from({ length: 17 }, (_, i) => (i % 60) + 2);
      const whole = await Promise.all(small.streamMany(onBoundary, 2, { maxNewTokens: 111, ignoreEos: true }).map((s) => s.result));
      expect(whole.map((r) => r.tokens.length)).toEqual([111, 111]);
    } finally {
      await small.dispose();
    }
  });

  test("return() ends a stream's wait for the shared prefill at once, and the prefill's wait for pages once every stream is returned", async () => {
    const small = await modelWithPages(8);
    try {
      const hog = small.createSequence();
      await hog.append(Array.from({ length: 120 }, (_, i) => (i % 60) + 2)); // all 8 pages
      const prefilled = small.cacheStats().prefilledTokens;
      const [x, y, z] = small.streamMany(prompt, 3, { maxNewTokens: 4, ignoreEos: true });
      const xNext = x.next(); // begins the shared prefill, which waits for pages
      const yNext = y.next();
      for (const p of [xNext, yNext]) p.catch(() => {}); // an assertion failing below leaves neither unhandled
      await new Promise((r) => setImmediate(r));
      expect(small.cacheStats().queued).toBe(1);
      const order: string[] = [];
      setImmediate(() => {
        order.push("pages freed");
        hog.dispose();
      });
      // y stops waiting; x and z (not iterated yet) still want the prefill, which waits on.
      const yEnded = await y.return();
      order.push("y returned");
      expect(order).toEqual(["y returned"]); // before the pages came back
      expect(yEnded.value).toMatchObject({ finishReason: "abort", tokens: [] });
      expect((await yNext).done).toBe(true);
      await z.return();
      expect(small.cacheStats().queued).toBe(1);
      // x, the last: the prefill's wait for pages ends too, and nothing is prefilled.
      const xEnded = await x.return();
      order.push("x returned");
      expect(xEnded.value).toMatchObject({ finishReason: "abort", tokens: [] });
      expect(await xNext).toEqual({ done: true, value: xEnded.value });
      expect(small.cacheStats().queued).toBe(0);
      expect(small.cacheStats().prefilledTokens).toBe(prefilled);
      await new Promise((r) => setImmediate(r));
      expect(order).toEqual(["y returned", "x returned", "pages freed"]);
      expect(small.cacheStats().liveSequences).toBe(0);
      expect(small.auditCache()).toBe("");
    } finally {
      await small.dispose();
    }
  });

  test("n and the options are checked; errors reach every stream", async () => {
    for (const n of [0, -1, 1.5, 129, NaN]) {
      const err = (() => {
        try {
          model.streamMany(prompt, n);
        } catch (e) {
          return e;
        }
      })();
      expect(err).toBeInstanceOf(InvalidOptionError);
      expect((err as InvalidOptionError).option).toBe("n");
    }
    const streams = model.streamMany(prompt, 2, { maxNewTokens: 3, logprobs: 99 });
    for (const s of streams) {
      await expect(s.next()).rejects.toThrow(InvalidOptionError);
      await expect(s.result).rejects.toThrow(InvalidOptionError);
    }
  });
});
