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
import { KV_PAGE_TOKENS, loadModel, Model, TokenOutOfRangeError } from "../../lib";
import { Alone, alone, eachAlone, engineOf, GREEDY, kvBits, mixedLengthPrompts, nativeOf, prompt, promptTokens, runningStream } from "../helpers/shared-steps";
import { expectAppendedTogetherAsAlone, expectBadTokenFailsAlone, expectCancelledPromptUndone, expectDisposeStopsPrompts, expectGeneratedTogetherAsAlone } from "../helpers/shared-step-checks";

process.env.LCKV_QUIET = "1";

const FIXTURES = path.join(__dirname, "..", "fixtures");
const SEQUENTIAL = { prefill: "sequential" } as const;

describe.each(["lckv-w2", "lckv-sandwich", "lckv-sliding", "gpt2-lckv"])("%s", (name) => {
  let m: Model;
  let refs: Alone[];
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, name), { device: "cpu", threads: 1, prefixCache: 0 });
    expect(m.config.plan.cyclicGroup).not.toBeNull();
    refs = await eachAlone(m, mixedLengthPrompts(m), SEQUENTIAL);
  });
  afterAll(() => m.dispose());

  test("concurrent prompts as batched token steps equal each prompt prefilled alone, bit for bit", async () => {
    await expectAppendedTogetherAsAlone(m, mixedLengthPrompts(m), refs);
  });

  test("generate() of concurrent prompts (the default mode) gives what each gives alone with prefill sequential", async () => {
    await expectGeneratedTogetherAsAlone(m, mixedLengthPrompts(m), refs);
  });

  test('prefill "sequential" asked for goes as batched steps; "fixed-point" and "iterative" run as asked', async () => {
    const p = mixedLengthPrompts(m)[2];
    const stream = await runningStream(m);
    try {
      for (const [mode, batched] of [["sequential", true], ["fixed-point", false], ["iterative", false]] as const) {
        const s = m.createSequence();
        const before = promptTokens(m);
        await s.append(p, { prefill: mode, ...(mode === "iterative" ? { prefillPasses: 2 } : {}) });
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
    const ps = mixedLengthPrompts(m);
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
    const p = mixedLengthPrompts(m)[3];
    await expectCancelledPromptUndone(m, head, p, 10, await alone(m, p, head, SEQUENTIAL));
  });

  test("a bad token id fails its own request with a typed error; the others are unharmed", async () => {
    const ps = mixedLengthPrompts(m).slice(1, 3);
    await expectBadTokenFailsAlone(m, ps, await eachAlone(m, ps, SEQUENTIAL));
  });

  test("a row the engine refuses mid-prompt fails only its own prompt; the batch's other rows go on", async () => {
    // Tokens are checked before any work, so a bad one reaches the engine only past those
    // checks: this feeds the scheduler directly, as a prefill does.
    const ps = mixedLengthPrompts(m).slice(1, 3);
    const refs = await eachAlone(m, ps, SEQUENTIAL);
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
    await expectDisposeStopsPrompts(m2, mixedLengthPrompts(m2), 8);
  });
});
