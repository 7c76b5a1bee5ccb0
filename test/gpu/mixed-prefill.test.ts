/**
 * Mixed steps (chunked prefill) on the CUDA backend; test/cpu/mixed-prefill.test.ts has the CPU's.
 *
 * With f32 weights every matrix product is the GEMV, whose rows do not depend on the other rows
 * of the step, and the attention gives a chunk of 16 rows or more the prefill kernel, as the
 * prompt's own prefill call does (cuda::attentionParts): a prompt whose chunks all have 16 rows
 * or more then holds the K/V of the prompt prefilled alone, bit for bit, in an f32 and in a bf16
 * cache, and its greedy continuation run alone gives the same tokens and log-probabilities. The
 * prompts here are chosen so that every chunk has: the 16 or more of each short prompt fit one
 * chunk together, and a long prompt alone is cut at the chunk size. Decode rows batched together
 * are not bit-exact on the GPU (the attention's split-K plan follows the batch), so concurrent
 * continuations, and prompts cut where they share the chunk, are held to the same greedy tokens,
 * as the batch-invariance test holds a batch (test/gpu/fixtures.test.ts).
 *
 * With bf16 weights a step of more than 16 rows takes cuBLASLt on bf16 activations for every
 * row, so nothing there is exact against a prompt alone: the default model types are checked for
 * what mixing guarantees, a token in every step for the running stream and the prompt in whole
 * chunks. An int4 cache's chunk ends at its sequence's page, and its attention is the int4
 * decode launches for every row, whose split-K plan follows the step's rows: held to its pages,
 * to K/V near the prompt's own and to its greedy tokens.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { loadModel, Model } from "../../lib";
import { describeIfGpu } from "../helpers/device";
import { Alone, alone, chunk, continuation, eachAlone, engineOf, feedBesideStream, GREEDY, kvBits, nativeOf, pagePieces, prompt, promptRows } from "../helpers/shared-steps";
import { appendBesideRefusedChunk, expectAppendedTogetherAsAlone, expectCancelledPromptUndone, expectChunkShared, expectDisposeStopsPrompts, expectEachAsAlone, expectEveryModeMixes, expectGeneratedTogetherAsAlone } from "../helpers/shared-step-checks";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";
const FIXTURES = path.join(__dirname, "..", "fixtures");
const describeGpu = describeIfGpu("GPU mixed-prefill tests");

const EXACT = { device: "cuda", dtype: "f32", prefixCache: 0 } as const;

/** Prompts of 16 rows or more each (the last token stays pending), all of them within one chunk. */
function shortPrompts(m: Model): number[][] {
  const L = m.maxContext;
  return [17, 40, Math.floor(L * 0.55), L - 12].map((n, i) => prompt(m, n, i + 1));
}

/** A prompt of three whole chunks and half of one (its last token stays pending). */
function longPrompt(m: Model): number[] {
  return prompt(m, 3 * chunk(m) + chunk(m) / 2 + 1, 4);
}

/** llama-gqa-hd32 with a 4096-token context (RoPE takes any position): prompts of several chunks. */
function longContextFixture(): string {
  const src = path.join(FIXTURES, "llama-gqa-hd32");
  const dir = testTempDir("lckv-mixed-");
  for (const f of fs.readdirSync(src)) fs.copyFileSync(path.join(src, f), path.join(dir, f));
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8"));
  cfg.max_position_embeddings = 4096;
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(cfg));
  return dir;
}

describeGpu.each([
  ["llama-gqa-hd32", "f32"],
  ["llama-mha-hd16", "f32"],
  ["gpt2", "f32"],
  ["lckv-cla", "f32"],
  ["llama-gqa-hd32", "bf16"],
  ["lckv-cla", "bf16"],
] as const)("cuda, %s, f32 weights, %s K/V", (name, kvCacheDtype) => {
  let m: Model;
  let refs: Alone[];
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, name), { ...EXACT, kvCacheDtype });
    expect(m.config.plan.cyclicGroup).toBeNull();
    const ps = shortPrompts(m);
    expect(promptRows(ps)).toBeLessThanOrEqual(chunk(m));
    refs = await eachAlone(m, ps);
  });
  afterAll(() => m.dispose());

  test("concurrent prompts in mixed steps hold each prompt's K/V prefilled alone, bit for bit", async () => {
    // Continued one at a time, each decode step a row alone as the reference's were: the same logits.
    await expectAppendedTogetherAsAlone(m, shortPrompts(m), refs, { inTurn: true });
  });

  test("generate() of concurrent prompts gives the greedy tokens of each alone", async () => {
    // Decode rows batched together: the same greedy tokens, not bit for bit the log-probabilities.
    await expectGeneratedTogetherAsAlone(m, shortPrompts(m), refs, { logprobs: false });
  });
});

describeGpu("cuda, a 4096-token context, f32 weights and K/V: prompts of several chunks", () => {
  let dir: string;
  let m: Model;
  let p: number[];
  let ref: Alone;
  let head: number[];
  let refAfterHead: Alone;
  beforeAll(async () => {
    dir = longContextFixture();
    m = await loadModel(dir, { ...EXACT, kvCacheDtype: "f32" });
    expect(m.config.plan.cyclicGroup).toBeNull();
    p = longPrompt(m);
    // 19 rows: a prefill part in a mixed step, as in its own prefill call.
    head = prompt(m, 20, 9);
    ref = await alone(m, p);
    refAfterHead = await alone(m, p, head);
  });
  afterAll(async () => {
    await m?.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("a running stream gets a token in every step that carries a chunk; the prompt's K/V and continuation are its own alone", async () => {
    const run = p.length - 1;
    const s = m.createSequence();
    const { during, carried } = await feedBesideStream(m, () => s.append(p));
    // One step between two tokens of the stream: each step carried its row.
    for (const g of during) expect(g.steps).toBe(1);
    // The prompt went in whole chunks, one per step, each beside the stream's row.
    expect(carried).toEqual([chunk(m), chunk(m), chunk(m), run - 3 * chunk(m)]);
    await expectEachAsAlone(m, [s], [ref]);
  });

  test("every prefill mode mixes: without a cyclic group each is one exact pass", async () => {
    await expectEveryModeMixes(m, p, ref.kv);
  });

  test("prompts arriving together share the chunk: a step carries at most one chunk of prompt tokens", async () => {
    const ps = [40, chunk(m) + 100, p.length].map((n, i) => prompt(m, n, i + 5));
    const refs = await eachAlone(m, ps);
    const seqs = ps.map(() => m.createSequence());
    const fed = await feedBesideStream(m, () => Promise.all(seqs.map((s, i) => s.append(ps[i]))));
    expectChunkShared(m, fed, promptRows(ps), ps.length);
    // Cut where they shared a step, a part may have fewer than 16 rows (the decode kernel's):
    // the greedy tokens are the same.
    for (let i = 0; i < seqs.length; i++) expect((await continuation(seqs[i])).tokens).toEqual(refs[i].tokens);
    for (const s of seqs) s.dispose();
    expect(m.auditCache()).toBe("");
  });

  test("cancelling a prompt mid-way leaves its sequence as it was; appended again it is exact", async () => {
    await expectCancelledPromptUndone(m, head, p, chunk(m), { kv: refAfterHead.kv });
  });

  test("a chunk the engine refuses fails only its own prompt, whole; the step's other rows go on", async () => {
    // The failed step's rows run again alone, a prompt's chunk as one sequence's rows.
    const ps = [chunk(m) + 100, 2 * chunk(m)].map((n, i) => prompt(m, n, i + 7));
    const refs = await eachAlone(m, ps);
    const seqs = await appendBesideRefusedChunk(m, ps);
    for (let i = 0; i < seqs.length; i++) expect((await continuation(seqs[i])).tokens).toEqual(refs[i].tokens);
    for (const s of seqs) s.dispose();
    expect(m.auditCache()).toBe("");
  });

  test("disposing the model stops prompts in mixed steps with DisposedError", async () => {
    const m2 = await loadModel(dir, { ...EXACT, kvCacheDtype: "f32" });
    // Long prompts: each takes several steps, so both are mid-way when the model goes.
    await expectDisposeStopsPrompts(m2, [longPrompt(m2), longPrompt(m2).reverse()], 1);
  });
});

describeGpu("cuda, a 4096-token context, the default weights and K/V (bf16)", () => {
  let dir: string;
  let m: Model;
  beforeAll(async () => {
    dir = longContextFixture();
    m = await loadModel(dir, { device: "cuda", prefixCache: 0 });
  });
  afterAll(async () => {
    await m?.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("a running stream gets a token in every step that carries a chunk, and the prompt goes in whole chunks", async () => {
    const p = longPrompt(m);
    const run = p.length - 1;
    const s = m.createSequence();
    const { during, carried } = await feedBesideStream(m, () => s.append(p));
    for (const g of during) expect(g.steps).toBe(1);
    expect(carried).toEqual([chunk(m), chunk(m), chunk(m), run - 3 * chunk(m)]);
    expect(s.exact).toBe(true);
    const g = await continuation(s);
    expect(g.tokens.length).toBe(GREEDY.maxNewTokens);
    s.dispose();
    expect(m.auditCache()).toBe("");
  });
});

/** ||b - a|| / ||a|| of two K/V bit patterns (kvBits) read as floats. */
function kvRelError(a: number[][], b: number[][]): number {
  let num = 0, den = 0;
  a.forEach((slot, i) => {
    const x = new Float32Array(Uint32Array.from(slot).buffer), y = new Float32Array(Uint32Array.from(b[i]).buffer);
    expect(y.length).toBe(x.length);
    x.forEach((v, j) => {
      num += (y[j] - v) ** 2;
      den += v * v;
    });
  });
  return Math.sqrt(num / den);
}

describeGpu("cuda, llama-gqa-hd32, f32 weights, int4 K/V: a prompt's chunks end at its pages", () => {
  let m: Model;
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, "llama-gqa-hd32"), { ...EXACT, kvCacheDtype: "int4" });
  });
  afterAll(() => m.dispose());

  // Every row of an int4 attention call takes the two int4 decode launches, whose split-K plan
  // follows the call's rows: a chunk's K/V past the first layer is close to its prefill alone
  // (a page a call), not bit for bit.
  test("a prompt arriving while an int4 stream decodes goes in a page per step, near its prefill alone, with its greedy tokens", async () => {
    const head = prompt(m, 5, 7);
    const p = prompt(m, Math.floor(m.maxContext * 0.6), 2);
    const ref = await alone(m, p, head);
    const s = m.createSequence();
    await s.append(head);
    const start = nativeOf(s).length;
    const fed = await feedBesideStream(m, () => s.append(p));
    const run = head.length + p.length - 1 - start;
    expect(fed.rows).toBe(run);
    for (const g of fed.during) expect(g.steps).toBe(1);
    expect(fed.carried).toEqual(pagePieces(start, run, engineOf(m).chunkPage));
    expect(kvRelError(ref.kv, kvBits(m, s, s.length - 1))).toBeLessThan(1e-2);
    expect((await continuation(s)).tokens).toEqual(ref.tokens);
    s.dispose();
    expect(m.auditCache()).toBe("");
  });
});
