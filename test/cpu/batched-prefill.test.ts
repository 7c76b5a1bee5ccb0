/**
 * Batched token steps (throughput mode): while other requests are in flight, an LCKV prompt
 * whose layers read K/V from above goes into its sequence one token per step, as rows of the
 * shared decode step. On the CPU that is the sequential prefill's arithmetic: the K/V, and the
 * greedy continuation with its log-probabilities, equal each prompt prefilled alone with
 * prefill "sequential", bit for bit. Also: a running stream gets a token every step while
 * prompts arrive, a cancelled prompt leaves its sequence as it was, and a bad token fails only
 * its own request. (Models without a cyclic group mix whole chunks into the steps instead:
 * mixed-prefill.test.ts.)
 */
import * as path from "node:path";
import { AbortError, DisposedError, KV_PAGE_TOKENS, loadModel, Model, TokenOutOfRangeError } from "../../lib";
import { abortedAfter, alone, continuation, engineOf, GREEDY, kvBits, nativeOf, prompt, promptTokens, runningStream } from "../helpers/shared-steps";

process.env.LCKV_QUIET = "1";

const FIXTURES = path.join(__dirname, "..", "fixtures");
const SEQUENTIAL = { prefill: "sequential" } as const;

/** Prompts of different lengths, the longest spanning more than one prefill chunk where the context allows. */
function prompts(m: Model): number[][] {
  const L = m.maxContext;
  return [4, 19, Math.floor(L * 0.55), L - 12].map((n, i) => prompt(m, n, i + 1));
}

describe.each(["lckv-w2", "lckv-sandwich", "lckv-sliding", "gpt2-lckv"])("%s", (name) => {
  let m: Model;
  let refs: Awaited<ReturnType<typeof alone>>[];
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, name), { device: "cpu", threads: 1, prefixCache: 0 });
    expect(m.config.plan.cyclicGroup).not.toBeNull();
    const before = promptTokens(m);
    refs = [];
    for (const p of prompts(m)) refs.push(await alone(m, p, [], SEQUENTIAL));
    // Alone, nothing else in flight: the native sequential prefill ran, no batched step.
    expect(promptTokens(m)).toBe(before);
  });
  afterAll(() => m.dispose());

  test("concurrent prompts as batched token steps equal each prompt prefilled alone, bit for bit", async () => {
    const ps = prompts(m);
    const stream = await runningStream(m);
    const before = promptTokens(m);
    const seqs = ps.map(() => m.createSequence());
    await Promise.all(seqs.map((s, i) => s.append(ps[i])));
    // Every prompt token but each prompt's last (which generate() decodes) went in as a batched row.
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

  test("generate() of concurrent prompts (the default mode) gives what each gives alone with prefill sequential", async () => {
    const ps = prompts(m);
    const before = promptTokens(m);
    const together = await Promise.all(ps.map((p) => m.generate(p, GREEDY)));
    expect(promptTokens(m)).toBeGreaterThan(before);
    together.forEach((g, i) => {
      expect(g.tokens).toEqual(refs[i].tokens);
      expect(g.logprobs).toEqual(refs[i].logprobs);
    });
  });

  test('prefill "sequential" asked for goes as batched steps; "fixed-point" and "iterative" run as asked', async () => {
    const p = prompts(m)[2];
    const stream = await runningStream(m);
    try {
      for (const [mode, batched] of [["sequential", true], ["fixed-point", false], ["iterative", false]] as const) {
        const s = m.createSequence();
        const before = promptTokens(m);
        await s.append(p, { prefill: mode, prefillPasses: 2 });
        expect(promptTokens(m) - before).toBe(batched ? p.length - 1 : 0);
        if (mode === "sequential") expect(kvBits(m, s, s.length - 1)).toEqual(refs[2].kv);
        s.dispose();
      }
    } finally {
      await stream.stop();
    }
  });
});

test("a request waiting for K/V pages is not in flight: the prompt it waits behind prefills alone, then so does its own", async () => {
  const dir = path.join(FIXTURES, "lckv-w2");
  const probe = await loadModel(dir, { device: "cpu" });
  const pageBytes = probe.kvBytesPerToken * KV_PAGE_TOKENS;
  await probe.dispose();
  // Four pages: each request's 40 prompt tokens and 20 new ones take all of them.
  const m = await loadModel(dir, { device: "cpu", threads: 1, prefixCache: 0, kvCacheMemory: 4 * pageBytes });
  try {
    const opts = { ...GREEDY, maxNewTokens: 20 };
    const a = m.generate(prompt(m, 40, 1), opts);
    const b = m.generate(prompt(m, 40, 2), opts);
    // One turn: a's prompt has not picked its way yet (its prefill yields a turn first), and b
    // waits for a's pages.
    await new Promise((r) => setImmediate(r));
    expect(m.admission.queued).toBe(1);
    const [ra, rb] = await Promise.all([a, b]);
    expect([ra.tokens.length, rb.tokens.length]).toEqual([20, 20]);
    // Counted as in flight, b would have sent a's prompt into batched token steps.
    expect(promptTokens(m)).toBe(0);
  } finally {
    await m.dispose();
  }
});

describe("lckv-w2: fairness, cancellation, errors", () => {
  let m: Model;
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, "lckv-w2"), { device: "cpu", threads: 1, prefixCache: 0 });
  });
  afterAll(() => m.dispose());

  test("a running stream gets a token every step while prompts arrive", async () => {
    const ps = prompts(m);
    const stream = await runningStream(m);
    const tokensBefore = stream.gaps.length;
    await Promise.all(ps.map((p) => m.createSequence().append(p)));
    const during = stream.gaps.slice(tokensBefore);
    await stream.stop();
    // The prompts took as many steps as the longest has tokens, and in each the stream got its
    // token: between two of its tokens at most one token of each prompt went in.
    expect(during.length).toBeGreaterThanOrEqual(ps[3].length - 2);
    expect(Math.max(...during.map((g) => g.prompt))).toBeLessThanOrEqual(ps.length);
  });

  test("cancelling a prompt mid-way leaves its sequence as it was; appended again it is exact", async () => {
    const head = [1, 5, 9];
    const p = prompts(m)[3];
    const ref = await alone(m, p, head, SEQUENTIAL);
    const stream = await runningStream(m);
    try {
      const s = m.createSequence();
      await s.append(head);
      const before = promptTokens(m);
      const e = await abortedAfter(m, 10, (signal) => s.append(p, { signal })).catch((x) => x);
      expect(e).toBeInstanceOf(AbortError);
      // Some of its tokens had gone in as batched rows, and were taken out again.
      expect(promptTokens(m) - before).toBeGreaterThanOrEqual(10);
      expect(promptTokens(m) - before).toBeLessThan(p.length - 1);
      expect(s.tokens).toEqual(head);
      expect(nativeOf(s).length).toBe(head.length - 1);
      expect(m.auditCache()).toBe("");
      await s.append(p);
      expect(kvBits(m, s, s.length - 1)).toEqual(ref.kv);
      expect((await continuation(s)).tokens).toEqual(ref.tokens);
      s.dispose();

      // The same through generate(): the request ends with finishReason "abort".
      const r = await abortedAfter(m, 10, (signal) => m.generate(p, { ...GREEDY, signal }));
      expect(r.finishReason).toBe("abort");
      expect(r.tokens).toEqual([]);
    } finally {
      await stream.stop();
    }
    expect(m.cacheStats().pagesReserved).toBe(0);
    expect(m.auditCache()).toBe("");
  });

  test("a bad token id fails its own request with a typed error; the others are unharmed", async () => {
    const ps = prompts(m).slice(1, 3);
    const refs: Awaited<ReturnType<typeof alone>>[] = [];
    for (const p of ps) refs.push(await alone(m, p, [], SEQUENTIAL));
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

  test("a row the engine refuses mid-prompt fails only its own prompt; the batch's other rows go on", async () => {
    // Tokens are checked before any work, so a bad one reaches the engine only past those
    // checks: this feeds the scheduler directly, as a prefill does.
    const ps = prompts(m).slice(1, 3);
    const refs: Awaited<ReturnType<typeof alone>>[] = [];
    for (const p of ps) refs.push(await alone(m, p, [], SEQUENTIAL));
    const bad = m.createSequence();
    const seqs = ps.map(() => m.createSequence());
    const scheduler = engineOf(m).scheduler;
    const [e] = await Promise.all([
      scheduler.append(nativeOf(bad), [5, 6, m.config.vocabSize + 3, 7]).catch((x) => x),
      ...seqs.map((s, i) => s.append(ps[i], { prefill: "sequential" })),
    ]);
    expect(e).toBeInstanceOf(TokenOutOfRangeError);
    // The rows before it went in; the batch with the bad row changed nothing.
    expect(nativeOf(bad).length).toBe(2);
    seqs.forEach((s, i) => expect(kvBits(m, s, s.length - 1)).toEqual(refs[i].kv));
    for (const s of [bad, ...seqs]) s.dispose();
    expect(m.auditCache()).toBe("");
  });

  test("disposing the model stops prompts fed as batched steps with DisposedError", async () => {
    const m2 = await loadModel(path.join(FIXTURES, "lckv-w2"), { device: "cpu", threads: 1, prefixCache: 0 });
    const stream = await runningStream(m2);
    const appends = prompts(m2).map((p) => m2.createSequence().append(p).catch((x) => x));
    while (promptTokens(m2) < 8) await new Promise((r) => setImmediate(r));
    await m2.dispose();
    for (const e of await Promise.all(appends)) expect(e).toBeInstanceOf(DisposedError);
    // The running stream ends with the model too.
    await stream.stop().catch(() => undefined);
  });
});
