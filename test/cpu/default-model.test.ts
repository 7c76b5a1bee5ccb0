/**
 * The shipped default model (models/default): its config, and a greedy continuation and
 * last-position logits against the PyTorch reference (scripts/reference/default_model_golden.py).
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { DEFAULT_MODEL_DIR, loadModel, Model } from "../../lib";
import { collectStream } from "../helpers/stream";

process.env.LCKV_QUIET = "1";
const golden = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "fixtures", "default-model.golden.json"), "utf8"));

let model: Model;
beforeAll(async () => {
  model = await loadModel(undefined, { device: "cpu" });
});
afterAll(() => model.dispose());

test("loadModel() with no directory loads the shipped LCKV model", () => {
  expect(model.directory).toBe(path.resolve(DEFAULT_MODEL_DIR));
  const c = model.config;
  expect(c.modelType).toBe("lckv-llama");
  expect(c.layerTypes).toEqual([0, 6, 6, 6, 6, 6, 6, 7]);
  expect(c.kvLayers).toEqual([0, 6, 7]);
  expect(c.plan.cyclicGroup).toEqual({ low: 1, high: 6 });
  expect(model.standardKvBytesPerToken / model.kvBytesPerToken).toBeCloseTo(8 / 3);
  // Under 16 MB on disk, as the project promises.
  const bytes = fs.readdirSync(model.directory).reduce((a, f) => a + fs.statSync(path.join(model.directory, f)).size, 0);
  expect(bytes).toBeLessThan(16 * 1024 * 1024);
});

test("the tokenizer gives the reference's prompt ids and round-trips text exactly", () => {
  expect(model.tokenizer!.encode(golden.prompt)).toEqual(golden.prompt_ids);
  for (const text of [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Mr. Speaker, Mr. Vice President, Members of Congress:\n\n  The state of our Union is strong.\r\n",
    "1:1 In the beginning God created the heaven and the earth.\t(KJV) ",
    "naïve café — “quotes”, 数字 12345, emoji 🙂 and trailing spaces   ",
  ]) {
    const ids = model.tokenizer!.encode(text, { addSpecialTokens: false });
    expect(model.tokenizer!.decode(ids)).toBe(text);
  }
});

/** The largest |logit error| of the prompt's last position against the reference, over the logits' scale. */
async function lastLogitError(m: Model): Promise<number> {
  const logits = await m.logits(golden.prompt_ids);
  const V = m.config.vocabSize;
  const last = logits.subarray((golden.prompt_ids.length - 1) * V);
  let err = 0;
  let scale = 0;
  for (let j = 0; j < V; j++) {
    err = Math.max(err, Math.abs(last[j] - golden.last_logits[j]));
    scale = Math.max(scale, Math.abs(golden.last_logits[j]));
  }
  return err / scale;
}

test("with an f32 cache, last-position logits and the 32-token greedy continuation match the PyTorch reference", async () => {
  const f32 = await loadModel(undefined, { device: "cpu", kvCacheDtype: "f32" });
  try {
    expect(await lastLogitError(f32)).toBeLessThanOrEqual(1e-4);
    const r = await f32.generate(golden.prompt_ids, { maxNewTokens: 32, temperature: 0, repetitionPenalty: 1, ignoreEos: true });
    expect(r.tokens).toEqual(golden.greedy.tokens);
    expect(r.text).toBe(golden.greedy.text);
  } finally {
    await f32.dispose();
  }
});

test("with the default bf16 cache, the logits stay within bf16's rounding of the reference and greedy is unchanged", async () => {
  expect(model.kvCacheDtype).toBe("bf16");
  // Measured 1.4e-3 (bf16 keeps 8 bits of each K/V value); f32 weights, so the cache alone.
  expect(await lastLogitError(model)).toBeLessThanOrEqual(5e-3);
  const r = await model.generate(golden.prompt_ids, { maxNewTokens: 32, temperature: 0, repetitionPenalty: 1, ignoreEos: true });
  expect(r.tokens).toEqual(golden.greedy.tokens);
});

test("text appended to a sequence that holds tokens gets no second BOS: two appends equal one prompt", async () => {
  const tok = model.tokenizer!;
  const first = tok.encode("The first chapter begins");
  expect(first[0]).toBe(tok.bosTokenId);
  const seq = model.createSequence();
  try {
    await seq.append("The first chapter begins");
    await seq.append(" Then the second chapter");
    const prompt = seq.tokens.slice();
    expect(prompt).toEqual(first.concat(tok.encode(" Then the second chapter", { addSpecialTokens: false })));
    expect(prompt.filter((t) => t === tok.bosTokenId)).toHaveLength(1);
    const greedy = { maxNewTokens: 8, temperature: 0, ignoreEos: true };
    let text = "";
    for await (const c of seq.generate(greedy)) text += c.text;
    expect(text).toBe((await model.generate(prompt, greedy)).text);
  } finally {
    seq.dispose();
  }
});

test("stream(): text held back for a possible stop string comes last with token null; the other chunks are the result's tokens", async () => {
  const it = model.stream("Once upon a time", { maxNewTokens: 8, temperature: 0, stop: [",X"] });
  const { chunks, result: r } = await collectStream(it);
  expect(chunks.map((c) => c.text).join("")).toBe(r.text);
  expect(chunks.filter((c) => c.token !== null).map((c) => c.token)).toEqual(r.tokens);
  // This prompt's greedy continuation ends its 8 tokens on "," (held: it could begin ",X").
  expect(chunks[chunks.length - 1]).toEqual({ text: ",", token: null });
});

test("stream(): the token that completes a stop string has its chunk too, so the chunks' tokens are the result's", async () => {
  // Greedy from this prompt: " by the people of the United ...": "ple of" ends inside " of".
  const it = model.stream("It was a truth universally acknowledged", { temperature: 0, maxNewTokens: 30, stop: ["ple of"] });
  const { chunks, result: r } = await collectStream(it);
  expect(r.finishReason).toBe("stop");
  expect(r.text).toBe(" by the peo");
  expect(chunks.map((c) => c.token)).toEqual(r.tokens);
  expect(chunks[chunks.length - 1].text).toBe("");
  expect(chunks.map((c) => c.text).join("")).toBe(r.text);
});
