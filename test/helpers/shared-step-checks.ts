/**
 * The checks that the tests of prompts run as rows of the scheduler's shared steps make alike
 * (batched token steps: test/cpu/batched-prefill.test.ts; mixed steps:
 * test/{cpu,gpu}/mixed-prefill*.test.ts), each test with its own model, prompts and references
 * (the prompts prefilled alone). The pieces they are built of: shared-steps.ts.
 */
import { AbortError, DisposedError, Model, Sequence, TokenOutOfRangeError } from "../../lib";
import {
  abortedAfter,
  Alone,
  chunk,
  continuation,
  engineOf,
  feedBesideStream,
  GREEDY,
  kvBits,
  nativeOf,
  promptRows,
  promptTokens,
  runningStream,
  until,
} from "./shared-steps";

/**
 * Each sequence holds the K/V of its prompt prefilled alone (`refs`) bit for bit, is exact, and
 * its greedy continuation has the same tokens and log-probabilities; then the sequences are
 * disposed and the cache audits clean. The continuations run together, or with `inTurn` one at
 * a time, each decode step a row alone as the references' were (on the GPU, decode rows batched
 * together are not bit-exact: the attention's split-K plan follows the batch).
 */
export async function expectEachAsAlone(m: Model, seqs: Sequence[], refs: Alone[], { inTurn = false } = {}): Promise<void> {
  seqs.forEach((s, i) => expect(kvBits(m, s, s.length - 1)).toEqual(refs[i].kv));
  for (const s of seqs) expect(s.exact).toBe(true);
  const gens: Awaited<ReturnType<typeof continuation>>[] = [];
  if (inTurn) for (const s of seqs) gens.push(await continuation(s));
  else gens.push(...(await Promise.all(seqs.map((s) => continuation(s)))));
  gens.forEach((g, i) => {
    expect(g.tokens).toEqual(refs[i].tokens);
    expect(g.logprobs).toEqual(refs[i].logprobs);
  });
  for (const s of seqs) s.dispose();
  expect(m.auditCache()).toBe("");
}

/**
 * The prompts appended together while a stream decodes: every row of theirs goes in as a row of
 * a shared step, and each then holds and continues as it does alone (expectEachAsAlone, with
 * `opts`). Returns what the stream saw meanwhile (feedBesideStream).
 */
export async function expectAppendedTogetherAsAlone(m: Model, ps: number[][], refs: Alone[], opts: { inTurn?: boolean } = {}) {
  const seqs = ps.map(() => m.createSequence());
  const fed = await feedBesideStream(m, () => Promise.all(seqs.map((s, i) => s.append(ps[i]))));
  expect(fed.rows).toBe(promptRows(ps));
  await expectEachAsAlone(m, seqs, refs, opts);
  return fed;
}

/**
 * generate() of the prompts together: some of their rows go into shared steps, and each gives the
 * greedy tokens it gives alone (`refs`), and their log-probabilities unless `logprobs` is false.
 */
export async function expectGeneratedTogetherAsAlone(m: Model, ps: number[][], refs: Alone[], { logprobs = true } = {}): Promise<void> {
  const before = promptTokens(m);
  const together = await Promise.all(ps.map((p) => m.generate(p, GREEDY)));
  expect(promptTokens(m)).toBeGreaterThan(before);
  together.forEach((g, i) => {
    expect(g.tokens).toEqual(refs[i].tokens);
    if (logprobs) expect(g.logprobs).toEqual(refs[i].logprobs);
  });
}

/**
 * While a stream decodes, the prompt appended in each prefill mode goes in whole as rows of
 * shared steps and holds `kv`, its K/V prefilled alone: without a cyclic group each mode is one
 * exact pass.
 */
export async function expectEveryModeMixes(m: Model, p: number[], kv: number[][]): Promise<void> {
  const stream = await runningStream(m);
  try {
    for (const mode of ["sequential", "fixed-point", "iterative"] as const) {
      const s = m.createSequence();
      const before = promptTokens(m);
      await s.append(p, { prefill: mode });
      expect(promptTokens(m) - before).toBe(p.length - 1);
      expect(kvBits(m, s, s.length - 1)).toEqual(kv);
      s.dispose();
    }
  } finally {
    await stream.stop();
  }
}

/**
 * What `feedBesideStream` saw while `prompts` prompts of `total` rows went in as mixed steps: a
 * token of the stream in every step, at most one chunk of prompt tokens per step, and the prompts
 * packed into shared chunks. A prompt goes to the scheduler in pieces of one chunk, each queued
 * when the one before it is done, so a prompt's last, shorter piece may share a step that is not
 * full (prompts of 39, 611 and 1792 rows in chunks of 512 take 6 steps, not 5, arriving
 * together), and so may a step that starts before every prompt has arrived. So each prompt after
 * the first may cost one step beyond the fewest the chunk allows, and at most one step per prompt
 * carries less than a chunk.
 */
export function expectChunkShared(m: Model, fed: Awaited<ReturnType<typeof feedBesideStream>>, total: number, prompts: number): void {
  expect(fed.rows).toBe(total);
  for (const g of fed.during) expect(g.steps).toBe(1);
  for (const g of fed.during) expect(g.prompt).toBeLessThanOrEqual(chunk(m));
  const fewest = Math.ceil(total / chunk(m));
  expect(fed.carried.length).toBeGreaterThanOrEqual(fewest);
  expect(fed.carried.length).toBeLessThanOrEqual(fewest + prompts - 1);
  expect(fed.carried.filter((rows) => rows < chunk(m)).length).toBeLessThanOrEqual(prompts);
}

/**
 * While a stream decodes, prompt `p` appended after `head` is cancelled once `rows` of its tokens
 * went in as rows of shared steps: the append fails with AbortError and those rows are taken out
 * again (the sequence holds `head` as before, the cache audits clean); appended again, the prompt
 * holds `ref.kv`, its K/V prefilled alone after `head`, and with `ref.tokens` continues with
 * those greedy tokens. The same through generate() ends with finishReason "abort" and no tokens,
 * and no K/V page stays reserved.
 */
export async function expectCancelledPromptUndone(
  m: Model,
  head: number[],
  p: number[],
  rows: number,
  ref: { kv: number[][]; tokens?: number[] },
): Promise<void> {
  const stream = await runningStream(m);
  try {
    const s = m.createSequence();
    await s.append(head);
    const before = promptTokens(m);
    const e = await abortedAfter(m, rows, (signal) => s.append(p, { signal })).catch((x) => x);
    expect(e).toBeInstanceOf(AbortError);
    // Some of its rows had gone in as rows of shared steps, and were taken out again.
    expect(promptTokens(m) - before).toBeGreaterThanOrEqual(rows);
    expect(promptTokens(m) - before).toBeLessThan(p.length - 1);
    expect(s.tokens).toEqual(head);
    expect(nativeOf(s).length).toBe(head.length - 1);
    expect(m.auditCache()).toBe("");
    await s.append(p);
    expect(kvBits(m, s, s.length - 1)).toEqual(ref.kv);
    if (ref.tokens) expect((await continuation(s)).tokens).toEqual(ref.tokens);
    s.dispose();

    // The same through generate(): the request ends with finishReason "abort".
    const r = await abortedAfter(m, rows, (signal) => m.generate(p, { ...GREEDY, signal }));
    expect(r.finishReason).toBe("abort");
    expect(r.tokens).toEqual([]);
  } finally {
    await stream.stop();
  }
  expect(m.cacheStats().pagesReserved).toBe(0);
  expect(m.auditCache()).toBe("");
}

/**
 * While a stream decodes, a request with a token outside the vocabulary fails with a
 * TokenOutOfRangeError that names it, and the prompts generated beside it give their greedy
 * tokens alone (`refs`).
 */
export async function expectBadTokenFailsAlone(m: Model, ps: number[][], refs: Alone[]): Promise<void> {
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
}

/**
 * While a stream decodes, the prompts `ps` are appended to new sequences beside a chunk that
 * holds a token the engine refuses: the chunk fails with TokenOutOfRangeError, and none of it
 * goes in (it was one step's rows). Tokens are checked before any work, so a bad one reaches the
 * engine only past those checks: the chunk goes to the scheduler directly, as a prefill's does.
 * Returns the prompts' sequences, to compare with the prompts alone.
 */
export async function appendBesideRefusedChunk(m: Model, ps: number[][]): Promise<Sequence[]> {
  const bad = m.createSequence();
  const seqs = ps.map(() => m.createSequence());
  const stream = await runningStream(m);
  try {
    const [e] = await Promise.all([
      engineOf(m).scheduler.append(nativeOf(bad), [5, 6, m.config.vocabSize + 3, 7], undefined, true).catch((x) => x),
      ...seqs.map((s, i) => s.append(ps[i])),
    ]);
    expect(e).toBeInstanceOf(TokenOutOfRangeError);
    expect(nativeOf(bad).length).toBe(0);
  } finally {
    await stream.stop();
  }
  bad.dispose();
  return seqs;
}

/**
 * Disposing the model once `rows` tokens of the prompts `ps` went in as rows of shared steps (a
 * stream decoding beside them) stops each prompt with DisposedError; the stream ends with the
 * model too.
 */
export async function expectDisposeStopsPrompts(m: Model, ps: number[][], rows: number): Promise<void> {
  const stream = await runningStream(m);
  const appends = ps.map((p) => m.createSequence().append(p).catch((x) => x));
  await until(() => promptTokens(m) >= rows, `${rows} prompt rows in shared steps`);
  await m.dispose();
  for (const e of await Promise.all(appends)) expect(e).toBeInstanceOf(DisposedError);
  await stream.stop().catch(() => undefined);
}
