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
import { InvalidInputError, loadModel, Model, TokenOutOfRangeError } from "../../lib";
import { DecodeScheduler } from "../../lib/scheduler";
import { Alone, alone, chunk, eachAlone, engineOf, feedBesideStream, kvBits, mixedLengthPrompts, nativeOf, prompt, promptRows } from "../helpers/shared-steps";
import { appendBesideRefusedChunk, expectAppendedTogetherAsAlone, expectBadTokenFailsAlone, expectCancelledPromptUndone, expectChunkShared, expectDisposeStopsPrompts, expectEveryModeMixes, expectGeneratedTogetherAsAlone } from "../helpers/shared-step-checks";

process.env.LCKV_QUIET = "1";

const FIXTURES = path.join(__dirname, "..", "fixtures");

const GREEDY_NATIVE = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };

describe.each(["llama-gqa-hd32", "llama-mha-hd16", "gpt2", "lckv-cla"])("%s (no cyclic group)", (name) => {
  let m: Model;
  let refs: Alone[];
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, name), { device: "cpu", threads: 1, prefixCache: 0 });
    expect(m.config.plan.cyclicGroup).toBeNull();
    refs = await eachAlone(m, mixedLengthPrompts(m));
  });
  afterAll(() => m.dispose());

  test("concurrent prompts in mixed steps equal each prompt prefilled alone, bit for bit", async () => {
    const ps = mixedLengthPrompts(m);
    expect(ps[3].length - 1).toBeGreaterThan(chunk(m));
    await expectAppendedTogetherAsAlone(m, ps, refs);
  });

  test("generate() of concurrent prompts gives what each gives alone", async () => {
    await expectGeneratedTogetherAsAlone(m, mixedLengthPrompts(m), refs);
  });

  test("every prefill mode mixes: without a cyclic group each is one exact pass", async () => {
    await expectEveryModeMixes(m, mixedLengthPrompts(m)[3], refs[3].kv);
  });
});

describe("llama-gqa-hd32: fairness, cancellation, errors", () => {
  let m: Model;
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, "llama-gqa-hd32"), { device: "cpu", threads: 1, prefixCache: 0 });
  });
  afterAll(() => m.dispose());

  test("a running stream gets a token in every step that carries a chunk", async () => {
    const p = mixedLengthPrompts(m)[3];
    const run = p.length - 1;
    const { during, carried } = await feedBesideStream(m, () => m.createSequence().append(p));
    // One step between two tokens of the stream: each step carried its row.
    for (const g of during) expect(g.steps).toBe(1);
    // The prompt went in whole chunks, one per step, each beside the stream's row.
    expect(carried.reduce((a, b) => a + b, 0)).toBe(run);
    expect(carried).toEqual([...new Array<number>(Math.floor(run / chunk(m))).fill(chunk(m)), run % chunk(m)].filter((n) => n > 0));
  });

  test("prompts arriving together share the chunk: a step carries at most one chunk of prompt tokens", async () => {
    const ps = mixedLengthPrompts(m);
    const fed = await feedBesideStream(m, () => Promise.all(ps.map((p) => m.createSequence().append(p))));
    expectChunkShared(m, fed, promptRows(ps), ps.length);
  });

  test("while only prompts are in flight a step takes the lone budget of rows; with another request in flight, one chunk", async () => {
    // Three prompts of 20 tokens fed to schedulers of chunk 8 and lone budget 32, as the GPU's
    // 512 and 4096 (the CPU's engine uses 64 for both). Counted requests in flight: the three
    // prompts alone (nothing waits for a token), or one more (a stream that may queue a row).
    const ps = [0, 1, 2].map((seed) => prompt(m, 20, seed + 5));
    const run = async (others: number) => {
      let prompts = ps.length;  // requests in flight end with their prompts, as working() counts them
      const scheduler = new DecodeScheduler(() => m.nativeModel(), 256, 8, 0, 32, () => prompts + others);
      const seqs = ps.map(() => m.createSequence());
      await Promise.all(seqs.map((s, i) => scheduler.append(nativeOf(s), ps[i], undefined, true).then(() => prompts--)));
      const kv = seqs.map((s) => kvBits(m, s, 20));
      for (const s of seqs) s.dispose();
      return { steps: scheduler.stats.steps, rows: scheduler.stats.promptTokens, kv };
    };
    const onlyPrompts = await run(0);
    const beside = await run(1);
    expect([onlyPrompts.rows, beside.rows]).toEqual([60, 60]);
    // 60 rows in steps of at most 32: 2 steps (20 + 12, then 8 + 20); of at most 8: 8 steps.
    expect(onlyPrompts.steps).toBe(2);
    expect(beside.steps).toBe(8);
    // A row's arithmetic on the CPU does not depend on its step's other rows.
    expect(onlyPrompts.kv).toEqual(beside.kv);
  });

  test("cancelling a prompt mid-way leaves its sequence as it was; appended again it is exact", async () => {
    const head = [1, 5, 9];
    const p = mixedLengthPrompts(m)[3];
    await expectCancelledPromptUndone(m, head, p, chunk(m), await alone(m, p, head));
  });

  test("a bad token id fails its own request with a typed error; the others are unharmed", async () => {
    const ps = mixedLengthPrompts(m).slice(2);
    await expectBadTokenFailsAlone(m, ps, await eachAlone(m, ps));
  });

  test("a chunk the engine refuses fails only its own prompt, whole; the step's other rows go on", async () => {
    const ps = mixedLengthPrompts(m).slice(2);
    const refs = await eachAlone(m, ps);
    const seqs = await appendBesideRefusedChunk(m, ps);
    seqs.forEach((s, i) => expect(kvBits(m, s, s.length - 1)).toEqual(refs[i].kv));
    for (const s of seqs) s.dispose();
    expect(m.auditCache()).toBe("");
  });

  test("disposing the model stops prompts in mixed steps with DisposedError", async () => {
    const m2 = await loadModel(path.join(FIXTURES, "llama-gqa-hd32"), { device: "cpu", threads: 1, prefixCache: 0 });
    // Long prompts: each takes several steps, so both are mid-way when the model goes.
    await expectDisposeStopsPrompts(m2, mixedLengthPrompts(m2).slice(2), 1);
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
