/**
 * Run-ahead decoding (loadModel's runAhead, on by default): each decode call queues the next
 * step on the GPU, fed on the device with the tokens it just chose, before those tokens reach
 * JavaScript. A call that continues the same batch uses that step; any other call throws it
 * away. Either way the tokens must be exactly those of a model that never runs ahead. The
 * scripts below run on both models and compare everything they produce: batches that shrink as
 * requests finish, seeded sampling, generations stopped and resumed with the same or other
 * settings, forks, a sequence rewound and refilled to the same length and last token (so only
 * its history tells the queued step is stale), sequences that fill their context, repetition
 * penalties (which never run ahead), and a model whose every layer is windowed.
 * Runs with `npm run test:gpu` on a machine with an NVIDIA GPU; elsewhere it says it skipped.
 */
import { loadModel, Model } from "../../lib";
import { NativeSamplingParams } from "../../lib/native";
import { writeTinyModel, TinyLlamaSpec } from "../helpers/tiny-model";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU run-ahead tests");

const greedy: NativeSamplingParams = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };

function prompt(model: Model, length: number, salt: number): number[] {
  return Array.from({ length }, (_, k) => (k * 31 + salt * 7 + 3) % model.config.vocabSize);
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
 * uses it) and with others (which throws it away); then a fork (which throws away the next).
 */
async function stopResumeFork(model: Model): Promise<number[][]> {
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
  out.push(await upTo({ maxNewTokens: 50, temperature: 0 }, 20));
  out.push(await upTo({ maxNewTokens: 30, temperature: 0 }, 25));
  out.push(await upTo({ maxNewTokens: 10, temperature: 0.7, seed: 3 }, 5));
  const child = seq.fork();
  out.push((await collect(seq.generate({ maxNewTokens: 20, temperature: 0, ignoreEos: true }))));
  out.push((await collect(child.generate({ maxNewTokens: 20, temperature: 0, ignoreEos: true }))));
  out.push(seq.tokens, child.tokens);
  child.dispose();
  seq.dispose();
  return out;
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
async function rewoundToSameLength(model: Model): Promise<number[]> {
  const nm = model.nativeModel();
  const ns = nm.createSequence(model.maxContext);
  const V = model.config.vocabSize;
  const r = await ns.append(Int32Array.from(prompt(model, 20, 4)), { mode: "fixed-point", passes: 1, tolerance: 0, logits: "none", sample: greedy });
  const out = [r.token!];
  let tok = r.token!;
  for (let i = 0; i < 6; i++) out.push((tok = (await nm.decodeBatch([ns], Int32Array.of(tok), [greedy]))[0]));
  const length = ns.length;
  ns.truncate(length - 3);
  await ns.append(Int32Array.of((tok + 11) % V, (tok + 17) % V, (tok + 23) % V), { mode: "fixed-point", passes: 1, tolerance: 0, logits: "none" });
  expect(ns.length).toBe(length);
  for (let i = 0; i < 6; i++) out.push((tok = (await nm.decodeBatch([ns], Int32Array.of(tok), [greedy]))[0]));
  ns.dispose();
  return out;
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
    ahead = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0 });
    plain = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0, runAhead: false });
    small = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0, maxContext: 100 });
    smallPlain = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0, maxContext: 100, runAhead: false });
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
    // 300 steps in all; one in 16 crosses into a new page and cannot run ahead, nor can the
    // first step of each batch size (nor of each 256-position recording).
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
    expect(await stopResumeFork(ahead)).toEqual(await stopResumeFork(plain));
    const s1 = stats(ahead);
    expect(s1.used - s0.used).toBeGreaterThan(60);
    expect(s1.discarded - s0.discarded).toBeGreaterThanOrEqual(2);  // the other settings, the fork
    expect(ahead.nativeModel().auditPool()).toBe("");
  });

  test("native calls that leave the batch for another throw the queued step away; runAhead false queues none", async () => {
    const nm = ahead.nativeModel();
    const a = nm.createSequence(ahead.maxContext), b = nm.createSequence(ahead.maxContext);
    const first = async (ns: typeof a, salt: number) =>
      (await ns.append(Int32Array.from(prompt(ahead, 20, salt)), { mode: "fixed-point", passes: 1, tolerance: 0, logits: "none", sample: greedy })).token!;
    let ta = await first(a, 1), tb = await first(b, 2);
    const s0 = stats(ahead);
    ta = (await nm.decodeBatch([a, b], Int32Array.of(ta, tb), [greedy, greedy]))[0];
    tb = (await nm.decodeBatch([b], Int32Array.of(tb), [greedy]))[0];  // a different batch
    const s1 = stats(ahead);
    expect(s1.discarded - s0.discarded).toBe(1);
    await nm.decodeBatch([b], Int32Array.of(tb), [greedy], false);  // uses the step queued by the last call, queues none
    await nm.decodeBatch([a], Int32Array.of(ta), [greedy]);  // nothing queued to throw away
    const s2 = stats(ahead);
    expect(s2.used - s1.used).toBe(1);
    expect(s2.discarded - s1.discarded).toBe(0);
    a.dispose();
    b.dispose();
  });

  test("a sequence rewound and refilled to the queued step's length and token does not use that step", async () => {
    const s0 = stats(ahead);
    expect(await rewoundToSameLength(ahead)).toEqual(await rewoundToSameLength(plain));
    const s1 = stats(ahead);
    expect(s1.discarded - s0.discarded).toBeGreaterThanOrEqual(1);
    expect(s1.used - s0.used).toBeGreaterThanOrEqual(5);
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
