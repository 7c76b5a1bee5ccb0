/**
 * Mixed steps over an int4 K/V cache. int4 keeps the page a sequence is writing in bf16 (its
 * residual) and quantizes the page, keys per channel over its 16 tokens, once it is full, so a
 * sequence's rows in one step must lie in one page: the engine refuses rows that cross one.
 */
import * as path from "node:path";
import { loadModel, Model } from "../../lib";
import { prompt } from "../helpers/shared-steps";

process.env.LCKV_QUIET = "1";

const FIXTURES = path.join(__dirname, "..", "fixtures");
const NATIVE_SEQUENTIAL = { mode: "sequential", logits: "none" } as const;

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
});
