/**
 * Failure atomicity of the K/V cache, for every kvCacheDtype: a failed operation (a cancelled
 * append, a full pool, a refused chunk) leaves the sequence reading back as before — its length,
 * the K/V bits of every slot (readKv), where it rewinds exactly (exactRewind) — the pool's
 * accounting adds up, and continuing gives the logits of a sequence that never saw the failure.
 * int4 is the type with state beyond its pages (the residual: kv_format.h), hence the cases of
 * where the append starts relative to the residual's page.
 */
import { loadModel, Model } from "../../lib";
import type { KvCacheDtype } from "../../lib/kv-cache-dtype";
import type { NativeModel, NativeSequence } from "../../lib/native";
import { writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";

const P = 16;
const DTYPES: KvCacheDtype[] = ["f32", "bf16", "int8", "int4"];
const tokens = Array.from({ length: 200 }, (_, i) => (i * 13 + 7) % 64);
const NONE = { mode: "sequential", logits: "none" } as const;
const dir = writeTinyModel({ seed: 71, maxPositions: 256 });

function cancelled(): Int32Array {
  const c = new Int32Array(new SharedArrayBuffer(4));
  c[0] = 1;
  return c;
}

const bits = (a: Float32Array) => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));

/** What a sequence reads back: its length, every slot's K/V bits, and where it rewinds exactly. */
function state(m: Model, s: NativeSequence) {
  const n = s.length;
  return {
    n,
    kv: m.config.plan.kvLayers.map((_, slot) => bits(s.readKv(slot, 0, n))),
    rewind: Array.from({ length: n + 1 }, (_, i) => s.exactRewind(i)),
  };
}

/**
 * `call` fails with the error `code` and leaves every sequence of `seqs` reading back as it did
 * (state()), and the cache consistent.
 */
async function expectFailureChangesNothing(m: Model, seqs: NativeSequence[], code: string, call: () => Promise<unknown>) {
  const before = seqs.map((s) => state(m, s));
  const e = await call().then(
    () => null,
    (x) => x,
  );
  expect(e?.code).toBe(code);
  expect(seqs.map((s) => state(m, s))).toEqual(before);
  expect(m.auditCache()).toBe("");
}

/** The logits of appending `more` to s. */
async function continueWith(s: NativeSequence, more: number[]) {
  const r = await s.append(Int32Array.from(more), { mode: "sequential", logits: "all" });
  return bits(r.logits!);
}

/**
 * Continues `s` (whose first n tokens are tokens[0, n)) with `more` and disposes it: its logits
 * must equal those of a fresh sequence of the same n tokens continued the same way.
 */
async function expectContinuesAsFresh(nm: NativeModel, s: NativeSequence, n: number, more: number[]) {
  const got = await continueWith(s, more);
  s.dispose();
  const twin = nm.createSequence(256);
  await twin.append(Int32Array.from(tokens.slice(0, n)), NONE);
  expect(got).toEqual(await continueWith(twin, more));
  twin.dispose();
}

describe.each(DTYPES)("%s cache", (dtype) => {
  let m: Model, nm: NativeModel;
  beforeAll(async () => {
    m = await loadModel(dir, { device: "cpu", kvCacheDtype: dtype, prefixCache: 0, threads: 1 });
    nm = m.nativeModel();
  });
  afterAll(() => m.dispose());

  const build = async (n: number) => {
    const s = nm.createSequence(m.maxContext);
    if (n > 0) await s.append(Int32Array.from(tokens.slice(0, n)), NONE);
    return s;
  };

  /** A cancelled append of k tokens leaves s as it was; continuing equals a twin's. */
  async function expectCancelChangesNothing(s: NativeSequence, twin: NativeSequence, k: number) {
    await expectFailureChangesNothing(m, [s], "LCKV_ABORTED", () =>
      s.append(Int32Array.from(tokens.slice(s.length, s.length + k)), { ...NONE, cancel: cancelled() }),
    );
    const more = tokens.slice(s.length, s.length + 20).map((t) => (t + 5) % 64);
    expect(await continueWith(s, more)).toEqual(await continueWith(twin, more));
    expect(state(m, s)).toEqual(state(m, twin));
  }

  test.each([0, 10, 16, 32, 41, 47])("a cancelled append at %i tokens", async (n) => {
    // 1 and 2 tokens: sequential pieces of one token each (at 47, 2 tokens cross a page) check the flag too.
    for (const k of [1, 2, 3, 5, 30]) {
      const s = await build(n), twin = await build(n);
      await expectCancelChangesNothing(s, twin, k);
      s.dispose();
      twin.dispose();
    }
  });

  test.each([
    [41, 20],
    [41, 36],
    [41, 32],
    [41, 16],
    [48, 40],
    [70, 3],
  ])("a cancelled append after truncating %i tokens to %i", async (n, to) => {
    for (const k of [3, 30]) {
      const s = await build(n), twin = await build(n);
      s.truncate(to);
      twin.truncate(to);
      await expectCancelChangesNothing(s, twin, k);
      s.dispose();
      twin.dispose();
    }
  });

  test.each([10, 16, 41, 48])("a cancelled append on a fork of %i tokens, and on its source", async (n) => {
    for (const k of [3, 30]) {
      const src = await build(n), twin = await build(n);
      const f = src.fork();
      const srcBefore = state(m, src);
      await expectCancelChangesNothing(f, twin, k);
      expect(state(m, src)).toEqual(srcBefore);
      const twin2 = await build(n);
      await expectCancelChangesNothing(src, twin2, k);
      for (const x of [src, f, twin, twin2]) x.dispose();
    }
  });

  test.each([
    [40, 16, 16],
    [50, 16, 16],
    [64, 0, 32],
  ])("a cancelled append after a context shift of %i tokens (sink %i, drop %i)", async (n, sink, drop) => {
    for (const k of [3, 30]) {
      const s = await build(n), twin = await build(n);
      await s.shift(sink, drop);
      await twin.shift(sink, drop);
      await expectCancelChangesNothing(s, twin, k);
      s.dispose();
      twin.dispose();
    }
  });
});

const GREEDY = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0 };

describe.each(DTYPES)("%s cache, a full pool", (dtype) => {
  /**
   * A model whose pool holds `pages` pages beyond the residuals of one sequence per entry of
   * `lengths`, and those sequences, holding the first tokens of that many tokens each.
   */
  /** The residual pages a sequence of this type holds (0 but for int4). */
  async function residualPages() {
    const probe = await loadModel(dir, { device: "cpu", kvCacheDtype: dtype, prefixCache: 0, threads: 1 });
    const R = probe.cacheStats().residualPages;
    await probe.dispose();
    return R;
  }

  async function small(pages: number, lengths: number[]) {
    const probe = await loadModel(dir, { device: "cpu", kvCacheDtype: dtype, prefixCache: 0, threads: 1 });
    const pageBytes = probe.kvBytesPerToken * P, R = probe.cacheStats().residualPages;
    await probe.dispose();
    const m = await loadModel(dir, { device: "cpu", kvCacheDtype: dtype, prefixCache: 0, threads: 1, kvCacheMemory: (pages + R * lengths.length) * pageBytes });
    const nm = m.nativeModel();
    const seqs: NativeSequence[] = [];
    for (const n of lengths) {
      seqs.push(nm.createSequence(256));
      await seqs[seqs.length - 1].append(Int32Array.from(tokens.slice(0, n)), NONE);
    }
    return { m, nm, seqs };
  }

  test("decodeBatch: a sequence at a page's end keeps its state when another in the batch finds the pool full", async () => {
    for (const n of [16, 32]) {
      // a and b at n tokens; one page left: a takes it, b finds none.
      const { m, nm, seqs: [a, b] } = await small(2 * (n / P) + 1, [n, n]);
      await expectFailureChangesNothing(m, [a, b], "LCKV_KV_CACHE_FULL", () => nm.decodeBatch([a, b], Int32Array.of(tokens[n], tokens[n]), [GREEDY, GREEDY]));
      b.dispose();
      await expectContinuesAsFresh(nm, a, n, tokens.slice(n, n + 8));
      await m.dispose();
    }
  });

  test("an append that crosses pages is refused up front when the pool is short", async () => {
    const { m, seqs: [s] } = await small(4, [41]);  // 3 pages
    await expectFailureChangesNothing(m, [s], "LCKV_KV_CACHE_FULL", () => s.append(Int32Array.from(tokens.slice(41, 71)), NONE));  // pages 3 and 4
    await s.append(Int32Array.from(tokens.slice(41, 48)), NONE);  // page 3 fits
    expect(m.auditCache()).toBe("");
    s.dispose();
    await m.dispose();
  });

  test("a fork's copy-on-write that finds the pool full leaves fork and source as they were", async () => {
    for (const n of [17, 41]) {
      // No page free: the fork's first write copies its partial page (and an int4 residual).
      const { m, nm, seqs: [src] } = await small(Math.ceil(n / P), [n]);
      const f = src.fork();
      await expectFailureChangesNothing(m, [src, f], "LCKV_KV_CACHE_FULL", () => f.append(Int32Array.from(tokens.slice(n, n + 20)), NONE));
      await expectFailureChangesNothing(m, [src, f], "LCKV_KV_CACHE_FULL", () => nm.decodeBatch([f], Int32Array.of(tokens[n]), [GREEDY]));
      // The source alone then continues as a fresh sequence would.
      f.dispose();
      await expectContinuesAsFresh(nm, src, n, tokens.slice(n, n + 3));
      await m.dispose();
    }
  });

  test("a failed batch gives a fork's reservation back less the copy-on-write it keeps", async () => {
    // f (a fork of src at 17 tokens) reserved its copy of the shared partial page (and an int4
    // residual); b at a page's end finds no page. f's copy stands in for the shared page after the
    // rollback, so f's reservation ends as what growing to 18 tokens still needs: none.
    const { m, nm, seqs: [src, b] } = await small(4 + (await residualPages()), [17, 16]);
    const f = src.fork();
    f.reserve(18);
    expect(f.reservedPages).toBeGreaterThan(0);
    const e = await nm.decodeBatch([f, b], Int32Array.of(tokens[17], tokens[16]), [GREEDY, GREEDY]).catch((x) => x);
    expect(e?.code).toBe("LCKV_KV_CACHE_FULL");
    expect(f.length).toBe(17);
    expect(f.pagesToReserve(18)).toBe(0);
    expect(f.reservedPages).toBe(0);
    expect(m.auditCache()).toBe("");
    // f's step needs no page now: the copy it kept is its own.
    await nm.decodeBatch([f], Int32Array.of(tokens[17]), [GREEDY]);
    expect(f.length).toBe(18);
    expect(m.auditCache()).toBe("");
    for (const s of [f, src, b]) s.dispose();
    await m.dispose();
  });

  test("a context shift whose copies find the pool full leaves fork and source as they were", async () => {
    const { m, seqs: [src] } = await small(4, [50]);
    const f = src.fork();
    await expectFailureChangesNothing(m, [src, f], "LCKV_KV_CACHE_FULL", () => f.shift(16, 16));
    f.dispose();
    src.dispose();
    await m.dispose();
  });
});

describe.each(DTYPES)("%s cache: Sequence.append aborted between its chunks", (dtype) => {
  test("rewinds exactly (int4: from its residual checkpoint) and continues as a sequence that never saw it", async () => {
    const m = await loadModel(dir, { device: "cpu", kvCacheDtype: dtype, prefixCache: 0, threads: 1 });
    const nativeOf = (s: unknown) => (s as { native: NativeSequence }).native;
    // The abort lands right after the first chunk went in (the engine counts each chunk).
    const engine = (m as unknown as { engine: { countPrefilled(n: number): void } }).engine;
    const count = engine.countPrefilled.bind(engine);
    try {
      for (const n of [42, 48, 33]) {  // 41 and 47 evaluated tokens: mid-page; 32: a page's end
        const s = m.createSequence(), twin = m.createSequence();
        await s.append(tokens.slice(0, n));
        await twin.append(tokens.slice(0, n));
        const before = state(m, nativeOf(s));
        const ctl = new AbortController();
        engine.countPrefilled = (k: number) => {
          count(k);
          ctl.abort();
        };
        // Longer than one chunk (64 tokens on the CPU): the first chunk fills the page s ends in.
        await expect(s.append(tokens.slice(n, n + 108), { signal: ctl.signal })).rejects.toThrow(/abort/i);
        engine.countPrefilled = count;
        expect(s.length).toBe(n);
        expect(state(m, nativeOf(s))).toEqual(before);
        expect(m.auditCache()).toBe("");
        const g = { maxNewTokens: 5, temperature: 0, ignoreEos: true };
        const gen = async (q: typeof s) => {
          const out: (number | null)[] = [];
          for await (const c of q.generate(g)) out.push(c.token);
          return out;
        };
        expect(await gen(s)).toEqual(await gen(twin));
        expect(state(m, nativeOf(s))).toEqual(state(m, nativeOf(twin)));
        s.dispose();
        twin.dispose();
      }
    } finally {
      engine.countPrefilled = count;
      await m.dispose();
    }
  });
});
