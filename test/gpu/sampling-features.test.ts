/**
 * The serving features on the CUDA backend against the CPU backend, on every fixture (f32
 * weights on both, so the logits agree to f32 rounding): presence and frequency penalties, logit
 * bias and log-probabilities; a stream's result promise; n completions from one prefill; a chat
 * session that keeps its sequence between turns.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { loadModel, Model, StreamChunk } from "../../lib";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const FIXTURES = path.join(__dirname, "..", "fixtures");
const describeGpu = describeIfGpu("GPU sampling-feature tests");
const fixtures = fs.readdirSync(FIXTURES).filter((d) => fs.existsSync(path.join(FIXTURES, d, "golden.json"))).sort();

describeGpu.each(fixtures)("cuda sampling features: %s", (name) => {
  const dir = path.join(FIXTURES, name);
  const golden = JSON.parse(fs.readFileSync(path.join(dir, "golden.json"), "utf8"));
  const prompt: number[] = golden.greedy.prompt_ids;
  let cpu: Model, gpu: Model;
  beforeAll(async () => {
    cpu = await loadModel(dir, { device: "cpu", prefixCache: 0, kvCacheDtype: "f32" });
    gpu = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0, kvCacheDtype: "f32" });
  });
  afterAll(async () => {
    for (const m of [cpu, gpu]) await m?.dispose();
  });

  test("presence and frequency penalties and logit bias choose what the CPU chooses, greedy and sampled", async () => {
    const V = cpu.config.vocabSize;
    const banned = prompt[prompt.length - 1] % V;
    const favoured = (banned + 1) % V;
    for (const o of [
      { temperature: 0, presencePenalty: 0.8, frequencyPenalty: 0.5 },
      { temperature: 0, logitBias: { [banned]: -100, [favoured]: 2 } },
      { temperature: 0.9, seed: 21, presencePenalty: -0.5, frequencyPenalty: 1.5, logitBias: { [favoured]: 1 } },
    ]) {
      const opts = { maxNewTokens: 16, ignoreEos: true, ...o };
      const g = await gpu.generate(prompt, opts);
      expect(g.tokens).toEqual((await cpu.generate(prompt, opts)).tokens);
      if ("logitBias" in o && o.temperature === 0) expect(g.tokens).not.toContain(banned);
    }
  });

  test("log-probabilities: the chosen token's and the top 5 match the CPU's", async () => {
    const opts = { maxNewTokens: 8, temperature: 0, ignoreEos: true, logprobs: 5 };
    const g = await gpu.generate(prompt, opts);
    const c = await cpu.generate(prompt, opts);
    expect(g.tokens).toEqual(c.tokens);
    expect(g.logprobs).toHaveLength(c.logprobs!.length);
    g.logprobs!.forEach((lp, i) => {
      const want = c.logprobs![i];
      expect(lp.token).toBe(want.token);
      expect(Math.abs(lp.logprob - want.logprob)).toBeLessThanOrEqual(1e-4);
      expect(lp.topLogprobs).toHaveLength(5);
      lp.topLogprobs!.forEach((t, j) => {
        expect(Math.abs(t.logprob - want.topLogprobs![j].logprob)).toBeLessThanOrEqual(1e-4);
        // The same ids, unless two alternatives are a near tie.
        if (t.token !== want.topLogprobs![j].token) expect(Math.abs(want.topLogprobs![j].logprob - t.logprob)).toBeLessThanOrEqual(1e-4);
      });
    });
  });

  test("a stream's result promise, and n completions from one prefill", async () => {
    const opts = { maxNewTokens: 10, temperature: 0, ignoreEos: true };
    const stream = gpu.stream(prompt, opts);
    const seen: number[] = [];
    for await (const c of stream as AsyncIterable<StreamChunk>) if (c.token !== null) seen.push(c.token);
    const r = await stream.result;
    expect(r.tokens).toEqual(seen);
    expect(r.finishReason).toBe("length");
    expect(r.usage).toEqual({ promptTokens: prompt.length, completionTokens: 10 });
    expect(r.timings.totalMs).toBeGreaterThanOrEqual(r.timings.timeToFirstTokenMs);
    const p0 = gpu.cacheStats().prefilledTokens;
    const many = gpu.streamMany(prompt, 3, opts);
    const results = await Promise.all(many.map(async (s) => {
      for await (const _ of s as AsyncIterable<StreamChunk>) void _;
      return s.result;
    }));
    expect(gpu.cacheStats().prefilledTokens - p0).toBe(prompt.length - 1);  // one prefill for all three
    for (const x of results) expect(x.tokens).toEqual(r.tokens);
  });

  // Only the fixtures with a chat template: the others skip it (and say so), not pass it.
  const chatTemplate = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8")).chat_template !== undefined;
  (chatTemplate ? test : test.skip)("a chat session prefills only each turn's new tokens and replies as chat() does", async () => {
    const opts = { maxNewTokens: 6, temperature: 0 };
    using session = gpu.createChatSession();
    for await (const _ of session.send("hello there", opts) as AsyncIterable<StreamChunk>) void _;
    const before = gpu.cacheStats().prefilledTokens;
    const second = session.send("and then?", opts);
    for await (const _ of second as AsyncIterable<StreamChunk>) void _;
    const reply = await second.result;
    const tokenizer = gpu.tokenizer!;
    const whole = tokenizer.encode(tokenizer.applyChatTemplate([...session.messages.slice(0, -1)], { addGenerationPrompt: true }), { addSpecialTokens: false });
    expect(gpu.cacheStats().prefilledTokens - before).toBeLessThan(whole.length - 1);
    expect(reply.tokens).toEqual((await gpu.chat([...session.messages.slice(0, -1)], opts)).tokens);
  });
});
