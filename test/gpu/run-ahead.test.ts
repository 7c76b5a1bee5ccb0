/**
 * Run-ahead decoding (loadModel's runAhead, on by default): each decode call queues the next
 * step on the GPU, fed on the device with the tokens it just chose, before those tokens reach
 * JavaScript. A call that continues the same batch uses that step; any other call throws it
 * away. Either way the tokens must be exactly those of a model that never runs ahead. The
 * scripts below run on both models and compare everything they produce: batches that shrink as
 * requests finish, seeded sampling, generations stopped and resumed with the same or other
 * settings, forks, a sequence rewound and refilled to the same length and last token (so only
 * its history tells the queued step is stale), sequences that fill their context, repetition
 * penalties (which never run ahead), and a model whose every layer is windowed; and, on the LCKV
 * model, requests served from the prefix cache, generations that shift their context, top-k and
 * min-p sampling, and a bf16 batch of 20 rows; and an int4 cache, whose steps read each sequence's
 * bf16 residual, with forks, prefix reuse and context shifts.
 * Runs with `npm run test:gpu` on a machine with an NVIDIA GPU; elsewhere it says it skipped.
 */
import { loadModel, LoadOptions, Model } from "../../lib";
import { NativeSamplingParams, NativeSequence } from "../../lib/native";
import { writeTinyModel, TinyLlamaSpec } from "../helpers/tiny-model";
import { earlyPageLoader, expectEarlyPage, expectFailedBatchKeepsPool, expectOwnPagesFirst, expectReservationKept } from "../helpers/early-page-checks";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU run-ahead tests");

const greedy: NativeSamplingParams = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };

function prompt(model: Model, length: number, salt: number): number[] {
  return Array.from({ length }, (_, k) => (k * 31 + salt * 7 + 3) % model.config.vocabSize);
}

/** Appends `tokens` to a native sequence in one prefill; with `sample`, resolves with the next token. */
async function prefill(ns: NativeSequence, tokens: number[], sample?: NativeSamplingParams): Promise<number | undefined> {
  return (await ns.append(Int32Array.from(tokens), { mode: "fixed-point", passes: 1, tolerance: 0, logits: "none", sample })).token;
}

/** Requests of different lengths decoding together: the batch shrinks as each one finishes. */
async function concurrent(model: Model, sampling: Record<string, number>): Promise<number[][]> {
  const requests = [
    { prompt: 5, maxNewTokens: 300 },
    { prompt: 40, maxNewTokens: 120 },
    { prompt: 250, maxNewTokens: 200 },
  ];
  return Promise.all(
    requests.map(async (r, i) => (await model.generate(prompt(model, r.prompt, i), { maxNewTokens: r.maxNewTokens, ignoreEos: true, ...sampling })).tokens),
  );
}

/**
 * Generations stopped early (each leaves a step queued), resumed with the same settings (which
 * uses it) and with others (which throws it away); then a fork, after which the parent's next
 * call, with the same settings, must throw its queued step away (the fork shares its pages).
 * forkDiscards: the steps thrown away from the fork to the end.
 */
async function stopResumeFork(model: Model): Promise<{ tokens: number[][]; forkDiscards: number }> {
  const out: number[][] = [];
  const seq = model.createSequence();
  await seq.append(prompt(model, 30, 9));
  const upTo = async (opts: Record<string, unknown>, stopAt: number) => {
    const tokens: number[] = [];
    for await (const c of seq.generate({ ignoreEos: true, ...opts })) {
      tokens.push(c.token!);
      if (tokens.length === stopAt) break;
    }
    return tokens;
  };
  const sampled = { temperature: 0.7, seed: 3 };
  out.push(await upTo({ maxNewTokens: 50, temperature: 0 }, 20));
  out.push(await upTo({ maxNewTokens: 30, temperature: 0 }, 25));
  out.push(await upTo({ maxNewTokens: 10, ...sampled }, 5));
  out.push(await upTo({ maxNewTokens: 10, ...sampled }, 3));
  const before = stats(model).discarded;
  const child = seq.fork();
  out.push(await collect(seq.generate({ maxNewTokens: 20, ignoreEos: true, ...sampled })));
  out.push(await collect(child.generate({ maxNewTokens: 20, ignoreEos: true, ...sampled })));
  const forkDiscards = stats(model).discarded - before;
  out.push(seq.tokens, child.tokens);
  child.dispose();
  seq.dispose();
  return { tokens: out, forkDiscards };
}

/**
 * A generation stopped early leaves a step queued that writes into its sequence's last page;
 * the sequence is disposed, and a new one takes its pages (the pool hands out the pages freed
 * last first) before that step has necessarily run. The new sequence's tokens must not care.
 */
async function freedPagesReused(model: Model): Promise<number[][]> {
  const a = model.createSequence();
  await a.append(prompt(model, 40, 5));
  const first: number[] = [];
  for await (const c of a.generate({ maxNewTokens: 100, temperature: 0, ignoreEos: true })) {
    first.push(c.token!);
    if (first.length === 10) break;
  }
  a.dispose();
  const b = model.createSequence();
  await b.append(prompt(model, 45, 6));
  const second = await collect(b.generate({ maxNewTokens: 30, temperature: 0, ignoreEos: true }));
  b.dispose();
  return [first, second];
}

async function collect(gen: AsyncGenerator<{ token: number | null }, unknown, undefined>): Promise<number[]> {
  const tokens: number[] = [];
  for await (const c of gen) if (c.token !== null) tokens.push(c.token);
  return tokens;
}

/**
 * Native calls: decode steps (each queues the next), then the sequence is cut back by three
 * tokens and refilled with three others, so that its length and the token the next call passes
 * are those of the queued step, and only its history differs.
 */
async function rewoundToSameLength(model: Model): Promise<{ tokens: number[]; used: number; discarded: number }> {
  const nm = model.nativeModel();
  const ns = nm.createSequence(model.maxContext);
  const V = model.config.vocabSize;
  let tok = (await prefill(ns, prompt(model, 20, 4), greedy))!;
  const out = [tok];
  for (let i = 0; i < 6; i++) out.push((tok = (await nm.decodeBatch([ns], Int32Array.of(tok), [greedy]))[0]));
  const length = ns.length;  // 26: the last call queued the step at position 26, with token `tok`
  ns.truncate(length - 3);
  await prefill(ns, [(tok + 11) % V, (tok + 17) % V, (tok + 23) % V]);
  expect(ns.length).toBe(length);
  const s0 = stats(model);
  // Positions 26 to 31: the first call throws the queued step away, the next five use theirs;
  // the last queues the step at position 32 (taking its new page), which the model's next call
  // throws away, after s1.
  for (let i = 0; i < 6; i++) out.push((tok = (await nm.decodeBatch([ns], Int32Array.of(tok), [greedy]))[0]));
  const s1 = stats(model);
  ns.dispose();
  return { tokens: out, used: s1.used - s0.used, discarded: s1.discarded - s0.discarded };
}

/**
 * Native calls whose batch changes: [a, b], then [b] (throws [a, b]'s queued step away), then
 * [b] again without run-ahead (uses the queued step, queues none), then [a] without run-ahead.
 * Counts from after the first call.
 */
async function batchChanges(model: Model): Promise<{ tokens: number[]; used: number; discarded: number }> {
  const nm = model.nativeModel();
  const a = nm.createSequence(model.maxContext), b = nm.createSequence(model.maxContext);
  let ta = (await prefill(a, prompt(model, 20, 1), greedy))!, tb = (await prefill(b, prompt(model, 20, 2), greedy))!;
  // Two steps of both: a step's key is recorded at its second sighting, and only a recorded
  // step runs ahead, so the second queues its successor whether or not the key was seen before.
  [ta, tb] = await nm.decodeBatch([a, b], Int32Array.of(ta, tb), [greedy, greedy]);
  [ta, tb] = await nm.decodeBatch([a, b], Int32Array.of(ta, tb), [greedy, greedy]);
  const s0 = stats(model);
  const out = [ta, tb];
  out.push((tb = (await nm.decodeBatch([b], Int32Array.of(tb), [greedy]))[0]));
  out.push((tb = (await nm.decodeBatch([b], Int32Array.of(tb), [greedy], false))[0]));
  out.push((ta = (await nm.decodeBatch([a], Int32Array.of(ta), [greedy], false))[0]));
  const s1 = stats(model);
  a.dispose();
  b.dispose();
  return { tokens: out, used: s1.used - s0.used, discarded: s1.discarded - s0.discarded };
}

/** Sequences that decode until their context is full (steps near the end cannot run ahead). */
async function fillContext(model: Model): Promise<number[][]> {
  return Promise.all([3, 17].map(async (p, i) => (await model.generate(prompt(model, p, i), { maxNewTokens: 1000, ignoreEos: true })).tokens));
}

/** A penalised request alone (never runs ahead), then beside a plain one. */
async function penalties(model: Model): Promise<{ tokens: number[][]; ranAhead: number }> {
  const before = model.nativeModel().memoryInfo().runAheadSteps;
  const alone = (await model.generate(prompt(model, 12, 1), { maxNewTokens: 40, repetitionPenalty: 1.3, ignoreEos: true })).tokens;
  const ranAhead = model.nativeModel().memoryInfo().runAheadSteps - before;
  const mixed = await Promise.all([
    model.generate(prompt(model, 12, 1), { maxNewTokens: 40, repetitionPenalty: 1.3, ignoreEos: true }),
    model.generate(prompt(model, 9, 2), { maxNewTokens: 40, ignoreEos: true }),
  ]);
  return { tokens: [alone, ...mixed.map((m) => m.tokens)], ranAhead };
}

/** A request whose prompt a finished one left in the prefix cache, beside two that extend it. */
async function sharedPrefixes(model: Model): Promise<number[][]> {
  const p = prompt(model, 200, 3);
  const first = (await model.generate(p, { maxNewTokens: 40, ignoreEos: true, temperature: 0 })).tokens;
  const next = await Promise.all([
    model.generate(p, { maxNewTokens: 60, ignoreEos: true, temperature: 0 }),
    model.generate([...p, ...first.slice(0, 10)], { maxNewTokens: 60, ignoreEos: true, temperature: 0 }),
    model.generate([...p, 7, 8, 9], { maxNewTokens: 60, ignoreEos: true, temperature: 0.8, seed: 5 }),
  ]);
  return [first, ...next.map((r) => r.tokens)];
}

/**
 * Requests served from the prefix cache (sharedPrefixes): the same tokens on both models, from as
 * many prefix-cache hits (some), and the pool audits clean. Returns the tokens, and the steps the
 * model running ahead used.
 */
async function expectSamePrefixedTokens(ahead: Model, plain: Model): Promise<{ tokens: number[][]; used: number }> {
  const before = stats(ahead).used;
  const tokens = await sharedPrefixes(ahead);
  const used = stats(ahead).used - before;
  expect(tokens).toEqual(await sharedPrefixes(plain));
  expect(ahead.cacheStats().prefixCache.hits).toBeGreaterThan(0);
  expect(ahead.cacheStats().prefixCache.hits).toBe(plain.cacheStats().prefixCache.hits);
  expect(ahead.nativeModel().auditPool()).toBe("");
  return { tokens, used };
}

/** Generations of several times the context, which shift their K/V as they go (sink-window). */
async function shifted(model: Model): Promise<number[][]> {
  const opts = { maxNewTokens: 260, ignoreEos: true, contextShift: "sink-window" as const, sinkTokens: 4 };
  return Promise.all([
    model.generate(prompt(model, 4, 3), { ...opts, temperature: 0 }).then((r) => r.tokens),
    model.generate(prompt(model, 30, 4), { ...opts, temperature: 0.8, topK: 20, seed: 11 }).then((r) => r.tokens),
  ]);
}

/** Generations that shift their context (shifted): the same tokens on both models, all of them, and the pool audits clean. */
async function expectSameShiftedTokens(ahead: Model, plain: Model): Promise<void> {
  const a = await shifted(ahead);
  expect(a).toEqual(await shifted(plain));
  expect(a.map((t) => t.length)).toEqual([260, 260]);
  expect(ahead.nativeModel().auditPool()).toBe("");
}

/**
 * Native calls on one batch of `rows` sequences: prefills, then `steps` greedy decode steps of
 * the whole batch. The prompts are 20 tokens long (so the sequences' page crossings coincide),
 * or promptLength(i) tokens.
 */
async function fixedBatch(model: Model, rows: number, steps: number, promptLength = (_i: number) => 20): Promise<{ tokens: number[]; used: number }> {
  const nm = model.nativeModel();
  const seqs = Array.from({ length: rows }, () => nm.createSequence(model.maxContext));
  let toks: number[] = [];
  for (let i = 0; i < rows; i++) toks.push((await prefill(seqs[i], prompt(model, promptLength(i), i), greedy))!);
  const out = [...toks];
  const before = stats(model).used;
  for (let step = 0; step < steps; step++) {
    toks = Array.from(await nm.decodeBatch(seqs, Int32Array.from(toks), seqs.map(() => greedy)));
    out.push(...toks);
  }
  const used = stats(model).used - before;
  for (const q of seqs) q.dispose();
  return { tokens: out, used };
}

/** The same model loaded twice on the GPU: running ahead (the default), and not. */
async function aheadAndPlain(dir: string, options: LoadOptions): Promise<[Model, Model]> {
  return [await loadModel(dir, { device: "cuda", ...options }), await loadModel(dir, { device: "cuda", ...options, runAhead: false })];
}

function stats(model: Model): { used: number; discarded: number } {
  const m = model.nativeModel().memoryInfo();
  return { used: m.runAheadSteps, discarded: m.runAheadDiscarded };
}

const models: [string, TinyLlamaSpec][] = [
  ["LCKV (middle layers read K/V from above)", { layerTypes: "0_3_3_3_4", numLayers: 5, hidden: 64, heads: 4, kvHeads: 2, vocab: 256, maxPositions: 1024, seed: 5 }],
  ["every layer windowed", { seed: 41, hidden: 64, vocab: 256, maxPositions: 512, config: { model_type: "mistral", architectures: ["MistralForCausalLM"], sliding_window: 24 } }],
];

describeGpu.each(models)("cuda: run-ahead decoding, %s", (_name, spec) => {
  let ahead: Model, plain: Model, small: Model, smallPlain: Model;

  beforeAll(async () => {
    const dir = writeTinyModel(spec);
    [ahead, plain] = await aheadAndPlain(dir, { dtype: "f32", prefixCache: 0 });
    [small, smallPlain] = await aheadAndPlain(dir, { dtype: "f32", prefixCache: 0, maxContext: 100 });
  });
  afterAll(async () => {
    for (const m of [ahead, plain, small, smallPlain]) await m?.dispose();
  });

  test("concurrent greedy requests: the same tokens, most steps run ahead, finishing requests throw nothing away", async () => {
    const s0 = stats(ahead);
    const a = await concurrent(ahead, { temperature: 0 });
    const s1 = stats(ahead);
    expect(a).toEqual(await concurrent(plain, { temperature: 0 }));
    expect(a.map((t) => t.length)).toEqual([300, 120, 200]);
    // 300 steps in all; the first steps of each batch size cannot run ahead (a key is recorded
    // at its second sighting), nor those of each 256-position recording.
    expect(s1.used - s0.used).toBeGreaterThan(200);
    // A step whose batch holds a generation's last token queues nothing, so the batch shrinking
    // as requests finish throws nothing away; a request joining the batch after its prefill
    // may (at most two here).
    expect(s1.discarded - s0.discarded).toBeLessThanOrEqual(2);
    expect(stats(plain)).toEqual({ used: 0, discarded: 0 });
    expect(ahead.nativeModel().auditPool()).toBe("");
  });

  test("seeded sampling: the same tokens", async () => {
    const s = { temperature: 0.9, topP: 0.95, seed: 1234 };
    const before = stats(ahead).used;
    expect(await concurrent(ahead, s)).toEqual(await concurrent(plain, s));
    expect(stats(ahead).used - before).toBeGreaterThan(200);
  });

  test("a generation stopped, resumed with the same and other settings, and forked: the same tokens", async () => {
    const s0 = stats(ahead);
    const a = await stopResumeFork(ahead);
    const s1 = stats(ahead);
    expect(a.tokens).toEqual((await stopResumeFork(plain)).tokens);
    expect(s1.used - s0.used).toBeGreaterThan(60);
    expect(a.forkDiscards).toBe(1);  // the parent's step queued before the fork
    expect(ahead.nativeModel().auditPool()).toBe("");
  });

  test("a step queued for a sequence that is then disposed does not disturb the sequence that takes its pages", async () => {
    const before = stats(ahead).discarded;
    expect(await freedPagesReused(ahead)).toEqual(await freedPagesReused(plain));
    expect(stats(ahead).discarded - before).toBe(1);
    expect(ahead.nativeModel().auditPool()).toBe("");
  });

  test("sequences of different lengths: one opening a new page does not keep the batch from running ahead", async () => {
    // Prompts of 3, 5, ..., 17 tokens: at every other step one of the 8 sequences moves into a
    // new page. The step before takes that page, so the step ahead runs anyway: of 64 steps all
    // run ahead but the first two of each recording key (the batch's first, and those of the
    // page-table stride's two changes, from 2 to 4 and 4 to 8 pages): about 58. Without the
    // page taken early, every other step could not run ahead (at most 32).
    const lengths = (i: number) => 3 + 2 * i;
    const a = await fixedBatch(ahead, 8, 64, lengths);
    const b = await fixedBatch(plain, 8, 64, lengths);
    expect(a.tokens).toEqual(b.tokens);
    expect(a.tokens.length).toBe(8 * 65);
    expect(a.used).toBeGreaterThanOrEqual(44);
    expect(b.used).toBe(0);
    expect(ahead.nativeModel().auditPool()).toBe("");
  });

  test("native calls whose batch changes: the same tokens; a changed batch throws the queued step away, runAhead false queues none", async () => {
    const a = await batchChanges(ahead);
    expect(a.tokens).toEqual((await batchChanges(plain)).tokens);
    expect({ used: a.used, discarded: a.discarded }).toEqual({ used: 1, discarded: 1 });
  });

  test("a sequence rewound and refilled to the queued step's length and token does not use that step", async () => {
    const a = await rewoundToSameLength(ahead);
    const b = await rewoundToSameLength(plain);
    expect(a.tokens).toEqual(b.tokens);
    expect({ used: a.used, discarded: a.discarded }).toEqual({ used: 5, discarded: 1 });
    expect({ used: b.used, discarded: b.discarded }).toEqual({ used: 0, discarded: 0 });
  });

  test("sequences that fill their context: the same tokens, no error", async () => {
    const a = await fillContext(small);
    expect(a).toEqual(await fillContext(smallPlain));
    expect(a[0].length).toBeGreaterThan(80);
    expect(small.nativeModel().auditPool()).toBe("");
  });

  test("repetition penalties: the same tokens, and a penalised request alone never runs ahead", async () => {
    const a = await penalties(ahead);
    expect(a.tokens).toEqual((await penalties(plain)).tokens);
    expect(a.ranAhead).toBe(0);
  });
});

// What the block above leaves out: the prefix cache, context shift, top-k and min-p sampling,
// and a bf16 batch of more than 16 rows (its products go to cuBLASLt, not the GEMV kernels).
describeGpu("cuda: run-ahead decoding with the prefix cache, context shift, top-k and a bf16 batch of 20", () => {
  const spec = models[0][1];
  let cached: Model, cachedPlain: Model, small: Model, smallPlain: Model, bf16: Model, bf16Plain: Model;

  beforeAll(async () => {
    const dir = writeTinyModel(spec);
    [cached, cachedPlain] = await aheadAndPlain(dir, { dtype: "f32", prefixCache: 8 });
    [small, smallPlain] = await aheadAndPlain(dir, { dtype: "f32", prefixCache: 0, maxContext: 100 });
    [bf16, bf16Plain] = await aheadAndPlain(dir, { dtype: "bf16", prefixCache: 0 });
  });
  afterAll(async () => {
    for (const m of [cached, cachedPlain, small, smallPlain, bf16, bf16Plain]) await m?.dispose();
  });

  test("requests served from the prefix cache: the same tokens", async () => {
    const a = await expectSamePrefixedTokens(cached, cachedPlain);
    expect(a.tokens.map((t) => t.length)).toEqual([40, 60, 60, 60]);
    expect(a.used).toBeGreaterThan(60);
  });

  test("generations that shift their context: the same tokens", async () => {
    await expectSameShiftedTokens(small, smallPlain);
  });

  test("top-k and min-p sampling: the same tokens", async () => {
    const s = { temperature: 0.8, topK: 20, minP: 0.05, seed: 99 };
    const before = stats(cached).used;
    const a = await concurrent(cached, s);
    const used = stats(cached).used - before;
    expect(a).toEqual(await concurrent(cachedPlain, s));
    expect(used).toBeGreaterThan(200);
  });

  test("a bf16 batch of 20 rows: the same tokens, and it runs ahead", async () => {
    const a = await fixedBatch(bf16, 20, 40);
    const b = await fixedBatch(bf16Plain, 20, 40);
    expect(a.tokens).toEqual(b.tokens);
    expect(a.tokens.length).toBe(20 * 41);
    // 40 steps: all but the first two of each recording key (a key is recorded at its second
    // sighting): the batch's first, and the page-table stride's change when all 20 rows reach
    // position 32 together.
    expect(a.used).toBeGreaterThan(20);
    expect(b.used).toBe(0);
  });
});

// An int4 cache: keys per channel over a page, the page being written in a bf16 residual
// (native/engine/kv_format.h). A recorded step reads each sequence's residual from its inputs, a
// step run ahead stays in the page its residual holds (it never starts a new page), and forks,
// prefix reuse and context shifts copy or rewrite the residual: every token equals the model's
// that never runs ahead, with the same cache type.
describeGpu("cuda: run-ahead decoding over an int4 cache", () => {
  const spec = models[0][1];
  let ahead: Model, plain: Model, cached: Model, cachedPlain: Model, small: Model, smallPlain: Model;

  beforeAll(async () => {
    const dir = writeTinyModel(spec);
    [ahead, plain] = await aheadAndPlain(dir, { dtype: "f32", prefixCache: 0, kvCacheDtype: "int4" });
    [cached, cachedPlain] = await aheadAndPlain(dir, { dtype: "f32", prefixCache: 8, kvCacheDtype: "int4" });
    [small, smallPlain] = await aheadAndPlain(dir, { dtype: "f32", prefixCache: 0, maxContext: 100, kvCacheDtype: "int4" });
  });
  afterAll(async () => {
    for (const m of [ahead, plain, cached, cachedPlain, small, smallPlain]) await m?.dispose();
  });

  test("concurrent greedy requests: the same tokens, and most steps run ahead", async () => {
    const s0 = stats(ahead);
    const a = await concurrent(ahead, { temperature: 0 });
    expect(a).toEqual(await concurrent(plain, { temperature: 0 }));
    expect(a.map((t) => t.length)).toEqual([300, 120, 200]);
    expect(stats(ahead).used - s0.used).toBeGreaterThan(200);
    expect(ahead.nativeModel().auditPool()).toBe("");
  });

  test("a generation stopped, resumed and forked: the same tokens", async () => {
    const a = await stopResumeFork(ahead);
    expect(a.tokens).toEqual((await stopResumeFork(plain)).tokens);
    expect(ahead.nativeModel().auditPool()).toBe("");
  });

  test("requests served from the prefix cache: the same tokens", async () => {
    await expectSamePrefixedTokens(cached, cachedPlain);
  });

  test("generations that shift their context: the same tokens", async () => {
    await expectSameShiftedTokens(small, smallPlain);
  });
});

// A decode call that queues a step ahead takes the page of each sequence's next position early
// (decode_step.cpp). A later batch that fails must keep it, as it keeps every page held before
// the batch: a failed batch changes nothing (docs/architecture.md). The checks are the CPU's
// (test/cpu/run-ahead-pages.test.ts), here with the steps really queued ahead.
describeGpu("cuda: run-ahead's early page and a failed batch", () => {
  const withPages = earlyPageLoader("cuda");
  test("a step that could run ahead takes its sequence's next page early", () => expectEarlyPage(withPages));
  test("a batch [a, b] refused by a full pool leaves the pool as it was, a page taken early included", () =>
    expectFailedBatchKeepsPool(withPages, true));
  test("a batch [b, a] refused by a full pool leaves the pool as it was, a page taken early included", () =>
    expectFailedBatchKeepsPool(withPages, false));
  test("a request keeps its reservation when a batch fails before its row's turn", () => expectReservationKept(withPages));
  test("an early page never takes the page another row of the same step needs", () => expectOwnPagesFirst(withPages));
});
