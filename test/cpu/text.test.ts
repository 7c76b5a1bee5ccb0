/** Text in and out: tokenizer, chat template, streaming text, stop strings, generation_config defaults. */
import * as fs from "node:fs";
import * as path from "node:path";
import { InvalidInputError, loadModel, Model } from "../../lib";
import { collectStream } from "../helpers/stream";

process.env.LCKV_QUIET = "1";
const dir = path.join(__dirname, "..", "fixtures", "llama-mha-hd16");
const golden = JSON.parse(fs.readFileSync(path.join(dir, "golden.json"), "utf8"));

let model: Model;
beforeAll(async () => {
  model = await loadModel(dir, { device: "cpu" });
});
afterAll(() => model.dispose());

test("the chat template renders and tokenizes as the Python tokenizer did", () => {
  const text = model.tokenizer!.applyChatTemplate(golden.chat.messages, { addGenerationPrompt: true });
  expect(text).toBe(golden.chat.text);
  expect(model.tokenizer!.encode(text, { addSpecialTokens: false })).toEqual(golden.chat.ids);
});

test("chat() generates from the rendered template", async () => {
  const a = await model.chat(golden.chat.messages, { maxNewTokens: 6, temperature: 0 });
  const b = await model.generate(golden.chat.ids, { maxNewTokens: 6, temperature: 0 });
  expect(a.tokens).toEqual(b.tokens);
  expect(a.usage.promptTokens).toBe(golden.chat.ids.length);
  await expect(model.chat([{ role: "user" } as any])).rejects.toThrow(InvalidInputError);
});

test("a text prompt is the same as its token ids", async () => {
  const text = "It is a truth universally acknowledged";
  const ids = model.tokenizer!.encode(text);
  const a = await model.generate(text, { maxNewTokens: 8, temperature: 0 });
  const b = await model.generate(ids, { maxNewTokens: 8, temperature: 0 });
  expect(a.tokens).toEqual(b.tokens);
  expect(a.text).toBe(model.tokenizer!.decode(a.tokens));
});

test("streamed text chunks add up to the result text", async () => {
  const it = model.stream("Mr. Bennet", { maxNewTokens: 20, temperature: 0 });
  const { chunks, result } = await collectStream(it);
  const streamed = chunks.map((c) => c.text).join("");
  expect(streamed).toBe(result.text);
  expect(result.text).toBe(model.tokenizer!.decode(result.tokens));
});

test("a stop string ends generation before it", async () => {
  const full = await model.generate("Mr. Bennet", { maxNewTokens: 24, temperature: 0 });
  expect(full.text.length).toBeGreaterThan(6);
  // Stop at a piece of the text that first appears after its start.
  const stop = full.text.slice(3, 6);
  const at = full.text.indexOf(stop);
  const r = await model.generate("Mr. Bennet", { maxNewTokens: 24, temperature: 0, stop });
  expect(r.finishReason).toBe("stop");
  expect(r.text).toBe(full.text.slice(0, at));
  expect(r.tokens.length).toBeLessThanOrEqual(full.tokens.length);
  let streamed = "";
  for await (const c of model.stream("Mr. Bennet", { maxNewTokens: 24, temperature: 0, stop: ["zzzz", stop] })) streamed += c.text;
  expect(streamed).toBe(r.text);
});

test("generation_config.json supplies the defaults (sampling on, max_new_tokens 32)", async () => {
  const a = await model.generate("Elizabeth", { seed: 9 });
  const b = await model.generate("Elizabeth", { seed: 9 });
  const greedy = await model.generate("Elizabeth", { temperature: 0, ignoreEos: true });
  expect(a.tokens).toEqual(b.tokens);
  expect(greedy.tokens).toHaveLength(32);
  expect(a.tokens.length).toBeLessThanOrEqual(32);
});

test("the tokenizer knows its special tokens", () => {
  expect(model.tokenizer!.bosTokenId).toBe(0);
  expect(model.tokenizer!.eosTokenId).toBe(1);
  expect(model.eosTokenIds).toEqual([1]);
});
