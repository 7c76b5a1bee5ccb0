/**
 * presencePenalty, frequencyPenalty, logitBias and logprobs: their checks, and each against a
 * hand computation over the logits model.forward() gives (the CPU's decode logits are those of
 * a prefill bit for bit).
 */
import { GenerateResult, GenerationStream, InvalidOptionError, loadModel, Model } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";

const V = 64;
const prompt = [3, 14, 15, 9, 26, 5, 35];
let model: Model;

beforeAll(async () => {
  model = await loadModel(writeTinyModel({ seed: 11, vocab: V, maxPositions: 96 }), { device: "cpu" });
});
afterAll(() => model.dispose());

/** The logits after the last token of ids, in double. */
async function lastLogits(ids: number[]): Promise<number[]> {
  const all = await model.logits(ids, { prefill: "sequential" });
  return Array.from(all.subarray((ids.length - 1) * V, ids.length * V));
}

/** Iterates a stream to its end and returns its result. */
async function drain(s: GenerationStream): Promise<GenerateResult> {
  for await (const _ of s) void _;
  return s.result;
}

const argmax = (x: number[]) => x.reduce((b, v, i) => (v > x[b] ? i : b), 0);

function logSoftmax(x: number[]): number[] {
  const m = Math.max(...x);
  const lse = m + Math.log(x.reduce((s, v) => s + Math.exp(v - m), 0));
  return x.map((v) => v - lse);
}

/** OpenAI's penalties over the generated tokens so far, applied in f32 as the engine does. */
function penalise(x: number[], generated: number[], presence: number, frequency: number): number[] {
  const count = new Map<number, number>();
  for (const t of generated) count.set(t, (count.get(t) ?? 0) + 1);
  const y = Float32Array.from(x);
  for (const [t, c] of count) y[t] = Math.fround(y[t] - Math.fround(Math.fround(presence) + Math.fround(Math.fround(frequency) * c)));
  return Array.from(y);
}

describe("option checks name the option", () => {
  const bad: [string, unknown][] = [
    ["presencePenalty", 2.5],
    ["presencePenalty", -3],
    ["presencePenalty", NaN],
    ["presencePenalty", "1"],
    ["frequencyPenalty", 2.01],
    ["frequencyPenalty", -Infinity],
    ["frequencyPenalty", null],
    ["logitBias", []],
    ["logitBias", null],
    ["logitBias", 5],
    ["logitBias", { "-1": 1 }],
    ["logitBias", { a: 1 }],
    ["logitBias", { "1.5": 1 }],
    ["logitBias", { "01": 1 }],
    ["logitBias", { 1: 101 }],
    ["logitBias", { 1: -100.5 }],
    ["logitBias", { 1: NaN }],
    ["logitBias", { 1: "5" }],
    ["logitBias", { [V]: 1 }],
    ["logitBias", Object.fromEntries(Array.from({ length: 301 }, (_, i) => [i, 0]))],
    ["logprobs", -1],
    ["logprobs", 21],
    ["logprobs", 1.5],
    ["logprobs", "2"],
    ["logprobs", true],
  ];
  const label = (v: unknown) => (typeof v === "number" || v === null ? String(v) : JSON.stringify(v).slice(0, 30));
  test.each(bad.map(([o, v]) => [o, label(v), v] as const))("%s = %s", async (option, _label, value) => {
    const err = await model.generate(prompt, { maxNewTokens: 2, [option]: value }).catch((e) => e);
    expect(err).toBeInstanceOf(InvalidOptionError);
    expect(err.option).toBe(option);
  });

  test("the limits themselves pass", async () => {
    const r = await model.generate(prompt, {
      maxNewTokens: 2,
      presencePenalty: -2,
      frequencyPenalty: 2,
      logitBias: { 0: -100, [V - 1]: 100 },
      logprobs: 20,
    });
    expect(r.tokens).toHaveLength(2);
    const many = Object.fromEntries(Array.from({ length: 300 }, (_, i) => [i % V, 0]));
    await expect(model.generate(prompt, { maxNewTokens: 1, logitBias: many, logprobs: 0 })).resolves.toBeDefined();
  });
});

describe("logitBias", () => {
  test("+100 forces a token under greedy decoding", async () => {
    const plain = await model.generate(prompt, { maxNewTokens: 6 });
    const t = [...Array(V).keys()].find((x) => !plain.tokens.includes(x))!;
    const r = await model.generate(prompt, { maxNewTokens: 6, logitBias: { [t]: 100 } });
    expect(r.tokens).toEqual(Array(6).fill(t));
  });

  test("-100 bans a token", async () => {
    const plain = await model.generate(prompt, { maxNewTokens: 8 });
    const banned = plain.tokens[0];
    const r = await model.generate(prompt, { maxNewTokens: 8, logitBias: { [banned]: -100 } });
    expect(r.tokens).not.toContain(banned);
    // The first choice is the runner-up of the unbiased logits.
    const x = await lastLogits(prompt);
    x[banned] = -Infinity;
    expect(r.tokens[0]).toBe(argmax(x));
  });

  test("a bias shifts the logits by exactly its value (hand computation)", async () => {
    const x = await lastLogits(prompt);
    const order = [...x.keys()].sort((a, b) => x[b] - x[a]);
    const [first, second] = order;
    const gap = x[first] - x[second];
    // Just more than the gap moves the choice to the second; just less does not.
    const over = await model.generate(prompt, { maxNewTokens: 1, logitBias: { [second]: gap + 1e-3 } });
    const under = await model.generate(prompt, { maxNewTokens: 1, logitBias: { [second]: gap - 1e-3 } });
    expect(over.tokens[0]).toBe(second);
    expect(under.tokens[0]).toBe(first);
  });
});

describe("presence and frequency penalties", () => {
  test("greedy with penalties follows the hand computation at every step", async () => {
    for (const [presence, frequency] of [
      [0.7, 0],
      [0, 0.9],
      [0.4, 1.3],
      [-1, 0.5],
    ]) {
      const r = await model.generate(prompt, { maxNewTokens: 12, presencePenalty: presence, frequencyPenalty: frequency });
      const gen: number[] = [];
      for (const tok of r.tokens) {
        const x = penalise(await lastLogits([...prompt, ...gen]), gen, presence, frequency);
        expect(tok).toBe(argmax(x));
        gen.push(tok);
      }
    }
  });

  test("they count generated tokens only: the first token is the unpenalised choice", async () => {
    const plain = await model.generate(prompt, { maxNewTokens: 1 });
    const r = await model.generate([...prompt, plain.tokens[0]], { maxNewTokens: 1 });
    const pen = await model.generate([...prompt, plain.tokens[0]], { maxNewTokens: 1, presencePenalty: 2, frequencyPenalty: 2 });
    expect(pen.tokens).toEqual(r.tokens);
  });

  test("a strong frequency penalty keeps greedy decoding from repeating", async () => {
    const plain = await model.generate(prompt, { maxNewTokens: 24 });
    const pen = await model.generate(prompt, { maxNewTokens: 24, frequencyPenalty: 2, presencePenalty: 2 });
    const repeats = (t: number[]) => t.length - new Set(t).size;
    expect(repeats(plain.tokens)).toBeGreaterThan(0);
    expect(repeats(pen.tokens)).toBeLessThan(repeats(plain.tokens));
  });

  test("a sequence's generate() counts only the tokens of that call", async () => {
    using seq = model.createSequence();
    await seq.append(prompt);
    const first = await drain(seq.generate({ maxNewTokens: 4 }));
    expect(first.tokens).toHaveLength(4);
    const before = seq.tokens;
    const r = await drain(seq.generate({ maxNewTokens: 5, frequencyPenalty: 1.5 }));
    const gen: number[] = [];
    for (const tok of r.tokens) {
      const x = penalise(await lastLogits([...before, ...gen]), gen, 0, 1.5);
      expect(tok).toBe(argmax(x));
      gen.push(tok);
    }
  });
});

describe("logprobs", () => {
  test("greedy: each token's log-probability is the log-softmax of its logits, with the top k sorted", async () => {
    const k = 5;
    const s = model.stream(prompt, { maxNewTokens: 8, logprobs: k });
    const chunks = [];
    for await (const c of s) chunks.push(c);
    const r = await s.result;
    expect(r.logprobs).toHaveLength(r.tokens.length);
    const gen: number[] = [];
    for (const [i, c] of chunks.entries()) {
      const lp = logSoftmax(await lastLogits([...prompt, ...gen]));
      expect(c.token).toBe(r.tokens[i]);
      expect(Math.abs(c.logprob! - lp[c.token!])).toBeLessThan(1e-5);
      expect(c.topLogprobs).toHaveLength(k);
      expect(c.topLogprobs![0].token).toBe(c.token);
      for (let j = 1; j < k; j++) expect(c.topLogprobs![j].logprob).toBeLessThanOrEqual(c.topLogprobs![j - 1].logprob);
      for (const t of c.topLogprobs!) expect(Math.abs(t.logprob - lp[t.token])).toBeLessThan(1e-5);
      const best = [...lp.keys()].sort((a, b) => lp[b] - lp[a] || a - b).slice(0, k);
      expect(c.topLogprobs!.map((t) => t.token)).toEqual(best);
      expect(r.logprobs![i]).toEqual({ token: c.token, logprob: c.logprob, topLogprobs: c.topLogprobs });
      gen.push(c.token!);
    }
  });

  test("logprobs 0 gives the chosen token's only; none asked gives none", async () => {
    const r = await model.generate(prompt, { maxNewTokens: 3, logprobs: 0 });
    expect(r.logprobs!.map((l) => l.topLogprobs)).toEqual([[], [], []]);
    const plain = await model.generate(prompt, { maxNewTokens: 3 });
    expect(plain.logprobs).toBeUndefined();
    for await (const c of model.stream(prompt, { maxNewTokens: 2 })) {
      expect(c.logprob).toBeUndefined();
      expect(c.topLogprobs).toBeUndefined();
    }
  });

  test("sampled: taken after penalties and bias, before temperature", async () => {
    const opts = { maxNewTokens: 6, temperature: 1.7, seed: 9, presencePenalty: 0.5, logitBias: { 7: 1.5 }, logprobs: 2 };
    const r = await model.generate(prompt, opts);
    const { logprobs: _, ...withoutLogprobs } = opts;
    // Asking for log-probabilities changes nothing else.
    expect((await model.generate(prompt, withoutLogprobs)).tokens).toEqual(r.tokens);
    const gen: number[] = [];
    for (const [i, tok] of r.tokens.entries()) {
      const x = penalise(await lastLogits([...prompt, ...gen]), gen, 0.5, 0);
      x[7] = Math.fround(x[7] + 1.5);
      const lp = logSoftmax(x);
      expect(Math.abs(r.logprobs![i].logprob - lp[tok])).toBeLessThan(1e-5);
      gen.push(tok);
    }
  });

  test("concurrent requests with different options each get what they get alone", async () => {
    const opts = [
      { maxNewTokens: 6 },
      { maxNewTokens: 6, logprobs: 3 },
      { maxNewTokens: 6, logitBias: { 5: 3 }, frequencyPenalty: 1 },
      { maxNewTokens: 6, temperature: 1.2, seed: 4, presencePenalty: 1, logprobs: 0 },
    ];
    const alone: GenerateResult[] = [];
    for (const o of opts) alone.push(await model.generate(prompt, o));
    const together = await Promise.all(opts.map((o) => model.generate(prompt, o)));
    together.forEach((r, i) => {
      expect(r.tokens).toEqual(alone[i].tokens);
      expect(r.logprobs).toEqual(alone[i].logprobs);
    });
  });
});
