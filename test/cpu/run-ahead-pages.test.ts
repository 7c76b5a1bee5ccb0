/**
 * Run-ahead's early pages on the CPU backend. A decode call that will queue the next step on the
 * GPU also takes the page of each sequence's next position (Model::decodeBatch); the CPU queues
 * nothing, so the addon's setCpuQueuedSampling(true) makes it hand out its token choices as a GPU
 * does (cpu_backend.cpp), and the same page bookkeeping runs here: what a failed batch leaves, what a
 * reservation keeps, and which row's page comes first. test/gpu/run-ahead.test.ts runs the
 * steps ahead themselves.
 */
import { loadModel, LoadOptions, Model } from "../../lib";
import { loadAddon, NativeSamplingParams, NativeSequence } from "../../lib/native";
import { writeTinyModel } from "../helpers/tiny-model";

const greedy: NativeSamplingParams = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };
const dir = writeTinyModel({ seed: 61, hidden: 64, vocab: 256, maxPositions: 512 });

const addon = loadAddon();
beforeAll(() => addon.setCpuQueuedSampling(true));  // read when a model loads
afterAll(() => addon.setCpuQueuedSampling(false));  // the worker's next test file loads without it

function prompt(model: Model, length: number, salt: number): number[] {
  return Array.from({ length }, (_, k) => (k * 31 + salt * 7 + 3) % model.config.vocabSize);
}
async function prefill(ns: NativeSequence, tokens: number[]): Promise<number> {
  const r = await ns.append(Int32Array.from(tokens), { mode: "sequential", passes: 1, tolerance: 0, logits: "none", sample: greedy });
  return r.token!;
}
// A model whose pool holds `pages` pages of 16 tokens.
async function withPages(pages: number, options: LoadOptions = {}): Promise<Model> {
  const probe = await loadModel(dir, { device: "cpu", dtype: "f32", prefixCache: 0 });
  const pageBytes = probe.kvBytesPerToken * 16;
  await probe.dispose();
  return loadModel(dir, { device: "cpu", dtype: "f32", prefixCache: 0, kvCacheMemory: pages * pageBytes, ...options });
}
// Decodes `seq` alone until it holds `length` tokens; returns its last token.
async function decodeTo(m: Model, seq: NativeSequence, token: number, length: number): Promise<number> {
  while (seq.length < length) token = (await m.nativeModel().decodeBatch([seq], Int32Array.of(token), [greedy]))[0];
  return token;
}

test("a step that could run ahead takes its sequence's next page early; without run-ahead it does not", async () => {
  for (const runAhead of [true, false]) {
    const m = await withPages(6, { runAhead });
    const nm = m.nativeModel();
    const a = nm.createSequence(m.maxContext);
    await decodeTo(m, a, await prefill(a, prompt(m, 14, 1)), 16);
    // 16 tokens fill page 0; position 16 opens page 1.
    expect(nm.poolStats().pagesUsed).toBe(runAhead ? 2 : 1);
    expect(nm.auditPool()).toBe("");
    a.dispose();
    await m.dispose();
  }
});

for (const order of ["a, b", "b, a"]) {
  test(`a batch [${order}] refused by a full pool leaves the pool as it was, a's early page included`, async () => {
    const m = await withPages(6);
    const nm = m.nativeModel();
    const a = nm.createSequence(m.maxContext), b = nm.createSequence(m.maxContext);
    const ta = await decodeTo(m, a, await prefill(a, prompt(m, 14, 1)), 16);  // pages 0 and (early) 1
    const tb = await prefill(b, prompt(m, 16 * (nm.poolStats().pagesTotal - 2), 2));  // every other page, full to its end
    const before = nm.poolStats();
    expect(before.pagesFree).toBe(0);
    const rows = order === "a, b" ? [a, b] : [b, a];
    const tokens = order === "a, b" ? [ta, tb] : [tb, ta];
    const e = await nm.decodeBatch(rows, Int32Array.from(tokens), [greedy, greedy]).then(() => null, (x) => x);
    expect(e?.code).toBe("LCKV_KV_CACHE_FULL");
    expect(nm.poolStats()).toEqual(before);
    expect(nm.auditPool()).toBe("");
    // a's page 1 is still its own: it decodes on with no page free.
    await nm.decodeBatch([a], Int32Array.of(ta), [greedy], false);
    expect(a.length).toBe(17);
    a.dispose();
    b.dispose();
    await m.dispose();
  });
}

test("a request keeps its reservation when a batch fails before its row's turn", async () => {
  const m = await withPages(8);
  const nm = m.nativeModel();
  const a = nm.createSequence(m.maxContext), b = nm.createSequence(m.maxContext);
  let ta = await prefill(a, prompt(m, 14, 1));
  a.reserve(48);  // promised the pages up to 48 tokens
  ta = await decodeTo(m, a, ta, 16);  // its page 1 taken early, from that promise
  let tb = await prefill(b, prompt(m, 16 * (nm.poolStats().pagesTotal - 3), 2));  // every page nobody is promised
  const e = await nm.decodeBatch([b, a], Int32Array.of(tb, ta), [greedy, greedy]).then(() => null, (x) => x);
  expect(e?.code).toBe("LCKV_KV_CACHE_FULL");
  // What the scheduler does next: each row alone, b without a page to spare.
  tb = (await nm.decodeBatch([b], Int32Array.of(tb), [greedy], false).catch(() => [tb]))[0];
  ta = await decodeTo(m, a, ta, 47);  // within its promise of 48: no LCKV_KV_CACHE_FULL
  expect(a.length).toBe(47);
  expect(nm.auditPool()).toBe("");
  a.dispose();
  b.dispose();
  await m.dispose();
});

test("an early page never takes the page another row of the same step needs", async () => {
  const m = await withPages(5);
  const nm = m.nativeModel();
  const a = nm.createSequence(m.maxContext), b = nm.createSequence(m.maxContext), c = nm.createSequence(m.maxContext);
  const ta = await prefill(a, prompt(m, 15, 1));  // page 0: writes 15 next, then 16 (a new page)
  const tb = await prefill(b, prompt(m, 32, 2));  // pages 1 and 2: writes 32 next (a new page)
  await prefill(c, prompt(m, 16, 3));  // page 3
  expect(nm.poolStats().pagesFree).toBe(1);
  await nm.decodeBatch([a, b], Int32Array.of(ta, tb), [greedy, greedy]);  // b's page, not a's early one
  expect([a.length, b.length]).toEqual([16, 33]);
  expect(nm.poolStats().pagesFree).toBe(0);
  expect(nm.auditPool()).toBe("");
  a.dispose();
  b.dispose();
  c.dispose();
  await m.dispose();
});

test("queued token choices give the tokens of the plain path, sequences of different lengths in one batch", async () => {
  const run = async (queued: boolean) => {
    addon.setCpuQueuedSampling(queued);
    const m = await withPages(40);
    addon.setCpuQueuedSampling(true);
    const out = await Promise.all([5, 12, 17, 30].map((n, i) => m.generate(prompt(m, n, i), { maxNewTokens: 24, temperature: 0 })));
    const stats = m.nativeModel().poolStats();
    await m.dispose();
    return { tokens: out.map((r) => r.tokens), stats };
  };
  const plain = await run(false), queued = await run(true);
  expect(queued.tokens).toEqual(plain.tokens);
  expect(queued.tokens.every((t) => t.length === 24)).toBe(true);
});
