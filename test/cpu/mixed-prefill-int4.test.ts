/**
 * Mixed steps over an int4 K/V cache. int4 keeps the page a sequence is writing in bf16 (its
 * residual) and quantizes the page, keys per channel over its 16 tokens, once it is full, so a
 * sequence's rows in one step must lie in one page: the scheduler ends an int4 prompt's chunk at
 * its page, and the engine refuses rows that cross one. On the CPU a row's arithmetic does not
 * depend on the other rows of its step, so a prompt that goes in while another int4 stream
 * decodes holds the K/V of the prompt prefilled alone (a page at a time) and continues with its
 * greedy tokens and log-probabilities, bit for bit.
 */
import * as path from "node:path";
import { InvalidInputError, loadModel, Model } from "../../lib";
import { KV_PAGE_TOKENS } from "../../lib/admission";
import { DecodeScheduler } from "../../lib/scheduler";
import { alone, chunk, eachAlone, engineOf, feedBesideStream, nativeOf, pagePieces, prompt } from "../helpers/shared-steps";
import { expectAppendedTogetherAsAlone, expectEachAsAlone } from "../helpers/shared-step-checks";

process.env.LCKV_QUIET = "1";

const FIXTURES = path.join(__dirname, "..", "fixtures");
const P = KV_PAGE_TOKENS;
const NATIVE_SEQUENTIAL = { mode: "sequential", logits: "none" } as const;

describe.each(["llama-gqa-hd32", "llama-mha-hd16"])("%s, int4 K/V", (name) => {
  let m: Model;
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, name), { device: "cpu", threads: 1, prefixCache: 0, kvCacheDtype: "int4" });
    expect(m.config.plan.cyclicGroup).toBeNull();
    expect(engineOf(m).chunkPage).toBe(P);
  });
  afterAll(() => m.dispose());

  test("a prompt arriving while an int4 stream decodes goes in a page per step, and equals the prompt prefilled alone", async () => {
    // A prompt from position 0, and one after 5 tokens (its first chunk fills the rest of page 0).
    const head = prompt(m, 5, 7);
    const cases = [
      { before: [] as number[], ids: prompt(m, Math.floor(m.maxContext * 0.6), 1) },
      { before: head, ids: prompt(m, 50, 2) },
    ];
    for (const { before, ids } of cases) {
      const ref = await alone(m, ids, before);
      const s = m.createSequence();
      if (before.length) await s.append(before);
      const start = nativeOf(s).length;
      const fed = await feedBesideStream(m, () => s.append(ids));
      // Every row of the run but the pending token went in as rows of mixed steps, one step
      // between two of the stream's tokens, each step's chunk ending at the prompt's page.
      const run = before.length + ids.length - 1 - start;
      expect(fed.rows).toBe(run);
      for (const g of fed.during) expect(g.steps).toBe(1);
      expect(fed.carried).toEqual(pagePieces(start, run, P));
      expect(pagePieces(start, run, P).length).toBeGreaterThan(2);
      await expectEachAsAlone(m, [s], [ref]);
    }
  });

  test("concurrent int4 prompts share the steps, each a page at most per step, and each equals itself alone", async () => {
    const ps = [3, 21, 40, Math.floor(m.maxContext * 0.5)].map((n, i) => prompt(m, n, i + 11));
    const { during } = await expectAppendedTogetherAsAlone(m, ps, await eachAlone(m, ps));
    // A step carries at most a page of each prompt (and the chunk in all).
    for (const g of during) expect(g.prompt).toBeLessThanOrEqual(Math.min(chunk(m), ps.length * P));
    expect(Math.max(...during.map((g) => g.prompt))).toBeGreaterThan(P);
  });
});

describe("decodeBatch over an int4 cache: rows of one sequence in one page", () => {
  let m: Model;
  beforeAll(async () => {
    m = await loadModel(path.join(FIXTURES, "llama-gqa-hd32"), { device: "cpu", threads: 1, prefixCache: 0, kvCacheDtype: "int4" });
  });
  afterAll(() => m.dispose());

  test("a chunk that crosses its page is refused with a typed error, changing nothing; chunks up to each page's end equal the tokens appended alone", async () => {
    const nm = m.nativeModel();
    const p = prompt(m, 40, 3);
    const ref = nm.createSequence(m.maxContext);
    await ref.append(Int32Array.from(p), NATIVE_SEQUENTIAL);
    const a = nm.createSequence(m.maxContext);
    const b = nm.createSequence(m.maxContext);
    await a.append(Int32Array.of(1, 2, 3), NATIVE_SEQUENTIAL);
    await b.append(Int32Array.from(p.slice(0, 10)), NATIVE_SEQUENTIAL);
    const kvOf = (s: typeof a, n: number) =>
      m.config.plan.kvLayers.map((_, slot) => Array.from(new Uint32Array(s.readKv(slot, 0, n).buffer)));
    const aBefore = kvOf(a, 3), bBefore = kvOf(b, 10);
    // b at 10: 7 rows reach position 16, the next page's first.
    const e = await nm.decodeBatch([a, b], Int32Array.from([4, ...p.slice(10, 17)]), [], true, Int32Array.of(1, 7)).catch((x) => x);
    expect(e.code).toBe("LCKV_INVALID_ARGUMENT");
    expect(e.message).toMatch(/rows of sequence 1 must lie in one 16-token page of its int4 K\/V cache .*7 rows from position 10 cross into the next page/);
    expect([a.length, b.length]).toEqual([3, 10]);
    expect(kvOf(a, 3)).toEqual(aBefore);
    expect(kvOf(b, 10)).toEqual(bBefore);
    // To the page's end, a whole page, then the rest: each in one page.
    await nm.decodeBatch([a, b], Int32Array.from([4, ...p.slice(10, 16)]), [], true, Int32Array.of(1, 6));
    await nm.decodeBatch([a, b], Int32Array.from([5, ...p.slice(16, 32)]), [], true, Int32Array.of(1, 16));
    await nm.decodeBatch([b], Int32Array.from(p.slice(32)), [], true, Int32Array.of(8));
    expect([a.length, b.length]).toEqual([5, 40]);
    expect(kvOf(b, 40)).toEqual(kvOf(ref, 40));
    for (const s of [ref, a, b]) s.dispose();
    expect(m.auditCache()).toBe("");
  });

  test("a scheduler that did not cut chunks at pages gets the typed error, and the sequence stays as it was", async () => {
    // The model's scheduler ends an int4 chunk at its page; one built without chunkPage does not,
    // so its chunk reaches the engine's check, which refuses it before anything is written.
    const uncut = new DecodeScheduler(() => m.nativeModel(), 256, 64);
    const s = m.createSequence();
    const e = await uncut.append(nativeOf(s), prompt(m, 20, 5), undefined, true).catch((x) => x);
    expect(e).toBeInstanceOf(InvalidInputError);
    expect(e.code).toBe("LCKV_INVALID_ARGUMENT");
    expect(e.message).toMatch(/20 rows from position 0 cross into the next page/);
    expect(nativeOf(s).length).toBe(0);
    // The model's own scheduler takes the same tokens page by page.
    const steps = m.schedulerStats().steps;
    await engineOf(m).scheduler.append(nativeOf(s), prompt(m, 20, 5), undefined, true);
    expect(nativeOf(s).length).toBe(20);
    expect(m.schedulerStats().steps - steps).toBe(2);
    s.dispose();
    expect(m.auditCache()).toBe("");
  });
});
