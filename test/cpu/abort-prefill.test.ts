/**
 * An AbortSignal stops a prefill inside the engine (between passes of the cyclic group and
 * between tokens), not after it: the call ends promptly and the sequence is as it was.
 */
import { AbortError, DisposedError, loadModel, Model } from "../../lib";

process.env.LCKV_QUIET = "1";

let model: Model;
beforeAll(async () => {
  model = await loadModel(undefined, { device: "cpu", threads: 1 });
});
afterAll(() => model.dispose());

// 1000 passes of the shipped model's cyclic group over 200 tokens: minutes of work on a small CPU.
const prompt = Array.from({ length: 200 }, (_, i) => 10 + ((i * 37) % 500));
const slow = { prefill: "iterative" as const, prefillPasses: 1000 };

async function timed<T>(p: Promise<T>): Promise<{ value?: T; error?: any; ms: number }> {
  const t0 = Date.now();
  try {
    return { value: await p, ms: Date.now() - t0 };
  } catch (error) {
    return { error, ms: Date.now() - t0 };
  }
}

test("the slow prefill used below would take well over the bounds below unaborted", async () => {
  const seq = model.createSequence();
  const r = await timed(seq.append(prompt, { ...slow, prefillPasses: 10 }));
  expect(r.error).toBeUndefined();
  expect(r.value!.passes).toBe(10);
  // 1000 passes cost a hundred times this.
  expect(r.ms * 100).toBeGreaterThan(5 * 1500);
  seq.dispose();
});

test("append(): aborting mid-prefill rejects with AbortError soon, and leaves the sequence as it was", async () => {
  const seq = model.createSequence();
  await seq.append([1, 5, 9]);
  const before = seq.tokens;
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 50);
  const r = await timed(seq.append(prompt, { ...slow, signal: ac.signal }));
  expect(r.error).toBeInstanceOf(AbortError);
  expect(r.error.code).toBe("LCKV_ABORTED");
  expect(r.ms).toBeLessThan(1500);
  expect(seq.tokens).toEqual(before);
  // The sequence and the model go on: the same append, unaborted, gives the tokens of one run.
  await seq.append([7, 8]);
  expect(seq.tokens).toEqual([...before, 7, 8]);
  expect(model.auditCache()).toBe("");
  seq.dispose();
});

test("an already aborted signal stops append() before any work", async () => {
  const seq = model.createSequence();
  await expect(seq.append(prompt, { ...slow, signal: AbortSignal.abort() })).rejects.toThrow(AbortError);
  expect(seq.length).toBe(0);
  seq.dispose();
});

test("generate(): a signal that fires during the prompt's prefill ends the request with finishReason 'abort'", async () => {
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 50);
  const r = await timed(model.generate(prompt, { ...slow, maxNewTokens: 4, signal: ac.signal }));
  expect(r.error).toBeUndefined();
  expect(r.value!.finishReason).toBe("abort");
  expect(r.value!.tokens).toEqual([]);
  expect(r.ms).toBeLessThan(1500);
  expect(model.cacheStats().pagesReserved).toBe(0);
});

test("logits(): aborting rejects with AbortError", async () => {
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 50);
  const r = await timed(model.logits(prompt, { ...slow, signal: ac.signal }));
  expect(r.error).toBeInstanceOf(AbortError);
  expect(r.ms).toBeLessThan(1500);
});

test("dispose() cancels running prefills: they reject with DisposedError and dispose() settles soon", async () => {
  const m = await loadModel(undefined, { device: "cpu", threads: 1 });
  const seq = m.createSequence();
  const running = [
    timed(seq.append(prompt, slow)),  // a sequence's own prefill
    timed(m.generate(prompt, { ...slow, maxNewTokens: 1 })),  // a request's
    timed(m.forward(prompt, slow)),  // a one-off forward
  ];
  await new Promise((r) => setTimeout(r, 50));
  const t0 = Date.now();
  await m.dispose();
  const disposeMs = Date.now() - t0;
  // Unaborted, each would run for minutes (the first test); cancelled, they stop at the next pass.
  expect(disposeMs).toBeLessThan(1500);
  for (const r of await Promise.all(running)) {
    expect(r.error).toBeInstanceOf(DisposedError);
    expect(r.ms).toBeLessThan(1500 + 50);
  }
  await expect(m.generate([1, 2, 3])).rejects.toThrow(DisposedError);
});

test("a second dispose() settles only once the prefills the first cancelled have stopped", async () => {
  const m = await loadModel(undefined, { device: "cpu", threads: 1 });
  const order: string[] = [];
  const running = m.forward(prompt, slow).catch((e) => (order.push("forward stopped"), e));
  await new Promise((r) => setTimeout(r, 50));
  const first = m.dispose();
  await m.dispose();
  order.push("second dispose settled");
  expect(await running).toBeInstanceOf(DisposedError);
  await first;
  expect(order).toEqual(["forward stopped", "second dispose settled"]);
});
