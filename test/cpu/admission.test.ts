/**
 * The queue for K/V pages never strands a request: whatever frees or makes evictable the pages
 * a waiting request needs lets it in, a sequence that holds pages does not queue behind a request
 * waiting for them, and an abort ends a wait. A wait that only the caller can end says so.
 */
import { spawnSync } from "node:child_process";
import * as path from "node:path";
import { AbortError, DisposedError, KV_PAGE_TOKENS, loadModel, Model } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";

const dir = writeTinyModel({ seed: 21, vocab: 256, maxPositions: 256 });
const prompt = (n: number, seed: number) => Array.from({ length: n }, (_, i) => ((i * 37 + seed * 11) % 250) + 2);
let pageBytes = 0;
beforeAll(async () => {
  const m = await loadModel(dir, { device: "cpu" });
  pageBytes = m.kvBytesPerToken * KV_PAGE_TOKENS;
  await m.dispose();
});
const withPages = (pages: number, more = {}) => loadModel(dir, { device: "cpu", kvCacheMemory: pages * pageBytes, ...more });

/** p, or a rejection after ms (a hang shows as a failure, not a stuck test run). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} did not settle in ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

test("a request queued behind one that then goes to the prefix cache is let in (its pages are evicted)", async () => {
  const m = await withPages(4);
  const a = m.generate(prompt(20, 1), { maxNewTokens: 40, ignoreEos: true }); // all 4 pages
  const b = m.generate(prompt(10, 2), { maxNewTokens: 20, ignoreEos: true }); // waits
  expect((await a).tokens).toHaveLength(40);
  expect((await within(b, 10000, "the queued request")).tokens).toHaveLength(20);
  expect(m.auditCache()).toBe("");
  await m.dispose();
});

test("a sequence disposed while its decode step runs: the request queued for its pages runs", async () => {
  const m: Model = await withPages(4, { prefixCache: 0 });
  const s = m.createSequence();
  await s.append(prompt(20, 1));
  const gen = (async () => {
    try {
      for await (const c of s.generate({ maxNewTokens: 40, ignoreEos: true })) void c;
    } catch (e) {
      return e;
    }
    return null;
  })();
  await new Promise((r) => setImmediate(r));
  const b = m.generate(prompt(10, 2), { maxNewTokens: 20, ignoreEos: true });
  // Disposed from a timer once a few steps ran: while the scheduler's next step is in flight.
  const poll = setInterval(() => {
    if (m.schedulerStats().steps >= 3) {
      clearInterval(poll);
      s.dispose();
    }
  }, 0);
  expect(((await gen) as { code?: string } | null)?.code).toBe("LCKV_DISPOSED");
  expect((await within(b, 10000, "the queued request")).tokens).toHaveLength(20);
  await m.dispose();
});

test("the next turn of a sequence that holds pages does not queue behind a request waiting for them", async () => {
  const m = await withPages(8, { prefixCache: 0 });
  const chat = m.createSequence();
  await chat.append(prompt(40, 1));
  for await (const c of chat.generate({ maxNewTokens: 8, ignoreEos: true })) void c; // 3 pages held
  const waiting = m.generate(prompt(30, 2), { maxNewTokens: 60, ignoreEos: true }); // needs 6 of the 5 free
  await new Promise((r) => setTimeout(r, 20));
  expect(m.cacheStats().queued).toBe(1);
  await within(chat.append([3, 4, 5]), 10000, "the next turn's append");
  let n = 0;
  await within((async () => { for await (const c of chat.generate({ maxNewTokens: 10, ignoreEos: true })) void c, n++; })(), 10000, "the next turn");
  expect(n).toBe(10);
  chat.dispose(); // its pages let the waiting request in
  expect((await within(waiting, 10000, "the waiting request")).tokens).toHaveLength(60);
  await m.dispose();
});

test("an abort ends append() and forward() while they wait for pages (AbortError), and generate() with 'abort'", async () => {
  const m = await withPages(4, { prefixCache: 0 });
  const hog = m.createSequence();
  await hog.append(prompt(60, 1)); // all 4 pages
  const ac = new AbortController();
  const s = m.createSequence();
  const append = s.append(prompt(30, 2), { signal: ac.signal });
  const forward = m.forward(prompt(30, 3), { signal: ac.signal });
  const gen = m.generate(prompt(30, 4), { maxNewTokens: 5, signal: ac.signal });
  await new Promise((r) => setTimeout(r, 20));
  expect(m.cacheStats().queued).toBe(3);
  ac.abort();
  await expect(within(append, 5000, "append")).rejects.toThrow(AbortError);
  await expect(within(forward, 5000, "forward")).rejects.toThrow(AbortError);
  expect((await within(gen, 5000, "generate")).finishReason).toBe("abort");
  expect(m.cacheStats().queued).toBe(0);
  expect(s.length).toBe(0);
  await m.dispose();
});

test("a sequence disposed while its append() waits for pages leaves the queue at once with DisposedError", async () => {
  const m = await withPages(16, { prefixCache: 0, maxQueue: 2 });
  const hog = m.createSequence();
  await hog.append(prompt(200, 1)); // 13 of the 16 pages
  const ahead = m.generate(prompt(100, 2), { maxNewTokens: 4 }); // waits
  const seq = m.createSequence();
  const order: string[] = [];
  const appended = seq.append(prompt(60, 3)).catch((e) => (order.push("append failed"), e)); // waits behind it
  await new Promise((r) => setImmediate(r));
  expect(m.cacheStats().queued).toBe(2);
  seq.dispose();
  expect(m.cacheStats().queued).toBe(1);
  // Its slot of the queue is free again (maxQueue 2).
  const third = m.createSequence();
  const thirdAppended = third.append(prompt(20, 4));
  expect(m.cacheStats().queued).toBe(2);
  setImmediate(() => {
    order.push("pages freed");
    hog.dispose();
  });
  const e = await appended;
  expect(e).toBeInstanceOf(DisposedError);
  expect(e.message).toBe("the sequence has been disposed");
  expect((await within(ahead, 10000, "the request ahead")).tokens).toHaveLength(4);
  await within(thirdAppended, 10000, "the append behind it");
  expect(order).toEqual(["append failed", "pages freed"]);
  expect(m.auditCache()).toBe("");
  await m.dispose();
});

/** Runs `body` (JavaScript, in an async function with loadModel, m: a model of 4 pages) in a node of its own, for at most ms. */
function runAlone(body: string, ms: number) {
  const script = `
    const { loadModel, KV_PAGE_TOKENS } = require(${JSON.stringify(path.join(__dirname, "..", "..", "dist"))});
    (async () => {
      const probe = await loadModel(${JSON.stringify(dir)}, { device: "cpu" });
      const pageBytes = probe.kvBytesPerToken * KV_PAGE_TOKENS;
      await probe.dispose();
      const m = await loadModel(${JSON.stringify(dir)}, { device: "cpu", kvCacheMemory: 4 * pageBytes, prefixCache: 0 });
      ${body}
    })();`;
  return spawnSync(process.execPath, ["-e", script], { encoding: "utf8", timeout: ms, env: { ...process.env, LCKV_QUIET: "1" } });
}

test("a program whose request waits for pages it never frees stays alive and says why (once), instead of exiting with the request unsettled", () => {
  const r = runAlone(
    `const a = m.createSequence();
      await a.append(Array(60).fill(7));
      const b = m.createSequence();
      await b.append(Array(20).fill(7));
      const c = m.createSequence();
      c.append(Array(20).fill(8)).then(() => console.log("c settled"));
      console.log("b settled", await b.append(Array(20).fill(7)));`,
    8000,
  );
  // Killed by the timeout: still waiting, the warning said once, though a second request came to wait.
  expect(r.signal).toBe("SIGTERM");
  expect(r.stdout).toBe("");
  expect(r.stderr.match(/LckvKvWaitWarning/g)).toHaveLength(1);
  expect(r.stderr).toMatch(/LckvKvWaitWarning: lckv: (a request waits|2 requests wait) for K\/V pages, and no request in flight will give any back: sequences that are not running hold them \(4 of 4 pages held\)\. It waits until one of them is disposed or truncated \(loadModel's queueTimeout bounds the wait\)\./);
});

/** runAlone(body) ends by itself, prints `stdout`, and says nothing of a wait. */
function expectRunsQuietly(body: string, stdout: string): void {
  const r = runAlone(body, 60000);
  expect(r.status).toBe(0);
  expect(r.stdout).toBe(stdout);
  expect(r.stderr).not.toMatch(/LckvKvWaitWarning/);
}

test("a request waiting behind a running one says nothing and is let in", () => {
  expectRunsQuietly(
    `const running = m.generate(Array(20).fill(3), { maxNewTokens: 40, ignoreEos: true }); // all 4 pages
      const behind = m.generate(Array(10).fill(4), { maxNewTokens: 20, ignoreEos: true });
      console.log((await running).tokens.length, (await behind).tokens.length);
      await m.dispose();`,
    "40 20\n",
  );
});

test("two requests behind a generation whose sequence is disposed mid-step: the first is let in as the pages come back, and nothing is said of the second, which waits for it", () => {
  expectRunsQuietly(
    `const p = (n, s) => Array.from({ length: n }, (_, i) => ((i * 37 + s * 11) % 250) + 2);
      const s = m.createSequence();
      await s.append(p(20, 1));
      const gen = (async () => { try { for await (const c of s.generate({ maxNewTokens: 40, ignoreEos: true })) void c; } catch (e) { return e.code; } })();
      await new Promise((r) => setImmediate(r));
      const b = m.generate(p(10, 2), { maxNewTokens: 20, ignoreEos: true }); // 2 pages
      const c = m.generate(p(10, 3), { maxNewTokens: 30, ignoreEos: true }); // 3 pages, behind b
      const poll = setInterval(() => { if (m.schedulerStats().steps >= 3) { clearInterval(poll); s.dispose(); } }, 0);
      const code = await gen;
      const r = await Promise.all([b, c]);
      console.log(code, r.map((x) => x.tokens.length).join(" "));
      await m.dispose();`,
    "LCKV_DISPOSED 20 30\n",
  );
});

test("each wait that only the caller can end is said once: after the queue empties, the next such wait is said again", () => {
  const r = runAlone(
    `const a = m.createSequence();
      await a.append(Array(60).fill(7)); // all 4 pages
      const b = m.createSequence();
      const first = b.append(Array(40).fill(8));
      await new Promise((r) => setTimeout(r, 100));
      a.dispose();
      await first; // b now holds 3 pages, idle
      const c = m.createSequence();
      const second = c.append(Array(40).fill(9));
      await new Promise((r) => setTimeout(r, 100));
      b.dispose();
      await second;
      console.log("done", c.length);
      await m.dispose();`,
    60000,
  );
  expect(r.status).toBe(0);
  expect(r.stdout).toBe("done 40\n");
  expect(r.stderr.match(/LckvKvWaitWarning/g)).toHaveLength(2);
});

test("cacheStats().running counts requests prefilling or generating, and is 0 once the model is disposed", async () => {
  const m = await withPages(8, { prefixCache: 0 });
  const s = m.stream(prompt(10, 1), { maxNewTokens: 20, ignoreEos: true });
  await s.next(); // paused after its first chunk: still generating
  expect(m.cacheStats().running).toBe(1);
  await m.dispose();
  expect(m.cacheStats().running).toBe(0);
  await s.return();
});
