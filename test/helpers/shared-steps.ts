/**
 * What the tests of prompts run as rows of the scheduler's shared steps share (batched token
 * steps: test/cpu/batched-prefill.test.ts; mixed steps: test/{cpu,gpu}/mixed-prefill*.test.ts):
 * a sequence's K/V bits, prompts, a stream that decodes while prompts go in, and a prompt
 * prefilled alone to compare with. The checks they make alike: shared-step-checks.ts.
 */
import { Model, Sequence } from "../../lib";
import type { PrefillOptions } from "../../lib";
import type { EngineContext } from "../../lib/engine-context";
import type { NativeSequence } from "../../lib/native";
import { collectStream } from "./stream";

export function nativeOf(s: Sequence): NativeSequence {
  return (s as unknown as { native: NativeSequence }).native;
}

export function engineOf(m: Model): EngineContext {
  return (m as unknown as { engine: EngineContext }).engine;
}

/** The bits of every K/V slot of the sequence's first n positions. */
export function kvBits(m: Model, s: Sequence, n: number): number[][] {
  return m.config.plan.kvLayers.map((_, slot) => Array.from(new Uint32Array(nativeOf(s).readKv(slot, 0, n).buffer)));
}

/** A prompt of n tokens, different for each seed. */
export function prompt(m: Model, n: number, seed: number): number[] {
  return Array.from({ length: n }, (_, i) => 2 + ((i * (7 + 2 * seed) + 13 * seed) % (m.config.vocabSize - 2)));
}

/**
 * Four prompts of different lengths: 4 and 19 tokens, 55% of the context, and all of it but 12
 * tokens (the longest span more than one prefill chunk where the context allows).
 */
export function mixedLengthPrompts(m: Model): number[][] {
  const L = m.maxContext;
  return [4, 19, Math.floor(L * 0.55), L - 12].map((n, i) => prompt(m, n, i + 1));
}

export const promptTokens = (m: Model): number => m.schedulerStats().promptTokens;
export const chunk = (m: Model): number => engineOf(m).prefillChunk;

export const GREEDY = { maxNewTokens: 8, temperature: 0, ignoreEos: true, logprobs: 3 };

/**
 * The rows a prompt of `run` rows from position `start` takes per mixed step over an int4 cache
 * (with no other prompt): each step's to the end of its page of `pageTokens`.
 */
export function pagePieces(start: number, run: number, pageTokens: number): number[] {
  const pieces: number[] = [];
  for (let at = start; at < start + run; ) {
    const end = Math.min(start + run, (Math.floor(at / pageTokens) + 1) * pageTokens);
    pieces.push(end - at);
    at = end;
  }
  return pieces;
}

/** A sequence's greedy continuation. */
export async function continuation(s: Sequence) {
  return (await collectStream(s.generate(GREEDY))).result;
}

/**
 * A stream decoding on its own sequence until stopped, started before the prompts so that they
 * find a request in flight. Per token after the first, `gaps` holds the prompt tokens that went
 * in since its previous token and the steps that ran.
 */
export async function runningStream(m: Model) {
  const ac = new AbortController();
  const gaps: { prompt: number; steps: number }[] = [];
  let last: { prompt: number; steps: number } | undefined;
  let started!: () => void;
  const first = new Promise<void>((r) => (started = r));
  const done = (async () => {
    const endless = { maxNewTokens: 1e6, contextShift: "sink-window" as const };
    for await (const _ of m.stream([2, 3, 5], { ...endless, temperature: 0, ignoreEos: true, signal: ac.signal })) {
      const now = { prompt: promptTokens(m), steps: m.schedulerStats().steps };
      if (last) gaps.push({ prompt: now.prompt - last.prompt, steps: now.steps - last.steps });
      last = now;
      started();
    }
  })();
  await first;
  return {
    gaps,
    stop: async () => {
      ac.abort();
      await done;
    },
  };
}

/** Waits, a turn of the event loop at a time, until `cond` holds; fails after 20 s. */
export async function until(cond: () => boolean, what: string): Promise<void> {
  const end = Date.now() + 20000;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

/** Waits for the stream's next token: its gap then counts every step that ran before it. */
export async function nextToken(stream: { gaps: readonly unknown[] }): Promise<void> {
  const n = stream.gaps.length;
  await until(() => stream.gaps.length > n, "the stream's next token");
}

/** Runs `call` with a signal raised once `n` more prompt tokens went in as rows of shared steps. */
export async function abortedAfter<T>(m: Model, n: number, call: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const ac = new AbortController();
  const from = promptTokens(m);
  let ended = false;
  const watch = (async () => {
    while (!ended && promptTokens(m) < from + n) await new Promise((r) => setImmediate(r));
    ac.abort();
  })();
  try {
    return await call(ac.signal);
  } finally {
    ended = true;
    await watch;
  }
}

/** What a sequence prefilled alone (with `opts`) holds: its K/V bits and greedy continuation. */
export async function alone(m: Model, ids: number[], before: number[] = [], opts: PrefillOptions = {}) {
  const s = m.createSequence();
  if (before.length) await s.append(before, opts);
  await s.append(ids, opts);
  const kv = kvBits(m, s, s.length - 1);
  const r = await continuation(s);
  s.dispose();
  return { kv, tokens: r.tokens, logprobs: r.logprobs };
}

export type Alone = Awaited<ReturnType<typeof alone>>;

/**
 * Each prompt prefilled alone (with `opts`). Nothing else is in flight, so each is the native
 * prefill call, and no prompt row goes into a shared step.
 */
export async function eachAlone(m: Model, ps: number[][], opts: PrefillOptions = {}): Promise<Alone[]> {
  const before = promptTokens(m);
  const refs: Alone[] = [];
  for (const p of ps) refs.push(await alone(m, p, [], opts));
  expect(promptTokens(m)).toBe(before);
  return refs;
}

/** The rows prompts take in shared steps: every token but each prompt's last (which generate() decodes). */
export function promptRows(ps: number[][]): number {
  return ps.reduce((a, p) => a + p.length - 1, 0);
}

/**
 * Runs `feed` (prompts going in) while a stream decodes, then waits for the stream's next token,
 * so that its gaps count every step that ran. `during`: the stream's gaps from the feed's start;
 * `carried`: the prompt tokens of each of those steps that carried some; `rows`: the prompt
 * tokens that went in as rows of shared steps.
 */
export async function feedBesideStream(m: Model, feed: () => Promise<unknown>) {
  const stream = await runningStream(m);
  try {
    const from = stream.gaps.length;
    const before = promptTokens(m);
    await feed();
    await nextToken(stream);
    const during = stream.gaps.slice(from);
    return { during, carried: during.filter((g) => g.prompt > 0).map((g) => g.prompt), rows: promptTokens(m) - before };
  } finally {
    await stream.stop();
  }
}
