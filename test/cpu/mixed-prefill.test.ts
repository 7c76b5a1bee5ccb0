/**
 * Mixed steps (chunked prefill): while other requests are in flight, a prompt of a model without
 * a cyclic layer group goes into the scheduler's shared steps as chunks of rows beside the decode
 * rows, so each step reads the weights once for both. On the CPU a row's arithmetic does not
 * depend on the other rows of its step, so the K/V and the greedy continuation with its
 * log-probabilities equal the prompt prefilled alone, bit for bit. Also: a running stream gets
 * a token in every step while prompts go in, at most one chunk of prompt tokens per step however
 * many prompts arrive, a cancelled prompt leaves its sequence as it was, bad token ids fail only
 * their own request, and the engine refuses several rows of one sequence where they would not be
 * exact.
 */
import * as path from "node:path";
import { AbortError, DisposedError, InvalidInputError, loadModel, Model, TokenOutOfRangeError } from "../../lib";
import {
  abortedAfter,
  alone,
  chunk,
  continuation,
  engineOf,
  GREEDY,
  kvBits,
  nativeOf,
  nextToken,
  prompt,
  promptTokens,
  runningStream,
  until,
} from "../helpers/shared-steps";

process.env.LCKV_QUIET = "1";

const FIXTURES = path.join(__dirname, "..", "fixtures");

/** Prompts of different lengths, the longest two spanning more than one chunk. */
function prompts(m: Model): number[][] {
  const L = m.maxContext;
  return [4, 19, Math.floor(L * 0.55), L - 12].map((n, i) => prompt(m, n, i + 1));
}

const GREEDY_NATIVE = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };

describe.each(["llama-gqa-hd32", "llama-mha-hd16", "gpt2", "lckv-cla"])("%s (no cyclic group)", (name) => {
  let m: Model;
  let refs: Awaited<ReturnType<typeof alone>>[];
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, name), { device: "cpu", threads: 1, prefixCache: 0 });
    expect(m.config.plan.cyclicGroup).toBeNull();
    const before = m.schedulerStats();
    refs = [];
    for (const p of prompts(m)) refs.push(await alone(m, p));
    // Alone, nothing else in flight: native prefill calls, no prompt row in a shared step.
    expect(promptTokens(m)).toBe(before.promptTokens);
  });
  afterAll(() => m.dispose());

  test("concurrent prompts in mixed steps equal each prompt prefilled alone, bit for bit", async () => {
    const ps = prompts(m);
    expect(ps[3].length - 1).toBeGreaterThan(chunk(m));
    const stream = await runningStream(m);
    const before = promptTokens(m);
    const seqs = ps.map(() => m.createSequence());
    await Promise.all(seqs.map((s, i) => s.append(ps[i])));
    // Every prompt token but each prompt's last (which generate() decodes) went in as a row.
    expect(promptTokens(m) - before).toBe(ps.reduce((a, p) => a + p.length - 1, 0));
    await stream.stop();
    seqs.forEach((s, i) => expect(kvBits(m, s, s.length - 1)).toEqual(refs[i].kv));
    for (const s of seqs) expect(s.exact).toBe(true);
    const gens = await Promise.all(seqs.map((s) => continuation(s)));
    gens.forEach((g, i) => {
      expect(g.tokens).toEqual(refs[i].tokens);
      expect(g.logprobs).toEqual(refs[i].logprobs);
    });
    for (const s of seqs) s.dispose();
    expect(m.auditCache()).toBe("");
  });

  test("generate() of concurrent prompts gives what each gives alone", async () => {
    const ps = prompts(m);
    const before = promptTokens(m);
    const together = await Promise.all(ps.map((p) => m.generate(p, GREEDY)));
    expect(promptTokens(m)).toBeGreaterThan(before);
    together.forEach((g, i) => {
      expect(g.tokens).toEqual(refs[i].tokens);
      expect(g.logprobs).toEqual(refs[i].logprobs);
    });
  });

  test("every prefill mode mixes: without a cyclic group each is one exact pass", async () => {
    const p = prompts(m)[3];
    const stream = await runningStream(m);
    try {
      for (const mode of ["sequential", "fixed-point", "iterative"] as const) {
        const s = m.createSequence();
        const before = promptTokens(m);
        await s.append(p, { prefill: mode });
        expect(promptTokens(m) - before).toBe(p.length - 1);
        expect(kvBits(m, s, s.length - 1)).toEqual(refs[3].kv);
        s.dispose();
      }
    } finally {
      await stream.stop();
    }
  });
});

describe("llama-gqa-hd32: fairness, cancellation, errors", () => {
  let m: Model;
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, "llama-gqa-hd32"), { device: "cpu", threads: 1, prefixCache: 0 });
  });
  afterAll(() => m.dispose());

  test("a running stream gets a token in every step that carries a chunk", async () => {
    const p = prompts(m)[3];
    const run = p.length - 1;
    const stream = await runningStream(m);
    const from = stream.gaps.length;
    await m.createSequence().append(p);
    await nextToken(stream);
    const during = stream.gaps.slice(from);
    await stream.stop();
    // One step between two tokens of the stream: each step carried its row.
    for (const g of during) expect(g.steps).toBe(1);
    // The prompt went in whole chunks, one per step, each beside the stream's row.
    const carried = during.filter((g) => g.prompt > 0).map((g) => g.prompt);
    expect(carried.reduce((a, b) => a + b, 0)).toBe(run);
    expect(carried).toEqual([...new Array<number>(Math.floor(run / chunk(m))).fill(chunk(m)), run % chunk(m)].filter((n) => n > 0));
  });

  test("prompts arriving together share the chunk: a step carries at most one chunk of prompt tokens", async () => {
    const ps = prompts(m);
    const total = ps.reduce((a, p) => a + p.length - 1, 0);
    const stream = await runningStream(m);
    const from = stream.gaps.length;
    const before = promptTokens(m);
    await Promise.all(ps.map((p) => m.createSequence().append(p)));
    expect(promptTokens(m) - before).toBe(total);
    await nextToken(stream);
    const during = stream.gaps.slice(from);
    await stream.stop();
    for (const g of during) expect(g.steps).toBe(1);
    for (const g of during) expect(g.prompt).toBeLessThanOrEqual(chunk(m));
    // The prompts filled the steps: as few as the chunk allows.
    expect(during.filter((g) => g.prompt > 0).length).toBe(Math.ceil(total / chunk(m)));
  });

  test("cancelling a prompt mid-way leaves its sequence as it was; appended again it is exact", async () => {
    const head = [1, 5, 9];
    const p = prompts(m)[3];
    const ref = await alone(m, p, head);
    const stream = await runningStream(m);
    try {
      const s = m.createSequence();
      await s.append(head);
      const before = promptTokens(m);
      const e = await abortedAfter(m, chunk(m), (signal) => s.append(p, { signal })).catch((x) => x);
      expect(e).toBeInstanceOf(AbortError);
      // Some of its chunks had gone in as rows of mixed steps, and were taken out again.
      expect(promptTokens(m) - before).toBeGreaterThanOrEqual(chunk(m));
      expect(promptTokens(m) - before).toBeLessThan(p.length - 1);
      expect(s.tokens).toEqual(head);
      expect(nativeOf(s).length).toBe(head.length - 1);
      expect(m.auditCache()).toBe("");
      await s.append(p);
      expect(kvBits(m, s, s.length - 1)).toEqual(ref.kv);
      expect((await continuation(s)).tokens).toEqual(ref.tokens);
      s.dispose();

      // The same through generate(): the request ends with finishReason "abort".
      const r = await abortedAfter(m, chunk(m), (signal) => m.generate(p, { ...GREEDY, signal }));
      expect(r.finishReason).toBe("abort");
      expect(r.tokens).toEqual([]);
    } finally {
      await stream.stop();
    }
    expect(m.cacheStats().pagesReserved).toBe(0);
    expect(m.auditCache()).toBe("");
  });

  test("a bad token id fails its own request with a typed error; the others are unharmed", async () => {
    const ps = prompts(m).slice(2);
    const refs: Awaited<ReturnType<typeof alone>>[] = [];
    for (const p of ps) refs.push(await alone(m, p));
    const stream = await runningStream(m);
    try {
      const bad = m.generate([3, 4, m.config.vocabSize + 5], GREEDY).catch((x) => x);
      const good = ps.map((p) => m.generate(p, GREEDY));
      const e = await bad;
      expect(e).toBeInstanceOf(TokenOutOfRangeError);
      expect(e.message).toMatch(/token 2 is .*outside the vocabulary/);
      const gs = await Promise.all(good);
      gs.forEach((g, i) => expect(g.tokens).toEqual(refs[i].tokens));
    } finally {
      await stream.stop();
    }
  });

  test("a chunk the engine refuses fails only its own prompt, whole; the step's other rows go on", async () => {
    // Tokens are checked before any work, so a bad one reaches the engine only past those
    // checks: this feeds the scheduler directly, as a prefill does.
    const ps = prompts(m).slice(2);
    const refs: Awaited<ReturnType<typeof alone>>[] = [];
    for (const p of ps) refs.push(await alone(m, p));
    const bad = m.createSequence();
    const seqs = ps.map(() => m.createSequence());
    const stream = await runningStream(m);
    try {
      const [e] = await Promise.all([
        engineOf(m).scheduler.append(nativeOf(bad), [5, 6, m.config.vocabSize + 3, 7], undefined, true).catch((x) => x),
        ...seqs.map((s, i) => s.append(ps[i])),
      ]);
      expect(e).toBeInstanceOf(TokenOutOfRangeError);
      // Its chunk was one step's rows: none of it went in.
      expect(nativeOf(bad).length).toBe(0);
      seqs.forEach((s, i) => expect(kvBits(m, s, s.length - 1)).toEqual(refs[i].kv));
    } finally {
      await stream.stop();
    }
    for (const s of [bad, ...seqs]) s.dispose();
    expect(m.auditCache()).toBe("");
  });

  test("disposing the model stops prompts in mixed steps with DisposedError", async () => {
    const m2 = await loadModel(path.join(FIXTURES, "llama-gqa-hd32"), { device: "cpu", threads: 1, prefixCache: 0 });
    const stream = await runningStream(m2);
    // Long prompts: each takes several steps, so both are mid-way when the model goes.
    const appends = prompts(m2).slice(2).map((p) => m2.createSequence().append(p).catch((x) => x));
    await until(() => promptTokens(m2) > 0, "the first chunk");
    await m2.dispose();
    for (const e of await Promise.all(appends)) expect(e).toBeInstanceOf(DisposedError);
    // The running stream ends with the model too.
    await stream.stop().catch(() => undefined);
  });
});

describe("decodeBatch rows per sequence", () => {
  test("a chunk's rows in one step give the K/V of the same tokens appended alone", async () => {
    const m = await loadModel(path.join(FIXTURES, "llama-mha-hd16"), { device: "cpu", threads: 1, prefixCache: 0 });
    try {
      const nm = m.nativeModel();
      const p = prompt(m, 40, 3);
      const ref = nm.createSequence(m.maxContext);
      await ref.append(Int32Array.from(p), { mode: "sequential", logits: "none" });
      const a = nm.createSequence(m.maxContext);
      const b = nm.createSequence(m.maxContext);
      await a.append(Int32Array.of(1, 2, 3), { mode: "sequential", logits: "none" });
      // a's decode row (sampled), then b's prompt in two chunks of two steps.
      const first = await nm.decodeBatch([a, b], Int32Array.from([4, ...p.slice(0, 25)]), [GREEDY_NATIVE], true, Int32Array.of(1, 25));
      expect(first.length).toBe(1);
      await nm.decodeBatch([a, b], Int32Array.from([first[0], ...p.slice(25)]), [GREEDY_NATIVE], true, Int32Array.of(1, 15));
      expect(b.length).toBe(40);
      expect(a.length).toBe(5);
      for (let slot = 0; slot < m.config.plan.kvLayers.length; slot++) {
        expect(Array.from(new Uint32Array(b.readKv(slot, 0, 40).buffer))).toEqual(Array.from(new Uint32Array(ref.readKv(slot, 0, 40).buffer)));
      }
      for (const s of [ref, a, b]) s.dispose();
    } finally {
      await m.dispose();
    }
  });

  test("bad row counts, a sampled chunk, and a chunk of a cyclic-group model are refused, changing nothing", async () => {
    const std = await loadModel(path.join(FIXTURES, "llama-mha-hd16"), { device: "cpu", threads: 1, prefixCache: 0 });
    const lckv = await loadModel(path.join(FIXTURES, "lckv-w2"), { device: "cpu", threads: 1, prefixCache: 0 });
    try {
      const nm = std.nativeModel();
      const a = nm.createSequence(std.maxContext);
      const b = nm.createSequence(std.maxContext);
      const refused = async (call: () => Promise<unknown>, why: RegExp) => {
        let e: unknown;
        try {
          await call();
        } catch (x) {
          e = x;
        }
        expect((e as Error)?.message).toMatch(why);
        expect([a.length, b.length]).toEqual([0, 0]);
      };
      await refused(() => nm.decodeBatch([a, b], Int32Array.of(1, 2, 3), [], true, Int32Array.of(1, 1)), /one token per row/);
      await refused(() => nm.decodeBatch([a, b], Int32Array.of(1, 2, 3), [], true, Int32Array.of(3)), /one row count per sequence/);
      await refused(() => nm.decodeBatch([a, b], Int32Array.of(1, 2), [], true, Int32Array.of(2, 0)), /at least one row/);
      await refused(() => nm.decodeBatch([a, b], Int32Array.of(1, 2, 3), [GREEDY_NATIVE], true, Int32Array.of(2, 1)), /sampled sequence has one row/);
      await refused(() => nm.decodeBatch([a], Int32Array.of(1, 2), [], true, [2] as unknown as Int32Array), /rows must be an Int32Array/);
      await refused(() => nm.decodeBatch([a], Int32Array.of(1, std.config.vocabSize), [], true, Int32Array.of(2)), /outside the vocabulary/);
      const overflow = nm.decodeBatch([a], new Int32Array(std.maxContext + 1).fill(1), [], true, Int32Array.of(std.maxContext + 1)).catch((x) => x);
      expect((await overflow).code).toBe("LCKV_CONTEXT_OVERFLOW");
      for (const s of [a, b]) s.dispose();

      const c = lckv.nativeModel().createSequence(lckv.maxContext);
      const e = await lckv.nativeModel().decodeBatch([c], Int32Array.of(1, 2), [], true, Int32Array.of(2)).catch((x) => x);
      expect(e.message).toMatch(/without a cyclic layer group/);
      expect(c.length).toBe(0);
      c.dispose();
      expect(std.auditCache()).toBe("");
      expect(lckv.auditCache()).toBe("");
    } finally {
      await std.dispose();
      await lckv.dispose();
    }
  });

  test("engine errors reach JavaScript as typed errors", async () => {
    const m = await loadModel(path.join(FIXTURES, "llama-mha-hd16"), { device: "cpu", threads: 1, prefixCache: 0 });
    try {
      const s = m.createSequence();
      const e = await engineOf(m).scheduler.append(nativeOf(s), [1, 2, m.config.vocabSize], undefined, true).catch((x) => x);
      expect(e).toBeInstanceOf(TokenOutOfRangeError);
      expect(e).toBeInstanceOf(InvalidInputError);
      expect(nativeOf(s).length).toBe(0);
      s.dispose();
    } finally {
      await m.dispose();
    }
  });
});
