/**
 * Run-ahead's early pages on the CPU backend. A decode call that will queue the next step on the
 * GPU also takes the page of each sequence's next position (Model::decodeBatch); the CPU queues
 * nothing, so the addon's setCpuQueuedSampling(true) makes it hand out its token choices as a GPU
 * does (cpu_backend.cpp), and the same page bookkeeping runs here: what a failed batch leaves,
 * what a reservation keeps, and which row's page comes first (test/helpers/early-page-checks.ts;
 * test/gpu/run-ahead.test.ts runs the same checks and the steps ahead themselves).
 */
import { loadModel, LoadOptions } from "../../lib";
import { loadAddon } from "../../lib/native";
import {
  earlyPagePrompt,
  expectEarlyPage,
  expectFailedBatchKeepsPool,
  expectOwnPagesFirst,
  expectReservationKept,
} from "../helpers/early-page-checks";
import { writeTinyModel } from "../helpers/tiny-model";

const dir = writeTinyModel({ seed: 61, hidden: 64, vocab: 256, maxPositions: 512 });
const addon = loadAddon();
beforeAll(() => addon.setCpuQueuedSampling(true));  // read when a model loads
afterAll(() => addon.setCpuQueuedSampling(false));  // the worker's next test file loads without it

async function withPages(pages: number, options: LoadOptions = {}) {
  const probe = await loadModel(dir, { device: "cpu", dtype: "f32", prefixCache: 0 });
  const pageBytes = probe.kvBytesPerToken * 16;
  await probe.dispose();
  return loadModel(dir, { device: "cpu", dtype: "f32", prefixCache: 0, kvCacheMemory: pages * pageBytes, ...options });
}

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
