/**
 * Run-ahead's early pages on the CPU backend. A decode call that will queue the next step on the
 * GPU also takes the page of each sequence's next position (Model::decodeBatch); the CPU queues
 * nothing, so the addon's setCpuQueuedSampling(true) makes it hand out its token choices as a GPU
 * does (cpu_backend.cpp), and the same page bookkeeping runs here: what a failed batch leaves,
 * what a reservation keeps, and which row's page comes first (test/helpers/early-page-checks.ts;
 * test/gpu/run-ahead.test.ts runs the same checks and the steps ahead themselves).
 */
import * as path from "node:path";
import { loadModel } from "../../lib";
import { loadAddon } from "../../lib/native";
import {
  earlyPageLoader,
  earlyPagePrompt,
  expectEarlyPage,
  expectFailedBatchKeepsPool,
  expectOwnPagesFirst,
  expectReservationKept,
} from "../helpers/early-page-checks";

const withPages = earlyPageLoader("cpu");
const addon = loadAddon();
beforeAll(() => addon.setCpuQueuedSampling(true));  // read when a model loads
afterAll(() => addon.setCpuQueuedSampling(false));  // the worker's next test file loads without it

test("a step that could run ahead takes its sequence's next page early; without run-ahead it does not", () => expectEarlyPage(withPages));
test("a batch [a, b] refused by a full pool leaves the pool as it was, a's early page included", () => expectFailedBatchKeepsPool(withPages, true));
test("a batch [b, a] refused by a full pool leaves the pool as it was, a's early page included", () => expectFailedBatchKeepsPool(withPages, false));
test("a request keeps its reservation when a batch fails before its row's turn", () => expectReservationKept(withPages));
test("an early page never takes the page another row of the same step needs", () => expectOwnPagesFirst(withPages));

test("queued token choices give the tokens of the plain path, sequences of different lengths in one batch", async () => {
  const run = async (queued: boolean) => {
    addon.setCpuQueuedSampling(queued);
    const m = await withPages(40);
    addon.setCpuQueuedSampling(true);
    const out = await Promise.all([5, 12, 17, 30].map((n, i) => m.generate(earlyPagePrompt(m, n, i), { maxNewTokens: 24, temperature: 0 })));
    await m.dispose();
    return out.map((r) => r.tokens);
  };
  const plain = await run(false), queued = await run(true);
  expect(queued).toEqual(plain);
  expect(queued.every((t) => t.length === 24)).toBe(true);
});

test("a generation that stops early leaves no page past its end in the prefix cache", async () => {
  // The default model's text, stopped by a stop string at each of several points: where a stop
  // falls right after the step that took its next position's page early (the sequence's length a
  // multiple of 16), the kept sequence must hold no more pages than without run-ahead. (No
  // repetition penalty: a step that reads the history is never queued ahead.)
  const model = path.join(__dirname, "..", "..", "models", "default");
  const load = (runAhead: boolean) => loadModel(model, { device: "cpu", dtype: "f32", prefixCache: 1, runAhead });
  const plain = await load(false), ahead = await load(true);
  try {
    const prompt = "Once upon a time there was a";
    const options = { maxNewTokens: 48, temperature: 0, repetitionPenalty: 1 };
    const full = await plain.generate(prompt, { ...options, ignoreEos: true });
    const pieces = full.tokens.map((t) => plain.tokenizer!.decode([t]));
    const kept: { length: number; plain: number; ahead: number }[] = [];
    for (let k = 4; k < pieces.length; k++) {
      const stop = pieces[k];
      if (stop.trim().length < 3 || pieces.slice(0, k).join("").includes(stop)) continue;  // a stop first completed by token k
      const [p, a] = await Promise.all(
        [plain, ahead].map(async (m) => {
          const r = await m.generate(prompt, { ...options, stop });
          expect(r.finishReason).toBe("stop");
          return { pages: m.nativeModel().poolStats().pagesUsed, length: r.usage.promptTokens + r.usage.completionTokens - 1 };
        }),
      );
      kept.push({ length: p.length, plain: p.pages, ahead: a.pages });
    }
    expect(kept.some((c) => c.length % 16 === 0)).toBe(true);
    for (const c of kept) expect(c.ahead).toBe(c.plain);
  } finally {
    await plain.dispose();
    await ahead.dispose();
  }
});

test("a generation that ends at the context keeps no page past it, with or without run-ahead", async () => {
  // A context of 49 tokens: the step that fills it evaluates position 47 and samples the last
  // token, which stays pending; position 48's page (a fourth) must not be held after it.
  const model = path.join(__dirname, "..", "..", "models", "default");
  for (const runAhead of [false, true]) {
    const m = await loadModel(model, { device: "cpu", dtype: "f32", prefixCache: 1, runAhead, maxContext: 49 });
    try {
      const r = await m.generate("Once upon a time there was a", { maxNewTokens: 100, temperature: 0, ignoreEos: true });
      expect(r.usage.promptTokens + r.tokens.length).toBe(49);
      expect(r.finishReason).toBe("length");
      expect(m.cacheStats().pagesUsed).toBe(3);  // the prefix cache keeps its 48 evaluated tokens
      expect(m.auditCache()).toBe("");
    } finally {
      await m.dispose();
    }
  }
});
