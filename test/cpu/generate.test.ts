/** generate() / stream() behaviour on random tiny models, token ids in and out. */
import * as fs from "node:fs";
import * as path from "node:path";
import { ContextOverflowError, loadModel, Model } from "../../lib";
import { KV_PAGE_TOKENS } from "../../lib/model";
import { tinyLlamaTensors, writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";

const argmax = (a: Float32Array, from: number, n: number) => {
  let b = 0;
  for (let j = 1; j < n; j++) if (a[from + j] > a[from + b]) b = j;
  return b;
};

describe.each([
  ["standard", undefined],
  ["lckv", "0_3_3_3"],
  ["cla", "0_0_2_2"],
])("%s pattern", (_name, layerTypes) => {
  let model: Model;
  const prompt = [3, 14, 15, 9, 26, 5, 35];
  beforeAll(async () => {
    model = await loadModel(writeTinyModel({ layerTypes, seed: 7, vocab: 64, maxPositions: 64 }), { device: "cpu" });
  });
  afterAll(() => model.dispose());

  test("greedy decode equals the argmax of a full prefill at every step (the cache is exact)", async () => {
    const r = await model.generate(prompt, { maxNewTokens: 12, temperature: 0 });
    expect(r.tokens).toHaveLength(12);
    const seq = [...prompt];
    for (const tok of r.tokens) {
      const logits = await model.logits(seq, { prefill: "sequential" });
      const V = model.config.vocabSize;
      expect(tok).toBe(argmax(logits, (seq.length - 1) * V, V));
      seq.push(tok);
    }
  });

  test("greedy is deterministic and ignores the seed", async () => {
    const a = await model.generate(prompt, { maxNewTokens: 8, seed: 1 });
    const b = await model.generate(prompt, { maxNewTokens: 8, seed: 2 });
    expect(a.tokens).toEqual(b.tokens);
    expect(a.finishReason).toBe("length");
    expect(a.usage).toEqual({ promptTokens: prompt.length, completionTokens: 8 });
  });

  test("seeded sampling is reproducible, and the seed matters", async () => {
    const opts = { maxNewTokens: 24, temperature: 2, seed: 42 };
    const a = await model.generate(prompt, opts);
    const b = await model.generate(prompt, opts);
    const c = await model.generate(prompt, { ...opts, seed: 43 });
    expect(a.tokens).toEqual(b.tokens);
    expect(c.tokens).not.toEqual(a.tokens);
  });

  test("top-k 1, top-p tiny and min-p 1 all reduce to greedy", async () => {
    const greedy = (await model.generate(prompt, { maxNewTokens: 8 })).tokens;
    for (const o of [{ topK: 1 }, { topP: 1e-6 }, { minP: 1 }]) {
      expect((await model.generate(prompt, { maxNewTokens: 8, temperature: 1.5, seed: 5, ...o })).tokens).toEqual(greedy);
    }
  });

  test("a strong repetition penalty stops greedy from repeating tokens", async () => {
    const r = await model.generate(prompt, { maxNewTokens: 10, repetitionPenalty: 1000 });
    const all = [...prompt, ...r.tokens];
    // Every generated token is new to the sequence while unseen tokens with positive logits remain.
    expect(new Set(r.tokens).size).toBe(r.tokens.length);
    expect(r.tokens.every((t) => !prompt.includes(t))).toBe(true);
    expect(all.length).toBe(prompt.length + 10);
  });

  test("stream yields the tokens generate returns", async () => {
    const got: number[] = [];
    for await (const chunk of model.stream(prompt, { maxNewTokens: 9, temperature: 0.9, seed: 3 })) got.push(chunk.token!);
    const r = await model.generate(prompt, { maxNewTokens: 9, temperature: 0.9, seed: 3 });
    expect(got).toEqual(r.tokens);
  });

  test("concurrent requests give exactly what each gives alone", async () => {
    const reqs = [0, 1, 2, 3, 4, 5].map((i) => ({ p: prompt.slice(0, 2 + i), o: { maxNewTokens: 6 + i, temperature: i % 2 ? 1.1 : 0, seed: 100 + i } }));
    const alone = [];
    for (const q of reqs) alone.push((await model.generate(q.p, q.o)).tokens);
    const together = await Promise.all(reqs.map((q) => model.generate(q.p, q.o)));
    expect(together.map((r) => r.tokens)).toEqual(alone);
  });
});

describe("stopping", () => {
  let dir: string;
  beforeAll(() => {
    dir = writeTinyModel({ layerTypes: "0_3_3_3", seed: 3, maxPositions: 16 });
  });

  test("the context limit ends generation with 'length'", async () => {
    const m = await loadModel(dir, { device: "cpu" });
    const r = await m.generate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], { maxNewTokens: 100 });
    // 6 more positions fit, and no token lies past them.
    expect(r.tokens).toHaveLength(6);
    expect(r.finishReason).toBe("length");
    await m.dispose();
  });

  test("maxContext caps the context below the model's", async () => {
    const m = await loadModel(dir, { device: "cpu", maxContext: 8 });
    expect(m.maxContext).toBe(8);
    expect((await m.generate([1, 2, 3], { maxNewTokens: 100 })).tokens).toHaveLength(5);
    await m.dispose();
  });

  test("an end-of-sequence token ends generation with 'stop' and is not returned, but counted as generated", async () => {
    const m0 = await loadModel(dir, { device: "cpu" });
    const first = (await m0.generate([1, 2, 3], { maxNewTokens: 3 })).tokens;
    await m0.dispose();
    fs.writeFileSync(path.join(dir, "generation_config.json"), JSON.stringify({ eos_token_id: [first[1]] }));
    const m = await loadModel(dir, { device: "cpu" });
    const r = await m.generate([1, 2, 3], { maxNewTokens: 3 });
    expect(r.tokens).toEqual(first[0] === first[1] ? [] : [first[0]]);
    expect(r.finishReason).toBe("stop");
    expect(r.usage.completionTokens).toBe(r.tokens.length + 1);
    // The rate counts it too: (completionTokens - 1) over the time after the first token.
    expect(r.timings.tokensPerSecond > 0).toBe(r.usage.completionTokens >= 2);
    await m.dispose();
    fs.unlinkSync(path.join(dir, "generation_config.json"));
  });

  test("maxNewTokens 0 returns at once", async () => {
    const m = await loadModel(dir, { device: "cpu" });
    const r = await m.generate([1, 2], { maxNewTokens: 0 });
    expect(r).toMatchObject({ tokens: [], finishReason: "length", usage: { promptTokens: 2, completionTokens: 0 } });
    await m.dispose();
  });

  test("an AbortSignal ends generation with 'abort'", async () => {
    const m = await loadModel(dir, { device: "cpu" });
    const ac = new AbortController();
    const it = m.stream([1, 2], { maxNewTokens: 10, signal: ac.signal });
    let n = 0;
    let result;
    for (;;) {
      const s = await it.next();
      if (s.done) {
        result = s.value;
        break;
      }
      if (++n === 3) ac.abort();
    }
    expect(result.finishReason).toBe("abort");
    expect(result.tokens).toHaveLength(3);
    const pre = new AbortController();
    pre.abort();
    expect((await m.generate([1, 2], { signal: pre.signal })).finishReason).toBe("abort");
    await m[Symbol.asyncDispose]();
    expect(m.disposed).toBe(true);
  });
});

test("the event loop keeps turning while the forward runs", async () => {
  const m = await loadModel(writeTinyModel({ layerTypes: "0_3_3_3", hidden: 256, intermediate: 1024, heads: 8, kvHeads: 4, vocab: 512, maxPositions: 512, seed: 9 }), {
    device: "cpu",
    threads: 1,
  });
  let ticks = 0;
  const timer = setInterval(() => ticks++, 1);
  const t0 = Date.now();
  await m.logits(Array.from({ length: 384 }, (_, i) => (i * 7) % 512), { prefill: "sequential" });
  const ms = Date.now() - t0;
  clearInterval(timer);
  await m.dispose();
  // A blocked loop would tick at most once; a free one ticks about every millisecond.
  expect(ms).toBeGreaterThan(30);
  expect(ticks).toBeGreaterThan(Math.min(10, ms / 10));
});

test.each([
  // per KV layer and token: 2 KV heads x 8 dims x (K and V) x bytes per value, plus one
  // (K, V) pair of f16 scales per KV head for fp8 and int8; int4 keeps one f16 V scale per KV
  // head and one f16 K scale per channel over a page of 16 tokens
  ["f32", 2 * 2 * 8 * 4],
  ["bf16", 2 * 2 * 8 * 2],
  ["fp8", 2 * 2 * 8 + 2 * 4],
  ["int8", 2 * 2 * 8 + 2 * 4],
  ["int4", (2 * 2 * 8) / 2 + (2 * 8 * 2) / 16 + 2 * 2],
] as const)("kvBytesPerToken counts only the KV layers, in the cache's type (%s)", async (kvCacheDtype, perLayer) => {
  const std = await loadModel(writeTinyModel({}), { device: "cpu", kvCacheDtype });
  const lckv = await loadModel(writeTinyModel({ layerTypes: "0_3_3_3" }), { device: "cpu", kvCacheDtype });
  expect(std.kvCacheDtype).toBe(kvCacheDtype);
  expect(std.kvBytesPerToken).toBe(4 * perLayer);
  expect(lckv.kvBytesPerToken).toBe(2 * perLayer);
  expect(lckv.standardKvBytesPerToken).toBe(std.kvBytesPerToken);
  expect(lckv.config.kvLayers).toEqual([0, 3]);
  await std.dispose();
  await lckv.dispose();
});

test("the K/V cache is bf16 by default", async () => {
  const m = await loadModel(writeTinyModel({}), { device: "cpu" });
  expect(m.kvCacheDtype).toBe("bf16");
  expect(m.kvBytesPerToken).toBe(4 * 2 * 2 * 8 * 2);
  await m.dispose();
});

test("a generation without a context shift ends where prompt and completion fill the context, and no token past it", async () => {
  const m = await loadModel(writeTinyModel({ seed: 5, maxPositions: 48 }), { device: "cpu", prefixCache: 0 });
  try {
    expect(m.maxContext).toBe(48);
    const prompt = [1, 2, 3, 4, 5, 6, 7];
    const r = await m.generate(prompt, { maxNewTokens: 100, temperature: 0, ignoreEos: true });
    expect(r.finishReason).toBe("length");
    expect(prompt.length + r.tokens.length).toBe(48);
    // The same through a sequence: it ends holding exactly the context, and a further request
    // gets no token (the step that would sample past the context does not run).
    const seq = m.createSequence();
    await seq.append(prompt);
    const r2 = await seq.generate({ maxNewTokens: 100, temperature: 0, ignoreEos: true }).result;
    expect(r2.tokens).toEqual(r.tokens);
    expect(seq.length).toBe(48);
    const more = await seq.generate({ maxNewTokens: 5, temperature: 0, ignoreEos: true }).result;
    expect(more.tokens).toEqual([]);
    expect(more.finishReason).toBe("length");
    expect(seq.length).toBe(48);
    seq.dispose();
    // A prompt that fills the context alone leaves no room for a token: refused before any work
    // (as vLLM refuses one of max_model_len tokens), by stream() and streamMany() alike.
    const full = Array.from({ length: 48 }, (_, i) => (i % 7) + 1);
    const many = await Promise.all(m.streamMany(full, 2, { maxNewTokens: 4 }).map((st) => st.result.catch((x) => x)));
    for (const e of [await m.generate(full, { maxNewTokens: 4 }).catch((x) => x), ...many]) {
      expect(e).toBeInstanceOf(ContextOverflowError);
      expect(e.message).toBe("prompt has 48 tokens and the context holds 48: that leaves no room for a reply");
    }
    // ... unless it asks for no token, or shifts its context to make room.
    expect((await m.generate(full, { maxNewTokens: 0 })).tokens).toEqual([]);
    expect((await m.generate(full, { maxNewTokens: 3, contextShift: "sink-window", sinkTokens: 16, ignoreEos: true })).tokens).toHaveLength(3);
    expect(m.cacheStats().liveSequences).toBe(0);
    expect(m.auditCache()).toBe("");
  } finally {
    await m.dispose();
  }
});

test("with the same kvCacheMemory an LCKV model's context holds numLayers / kvLayers times the tokens", async () => {
  const budget = 256 * 1024;
  const std = await loadModel(writeTinyModel({ numLayers: 6, maxPositions: 4096 }), { device: "cpu", kvCacheMemory: budget });
  const lckv = await loadModel(writeTinyModel({ layerTypes: "0_4_4_4_4_5", numLayers: 6, maxPositions: 4096 }), { device: "cpu", kvCacheMemory: budget });
  // Whole pages of 16 tokens: the pool holds floor(budget / pageBytes) of them.
  const pages = (m: typeof std) => Math.floor(budget / (m.kvBytesPerToken * KV_PAGE_TOKENS));
  expect(std.maxContext).toBe(pages(std) * KV_PAGE_TOKENS);
  expect(lckv.maxContext).toBe(pages(lckv) * KV_PAGE_TOKENS);
  expect(lckv.maxContext / std.maxContext).toBeCloseTo(6 / 3, 1);
  // And the budget is enforced: a prompt beyond it is refused.
  await expect(std.generate(Array(std.maxContext + 1).fill(1))).rejects.toThrow(/context holds/);
  await std.dispose();
  await lckv.dispose();
});

test("a pool smaller than the model's context cuts it with a notice; a maxContext it cannot hold is refused", async () => {
  const dir = writeTinyModel({ numLayers: 2, maxPositions: 4096 });
  const budget = 64 * 1024;
  const written: string[] = [];
  const write = process.stderr.write;
  const quiet = process.env.LCKV_QUIET;
  delete process.env.LCKV_QUIET;
  process.stderr.write = ((chunk: string) => written.push(String(chunk)) > 0) as typeof process.stderr.write;
  let m: Model;
  try {
    m = await loadModel(dir, { device: "cpu", kvCacheMemory: budget });
  } finally {
    process.stderr.write = write;
    if (quiet !== undefined) process.env.LCKV_QUIET = quiet;
  }
  expect(m.maxContext).toBeLessThan(4096);
  expect(written.join("")).toBe(
    `lckv: the context is ${m.maxContext} tokens, not the model's 4096: the K/V pool (${budget} bytes) holds ${m.maxContext} tokens of one sequence (kvCacheMemory, lckv --kv-cache-memory, sets its size)\n`,
  );
  await m.dispose();
  const e = await loadModel(dir, { device: "cpu", kvCacheMemory: budget, maxContext: 4096 }).catch((x) => x);
  expect(e).toMatchObject({ code: "LCKV_INVALID_OPTION", option: "maxContext" });
  expect(e.message).toMatch(new RegExp(`4096 tokens do not fit: the K/V pool \\(${budget} bytes\\) holds ${m.maxContext} tokens of one sequence; raise kvCacheMemory \\(lckv --kv-cache-memory\\) or ask for at most ${m.maxContext}`));
  const fits = await loadModel(dir, { device: "cpu", kvCacheMemory: budget, maxContext: m.maxContext });
  expect(fits.maxContext).toBe(m.maxContext);
  await fits.dispose();
  // An int4 pool of no more pages than a sequence's residual holds no token: refused, not a context of 0.
  const probe = await loadModel(dir, { device: "cpu", kvCacheDtype: "int4" });
  const { pageBytes, residualPages } = probe.cacheStats();
  await probe.dispose();
  const none = await loadModel(dir, { device: "cpu", kvCacheDtype: "int4", kvCacheMemory: residualPages * pageBytes }).catch((x) => x);
  expect(none).toMatchObject({ code: "LCKV_INVALID_OPTION", option: "kvCacheMemory" });
  expect(none.message).toMatch(new RegExp(`are ${residualPages} K/V pages of ${pageBytes} bytes, and a sequence needs ${residualPages + 1}`));
  const one = await loadModel(dir, { device: "cpu", kvCacheDtype: "int4", kvCacheMemory: (residualPages + 1) * pageBytes });
  expect(one.maxContext).toBe(KV_PAGE_TOKENS);
  await one.dispose();
});

describe("generation_config.json defaults, as transformers reads them", () => {
  const withGenerationConfig = (g: object) => {
    const dir = writeTinyModel({ seed: 7, vocab: 64, maxPositions: 64 });
    fs.writeFileSync(path.join(dir, "generation_config.json"), JSON.stringify(g));
    return dir;
  };
  const prompt = [3, 14, 15, 9, 26, 5];

  test("max_length counts the prompt: without max_new_tokens, a request generates up to it", async () => {
    const m = await loadModel(withGenerationConfig({ max_length: 10 }), { device: "cpu" });
    const r = await m.generate(prompt, { ignoreEos: true });
    expect(r.tokens).toHaveLength(10 - prompt.length);
    expect(r.finishReason).toBe("length");
    // A sequence counts everything already in it.
    const seq = m.createSequence();
    await seq.append([...prompt, 7, 8]);
    let n = 0;
    for await (const c of seq.generate({ ignoreEos: true })) if (c.token !== null) n++;
    expect(n).toBe(2);
    seq.dispose();
    // max_new_tokens wins over it, and an explicit maxNewTokens over both.
    expect((await m.generate(prompt, { ignoreEos: true, maxNewTokens: 7 })).tokens).toHaveLength(7);
    await m.dispose();
    const both = await loadModel(withGenerationConfig({ max_length: 10, max_new_tokens: 3 }), { device: "cpu" });
    expect((await both.generate(prompt, { ignoreEos: true })).tokens).toHaveLength(3);
    await both.dispose();
  });

  test("do_sample false makes greedy the default, but a caller who samples gets the configured top_k", async () => {
    const m = await loadModel(withGenerationConfig({ do_sample: false, top_k: 1, top_p: 0.9 }), { device: "cpu" });
    const greedy = await m.generate(prompt, { maxNewTokens: 8, ignoreEos: true });
    expect(greedy.tokens).toEqual((await m.generate(prompt, { maxNewTokens: 8, ignoreEos: true, temperature: 0 })).tokens);
    // top_k 1 from the file: sampling at any temperature and seed gives the greedy tokens.
    for (const seed of [1, 2, 3]) {
      const sampled = await m.generate(prompt, { maxNewTokens: 8, ignoreEos: true, temperature: 5, seed });
      expect(sampled.tokens).toEqual(greedy.tokens);
    }
    await m.dispose();
  });
});

test("top-k keeps every token tied with the k-th logit, as transformers does", async () => {
  // Tied embeddings: making tokens b and c's rows copies of token a's gives all three the same
  // logit wherever a's is, and a is the greedy choice after this prompt.
  const spec = { seed: 7, vocab: 64, maxPositions: 64 };
  const prompt = [3, 14, 15, 9, 26, 5];
  const plain = await loadModel(writeTinyModel(spec), { device: "cpu" });
  const a = (await plain.generate(prompt, { maxNewTokens: 1, temperature: 0, ignoreEos: true })).tokens[0];
  await plain.dispose();
  const [b, c] = [0, 1, 2, 40, 41, 42].filter((t) => t !== a && !prompt.includes(t)).slice(0, 2);
  const tensors = tinyLlamaTensors(spec);
  const embed = tensors.find((t) => t.name === "model.embed_tokens.weight")!;
  const E = embed.shape[1];
  for (const t of [b, c]) embed.data.copyWithin(t * E, a * E, (a + 1) * E);
  const m = await loadModel(writeTinyModel(spec, { tensors }), { device: "cpu" });
  const seen = new Set<number>();
  for (let seed = 0; seed < 60; seed++) {
    seen.add((await m.generate(prompt, { maxNewTokens: 1, temperature: 1, topK: 1, seed, ignoreEos: true })).tokens[0]);
  }
  // All three tied tokens are drawn (top-k cut at one id kept only the lowest), and nothing else.
  expect([...seen].sort((x, y) => x - y)).toEqual([a, b, c].sort((x, y) => x - y));
  await m.dispose();
});
