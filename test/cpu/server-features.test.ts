/**
 * The server's pass-through of lckv's generation features: log-probabilities (chat's
 * `logprobs`/`top_logprobs`, completions' integer `logprobs`), presence and frequency penalties,
 * `logit_bias`, and `n` completions from one prefill (ctx.model.streamMany), streamed and not, with
 * their usage. These need the library's GenerateOptions.logprobs, presencePenalty,
 * frequencyPenalty and logitBias, StreamChunk.logprob/topLogprobs, and Model.streamMany.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import OpenAI from "openai";
import { DEFAULT_MODEL_DIR, GenerateOptions, loadModel, Model, ServerOptions } from "../../lib";
import { expectIdle, serverForFile, startServer } from "../helpers/openai-server";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";
const fixture = path.join(__dirname, "..", "fixtures", "llama-mha-hd16");
const user = (content: string) => [{ role: "user" as const, content }];

const ctx = serverForFile(fixture);
// The shipped model writes English-like text, in which a stop string such as "the" turns up.
const english = serverForFile(DEFAULT_MODEL_DIR);

test("chat logprobs: the chosen token and the top k, greedy picks the most likely; streamed as given", async () => {
  const r = await ctx.client.chat.completions.create({ model: "m", messages: user("Hello"), max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 3 });
  const content = r.choices[0].logprobs!.content!;
  expect(content).toHaveLength(r.usage!.completion_tokens);
  // The tokens' bytes, joined, are the reply's text: a token that holds part of a character
  // gives its own bytes (its text alone is U+FFFD).
  expect(Buffer.from(content.flatMap((t) => t.bytes!)).toString("utf8")).toBe(r.choices[0].message.content);
  for (const t of content) {
    expect(typeof t.token).toBe("string");
    if (!t.token.includes("\ufffd")) expect(t.bytes).toEqual([...Buffer.from(t.token, "utf8")]);
    expect(t.logprob).toBeLessThanOrEqual(0);
    expect(t.top_logprobs).toHaveLength(3);
    const lps = t.top_logprobs.map((x) => x.logprob);
    expect([...lps].sort((a, b) => b - a)).toEqual(lps);
    expect(t.logprob).toBeCloseTo(lps[0], 5);
  }
  const stream = await ctx.client.chat.completions.create({ model: "m", messages: user("Hello"), max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 3, stream: true });
  const streamed: unknown[] = [];
  for await (const c of stream) for (const ch of c.choices) streamed.push(...(ch.logprobs?.content ?? []));
  expect(streamed).toEqual(content);
  const chosenOnly = await ctx.client.chat.completions.create({ model: "m", messages: user("Hello"), max_tokens: 4, temperature: 0, logprobs: true });
  for (const t of chosenOnly.choices[0].logprobs!.content!) expect(t.top_logprobs).toEqual([]);
});

test("completions logprobs: tokens, their logprobs, the top k and the text offsets", async () => {
  const r = await ctx.client.completions.create({ model: "m", prompt: "Once upon", max_tokens: 6, temperature: 0, logprobs: 2 });
  const lp = r.choices[0].logprobs!;
  expect(lp.tokens).toHaveLength(r.usage!.completion_tokens);
  expect(lp.token_logprobs).toHaveLength(lp.tokens!.length);
  expect(lp.top_logprobs).toHaveLength(lp.tokens!.length);
  for (const top of lp.top_logprobs!) expect(Object.keys(top).length).toBeLessThanOrEqual(2);
  const offsets = lp.text_offset!;
  for (let i = 1; i < offsets.length; i++) expect(offsets[i]).toBeGreaterThanOrEqual(offsets[i - 1]);
});

type CompletionLogprobs = Required<OpenAI.CompletionChoice.Logprobs>;

/** A text completion's text and log-probabilities; streamed, the events' joined in order. */
async function completionLogprobs(client: OpenAI, params: OpenAI.CompletionCreateParamsNonStreaming, stream: boolean): Promise<{ text: string; lp: CompletionLogprobs; heldBack: boolean }> {
  if (!stream) {
    const r = await client.completions.create(params);
    return { text: r.choices[0].text, lp: r.choices[0].logprobs as CompletionLogprobs, heldBack: false };
  }
  const lp: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  let text = "";
  // Whether an event's text was not its tokens' (text held back, or released later).
  let heldBack = false;
  for await (const c of await client.completions.create({ ...params, stream: true })) {
    for (const ch of c.choices) {
      text += ch.text;
      const l = ch.logprobs as CompletionLogprobs | null;
      if (l) for (const k of Object.keys(lp) as (keyof CompletionLogprobs)[]) (lp[k] as unknown[]).push(...l[k]);
      if (l && ch.text !== l.tokens.join("")) heldBack = true;
    }
  }
  return { text, lp, heldBack };
}

/** The first `k` tokens' part of a completion's log-probabilities. */
function firstTokens(lp: CompletionLogprobs, k: number): CompletionLogprobs {
  return { tokens: lp.tokens.slice(0, k), token_logprobs: lp.token_logprobs.slice(0, k), top_logprobs: lp.top_logprobs.slice(0, k), text_offset: lp.text_offset.slice(0, k) };
}

/**
 * A completion cut by `stop` against the same completion (same seed) without it: the text up to
 * the stop string, and the log-probabilities of the tokens with text in it, at the same offsets.
 */
async function expectCutAtStop(client: OpenAI, params: OpenAI.CompletionCreateParamsNonStreaming, stop: string): Promise<void> {
  const whole = await completionLogprobs(client, params, false);
  // Each token's text is where its offset says (byte-level tokens decode alone as in the text).
  whole.lp.tokens.forEach((t, i) => expect(whole.text.startsWith(t, whole.lp.text_offset[i])).toBe(true));
  const cut = whole.text.indexOf(stop);
  expect(cut).toBeGreaterThan(0);
  const kept = whole.lp.text_offset.filter((o) => o < cut).length;
  for (const stream of [false, true]) {
    const r = await completionLogprobs(client, { ...params, stop }, stream);
    expect(r.text).toBe(whole.text.slice(0, cut));
    expect(r.lp).toEqual(firstTokens(whole.lp, kept));
  }
}

test("completions logprobs with a stop string: offsets in the returned text while text is held back, streamed and not", async () => {
  const params = { model: "m", prompt: "The", max_tokens: 50, seed: 9, temperature: 1, logprobs: 1 };
  // The text is held back while it may begin "the": a token's text shows later than its token.
  expect((await completionLogprobs(english.client, { ...params, stop: "the" }, true)).heldBack).toBe(true);
  await expectCutAtStop(english.client, params, "the");
});

test("completions logprobs with a stop string: tokens wholly inside the cut stop string are left out, streamed and not", async () => {
  const params = { model: "m", prompt: "Once upon a time", max_tokens: 40, seed: 2, temperature: 1, logprobs: 2 };
  const whole = await completionLogprobs(english.client, params, false);
  const { tokens, text_offset: offsets } = whole.lp;
  // Two tokens whose text first occurs where they are: as a stop string, both are cut away.
  const k = tokens.findIndex((t, i) => i > 0 && i + 1 < tokens.length && t !== "" && tokens[i + 1] !== "" && whole.text.indexOf(t + tokens[i + 1]) === offsets[i]);
  expect(k).toBeGreaterThan(0);
  await expectCutAtStop(english.client, params, tokens[k] + tokens[k + 1]);
  await expectIdle(english.model);
});

test("chat logprobs with a stop string: a token wholly inside the cut stop string is left out, streamed and not", async () => {
  const params = { model: "m", messages: user("Tell me a story"), max_tokens: 16, temperature: 0, logprobs: true, top_logprobs: 1 };
  const whole = await ctx.client.chat.completions.create(params);
  const text = whole.choices[0].message.content!;
  const entries = whole.choices[0].logprobs!.content!;
  // Where each token's text begins, up to the first token that is part of a character.
  const offsets: number[] = [];
  for (let i = 0, at = 0; i < entries.length && !entries[i].token.includes("\ufffd"); at += entries[i++].token.length) offsets.push(at);
  const k = offsets.findIndex((o, i) => i > 0 && entries[i].token !== "" && text.indexOf(entries[i].token) === o);
  expect(k).toBeGreaterThan(0);
  const stop = entries[k].token;
  const cut = await ctx.client.chat.completions.create({ ...params, stop });
  expect(cut.choices[0].message.content).toBe(text.slice(0, offsets[k]));
  expect(cut.choices[0].logprobs!.content).toEqual(entries.slice(0, k));
  let streamedText = "";
  const streamed: unknown[] = [];
  for await (const c of await ctx.client.chat.completions.create({ ...params, stop, stream: true })) {
    for (const ch of c.choices) {
      streamedText += ch.delta.content ?? "";
      streamed.push(...(ch.logprobs?.content ?? []));
    }
  }
  expect(streamedText).toBe(text.slice(0, offsets[k]));
  expect(streamed).toEqual(entries.slice(0, k));
  await expectIdle(ctx.model);
});

test("vLLM's and llama.cpp's top_k, min_p, repetition_penalty and ignore_eos give what the library's options give, on both endpoints", async () => {
  const eos = ctx.model.eosTokenIds[0];
  const forceEos = { [eos]: 100 };
  // Each field, the library's option it maps to, and the library's run without it.
  const cases: [Record<string, unknown>, GenerateOptions, GenerateOptions][] = [
    [{ top_k: 2 }, { topK: 2 }, {}],
    [{ top_k: -1 }, { topK: 0 }, {}],
    [{ min_p: 0.3 }, { minP: 0.3 }, {}],
    [{ repetition_penalty: 3 }, { repetitionPenalty: 3 }, {}],
    [{ ignore_eos: true, logit_bias: forceEos }, { ignoreEos: true, logitBias: forceEos }, { logitBias: forceEos }],
  ];
  const prompts = { completions: [5, 6, 7], chat: ctx.model.tokenizer!.encodeChat(user("Tell me")) };
  const base = { maxNewTokens: 12, temperature: 1, seed: 5 };
  for (const [fields, option, without] of cases) {
    for (const [endpoint, ids] of Object.entries(prompts)) {
      const lib = await ctx.model.generate(ids, { ...base, ...option });
      // The field changes what this request gets: a server that dropped it would differ.
      expect(lib.tokens).not.toEqual((await ctx.model.generate(ids, { ...base, ...without })).tokens);
      const params = { model: "m", max_tokens: base.maxNewTokens, temperature: base.temperature, seed: base.seed, ...fields };
      const served =
        endpoint === "chat"
          ? await ctx.client.chat.completions.create({ ...params, messages: user("Tell me") } as OpenAI.ChatCompletionCreateParamsNonStreaming).then((r) => ({ text: r.choices[0].message.content, finish: r.choices[0].finish_reason, usage: r.usage! }))
          : await ctx.client.completions.create({ ...params, prompt: ids } as OpenAI.CompletionCreateParamsNonStreaming).then((r) => ({ text: r.choices[0].text, finish: r.choices[0].finish_reason, usage: r.usage! }));
      expect(served.text).toBe(lib.text);
      expect(served.usage.completion_tokens).toBe(lib.usage.completionTokens);
      expect(served.finish).toBe(lib.finishReason);
    }
  }
  // An end-of-sequence token is generated, so usage counts it (as OpenAI and vLLM count it),
  // though the text does not hold it.
  const ended = await ctx.client.completions.create({ model: "m", prompt: prompts.completions, max_tokens: 5, logit_bias: forceEos });
  expect(ended.choices[0]).toMatchObject({ text: "", finish_reason: "stop" });
  expect(ended.usage!.completion_tokens).toBe(1);
  await expectIdle(ctx.model);
});

test("presence and frequency penalties are taken, and reproducible with a seed", async () => {
  const ask = () => ctx.client.completions.create({ model: "m", prompt: "The sea", max_tokens: 16, temperature: 0.8, seed: 3, presence_penalty: 1.5, frequency_penalty: 1 });
  const a = await ask();
  expect(a.choices[0].text).toBe((await ask()).choices[0].text);
  const neg = await ctx.client.completions.create({ model: "m", prompt: "The sea", max_tokens: 4, presence_penalty: -2, frequency_penalty: -2 });
  expect(neg.choices).toHaveLength(1);
});

test("logit_bias: +100 makes greedy pick the token every time; -100 bans greedy's first choice", async () => {
  const tok = ctx.model.tokenizer!.encode("a", { addSpecialTokens: false });
  expect(tok).toHaveLength(1);
  const forced = await ctx.client.completions.create({ model: "m", prompt: "The sea", max_tokens: 5, temperature: 0, logprobs: 0, logit_bias: { [tok[0]]: 100 } });
  expect(forced.choices[0].logprobs!.tokens).toEqual(Array(5).fill(ctx.model.tokenizer!.decode(tok)));
  const first = (await ctx.model.generate("The sea", { maxNewTokens: 1, temperature: 0 })).tokens[0];
  const banned = await ctx.client.completions.create({ model: "m", prompt: "The sea", max_tokens: 1, temperature: 0, logprobs: 0, logit_bias: { [first]: -100 } });
  expect(banned.choices[0].logprobs!.tokens![0]).not.toBe(ctx.model.tokenizer!.decode([first]));
});

test("n: greedy completions are each the single completion; n from one prompt counts it once", async () => {
  const one = await ctx.client.chat.completions.create({ model: "m", messages: user("Tell me"), max_tokens: 10, temperature: 0 });
  const three = await ctx.client.chat.completions.create({ model: "m", messages: user("Tell me"), max_tokens: 10, temperature: 0, n: 3 });
  expect(three.choices.map((c) => c.index)).toEqual([0, 1, 2]);
  for (const c of three.choices) expect(c.message.content).toBe(one.choices[0].message.content);
  expect(three.usage!.prompt_tokens).toBe(one.usage!.prompt_tokens);
  expect(three.usage!.completion_tokens).toBe(3 * one.usage!.completion_tokens);
  await expectIdle(ctx.model);
});

test("n streamed: each choice's text, finish and the usage chunk equal the non-streamed response", async () => {
  const params = { model: "m", prompt: "Once", max_tokens: 8, temperature: 0.9, seed: 11, n: 2 };
  const full = await ctx.client.completions.create(params);
  const stream = await ctx.client.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  const text = ["", ""];
  const finish: (string | null)[] = [null, null];
  let usage: OpenAI.CompletionUsage | null | undefined;
  for await (const c of stream) {
    if (c.choices.length === 0) usage = c.usage;
    for (const ch of c.choices) {
      text[ch.index] += ch.text;
      finish[ch.index] = ch.finish_reason ?? finish[ch.index];
    }
  }
  expect(text).toEqual(full.choices.map((c) => c.text));
  expect(finish).toEqual(full.choices.map((c) => c.finish_reason));
  expect(usage).toEqual(full.usage);
  await expectIdle(ctx.model);
});

test("a list of prompts: n choices of each, in prompt order, each what that prompt gets alone; streamed the same; usage counts every prompt", async () => {
  const prompts: (string | number[])[] = ["Once upon", "The king said", [5, 6, 7]];
  const base = { model: "m", max_tokens: 6, temperature: 0 };
  const alone = await Promise.all(prompts.map((p) => ctx.client.completions.create({ ...base, prompt: p as string })));
  const n = 2;
  const all = await ctx.client.completions.create({ ...base, prompt: prompts as string[], n });
  expect(all.choices.map((c) => c.index)).toEqual([0, 1, 2, 3, 4, 5]);
  all.choices.forEach((c, i) => {
    expect(c.text).toBe(alone[Math.floor(i / n)].choices[0].text);
    expect(c.finish_reason).toBe(alone[Math.floor(i / n)].choices[0].finish_reason);
  });
  const promptTokens = alone.reduce((s, r) => s + r.usage!.prompt_tokens, 0);
  const completionTokens = alone.reduce((s, r) => s + r.usage!.completion_tokens, 0);
  expect(all.usage).toEqual({ prompt_tokens: promptTokens, completion_tokens: n * completionTokens, total_tokens: promptTokens + n * completionTokens });
  // Two strings, the shape a client sends most (and the one that was refused).
  const two = await ctx.client.completions.create({ ...base, prompt: ["Once upon", "The king said"] });
  expect(two.choices.map((c) => c.text)).toEqual([alone[0].choices[0].text, alone[1].choices[0].text]);

  const stream = await ctx.client.completions.create({ ...base, prompt: prompts as string[], n, stream: true, stream_options: { include_usage: true } });
  const text: string[] = Array(prompts.length * n).fill("");
  let usage: OpenAI.CompletionUsage | null | undefined;
  for await (const c of stream) {
    if (c.choices.length === 0) usage = c.usage;
    for (const ch of c.choices) text[ch.index] += ch.text;
  }
  expect(text).toEqual(all.choices.map((c) => c.text));
  expect(usage).toEqual(all.usage);
  await expectIdle(ctx.model);
});

test("the README's limits on n are the server's: per request on both endpoints, and over a list of prompts", async () => {
  const readme = fs.readFileSync(path.join(__dirname, "..", "..", "README.md"), "utf8");
  const m = /`n` is at most (\d+) on either endpoint, and a list of prompts makes at most (\d+)\s+completions in all/.exec(readme);
  expect(m).not.toBeNull();
  const [perRequest, total] = [Number(m![1]), Number(m![2])];
  const base = { model: "m", max_tokens: 1, temperature: 0 };
  const refusedN = async (p: Promise<unknown>) => {
    const e = await p.then(() => null, (err) => err);
    expect(e).toBeInstanceOf(OpenAI.APIError);
    expect(e.status).toBe(400);
    expect(e.param).toBe("n");
  };
  expect((await ctx.client.chat.completions.create({ ...base, messages: user("x"), n: perRequest })).choices).toHaveLength(perRequest);
  await refusedN(ctx.client.chat.completions.create({ ...base, messages: user("x"), n: perRequest + 1 }));
  expect((await ctx.client.completions.create({ ...base, prompt: "x", n: perRequest })).choices).toHaveLength(perRequest);
  await refusedN(ctx.client.completions.create({ ...base, prompt: "x", n: perRequest + 1 }));
  // The total counts the prompts times n: one prompt more than it allows is refused.
  const prompts = (k: number) => Array.from({ length: k }, (_, i) => `p${i}`);
  expect((await ctx.client.completions.create({ ...base, prompt: prompts(total / 2), n: 2 })).choices).toHaveLength(total);
  const over = await ctx.client.completions.create({ ...base, prompt: prompts(total + 1) }).catch((e) => e);
  expect(over).toBeInstanceOf(OpenAI.APIError);
  expect(over.message).toMatch(new RegExp(`make ${total + 1} completions; a request makes at most ${total}`));
  await expectIdle(ctx.model);
});

/** The fixture's files in a temporary directory, with its generation_config.json as `edit` leaves it. */
function fixtureWithGenerationConfig(edit: (g: Record<string, unknown>) => void): string {
  const dir = testTempDir("lckv-genconfig-");
  for (const f of fs.readdirSync(fixture)) fs.copyFileSync(path.join(fixture, f), path.join(dir, f));
  const file = path.join(dir, "generation_config.json");
  const g = JSON.parse(fs.readFileSync(file, "utf8"));
  edit(g);
  fs.writeFileSync(file, JSON.stringify(g));
  return dir;
}

test("the README's account of a completion without max_tokens is the server's: max_new_tokens, else max_length, else 256, ending at the context", async () => {
  const readme = fs.readFileSync(path.join(__dirname, "..", "..", "README.md"), "utf8").replace(/\s+/g, " ");
  const m = /Without `max_tokens` \(or chat's `max_completion_tokens`\) a completion takes the model's default length, as vLLM does: generation_config.json's `max_new_tokens` \((\d+) for `models\/default`\), else what its `max_length` leaves after the prompt, else (\d+) tokens, ending at the context if that comes first/.exec(readme);
  expect(m).not.toBeNull();
  const [shipped, fallback] = [Number(m![1]), Number(m![2])];
  const maxNewTokens = (dir: string) => JSON.parse(fs.readFileSync(path.join(dir, "generation_config.json"), "utf8")).max_new_tokens;
  // ignore_eos: every completion runs to its length.
  const unbounded = { model: "m", temperature: 0, ignore_eos: true };
  expect(maxNewTokens(DEFAULT_MODEL_DIR)).toBe(shipped);
  const shippedRun = await english.client.completions.create({ ...unbounded, prompt: "The" });
  expect([shippedRun.usage!.completion_tokens, shippedRun.choices[0].finish_reason]).toEqual([shipped, "length"]);
  const own = maxNewTokens(fixture);
  expect(own).not.toBe(shipped);
  expect((await ctx.client.completions.create({ ...unbounded, prompt: "The" })).usage!.completion_tokens).toBe(own);
  expect((await ctx.client.chat.completions.create({ ...unbounded, messages: user("x") })).usage!.completion_tokens).toBe(own);

  const prompt = [5, 6, 7, 8];
  // max_length counts the prompt.
  const byLength = fixtureWithGenerationConfig((g) => {
    delete g.max_new_tokens;
    g.max_length = 20;
  });
  // Neither: the fallback, past this model's context, which ends the completion first.
  const neither = fixtureWithGenerationConfig((g) => delete g.max_new_tokens);
  for (const [dir, expected] of [[byLength, 20 - prompt.length], [neither, undefined]] as const) {
    const model = await loadModel(dir, { device: "cpu" });
    const srv = await startServer(model);
    try {
      const r = await srv.client.completions.create({ ...unbounded, prompt });
      expect(r.choices[0].finish_reason).toBe("length");
      if (expected !== undefined) {
        expect(r.usage!.completion_tokens).toBe(expected);
      } else {
        expect(model.maxContext).toBeLessThan(prompt.length + fallback);
        expect(r.usage!.completion_tokens).toBeLessThan(fallback);
        expect(r.usage!.total_tokens).toBeGreaterThanOrEqual(model.maxContext);
        expect(r.usage!.completion_tokens).toBe((await model.generate(prompt, { temperature: 0, ignoreEos: true, maxNewTokens: fallback })).tokens.length);
      }
    } finally {
      await srv.app.close();
      await model.dispose();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
});

test("a list of prompts: a list mixing token ids with prompts, or more than 128 completions, is refused before anything runs", async () => {
  const refused = async (prompt: unknown, n: number | undefined, message: RegExp, param = "prompt") => {
    const e = await ctx.client.completions.create({ model: "m", prompt: prompt as string[], n, max_tokens: 2 }).then(
      () => null,
      (err: InstanceType<typeof OpenAI.APIError>) => err,
    );
    expect(e).toBeInstanceOf(OpenAI.APIError);
    expect(e!.status).toBe(400);
    expect(e!.param).toBe(param);
    expect(e!.message).toMatch(message);
  };
  await refused(["a", 5], undefined, /mixes token ids with strings or lists/);
  await refused(["a", "b", "c"], 64, /3 prompts with n = 64 make 192 completions; a request makes at most 128/);
  await refused(["a", ""], undefined, /'prompt\[1\]': must not be empty/, "prompt[1]");
  await refused(["a", [5, 999999]], undefined, /prompt\[1\] token 1 is 999999, outside the vocabulary/);
  // The second prompt and max_tokens pass the context: nothing of the first is left running.
  const over = await ctx.client.completions.create({ model: "m", prompt: ["a", [5, 6, 7, 8]] as unknown as string[], max_tokens: ctx.model.maxContext - 3 }).catch((e) => e);
  expect(over).toBeInstanceOf(OpenAI.APIError);
  expect(over.code).toBe("context_length_exceeded");
  expect(over.message).toMatch(/\(4 in the prompt\[1\], \d+ in the completion\)/);
  await expectIdle(ctx.model);
});

test("a message's text parts are joined by newlines, as vLLM and llama.cpp join them: the same prompt and reply as that text", async () => {
  const ask = (content: string | { type: "text"; text: string }[]) =>
    ctx.client.chat.completions.create({ model: "m", messages: [{ role: "user", content }], max_tokens: 6, temperature: 0 });
  const parts = await ask([{ type: "text", text: "Once upon" }, { type: "text", text: "a time" }]);
  const joined = await ask("Once upon\na time");
  const glued = await ask("Once upona time");
  expect(parts.usage?.prompt_tokens).toBe(joined.usage?.prompt_tokens);
  expect(parts.choices[0].message.content).toBe(joined.choices[0].message.content);
  // Not merely any joining: glued together the prompt differs.
  expect(glued.usage?.prompt_tokens).not.toBe(joined.usage?.prompt_tokens);
});

describe("the server's prefill (ServerOptions.prefill, lckv serve --prefill): every request's prompt is prefilled in that mode", () => {
  let lckv: Model;
  beforeAll(async () => {
    // No prefix cache: each request prefills its whole prompt in the server's mode.
    lckv = await loadModel(path.join(__dirname, "..", "fixtures", "lckv-w2"), { device: "cpu", prefixCache: 0 });
  });
  afterAll(async () => {
    await lckv?.dispose();
  });

  test("one iterative pass gives the library's logprobs for that mode, not the default's; the default server gives the default's", async () => {
    const ids = Array.from({ length: 40 }, (_, i) => 3 + ((i * 7) % 50));
    const base: GenerateOptions = { maxNewTokens: 3, temperature: 0, logprobs: 0 };
    const logprobs = (r: { logprobs?: { logprob: number }[] }) => r.logprobs!.map((t) => t.logprob);
    const onePass = logprobs(await lckv.generate(ids, { ...base, prefill: "iterative", prefillPasses: 1 }));
    const byDefault = logprobs(await lckv.generate(ids, base));
    // One pass leaves the prompt's K/V from above unconverged: the first token's logprob differs.
    expect(Math.abs(onePass[0] - byDefault[0])).toBeGreaterThan(1e-4);
    for (const [options, want] of [[{ prefill: "iterative", prefillPasses: 1 }, onePass], [{}, byDefault]] as [ServerOptions, number[]][]) {
      const srv = await startServer(lckv, options);
      try {
        const r = await srv.client.completions.create({ model: "m", prompt: ids, max_tokens: base.maxNewTokens!, temperature: 0, logprobs: 0 });
        const got = r.choices[0].logprobs!.token_logprobs!;
        expect(got).toHaveLength(want.length);
        got.forEach((lp, i) => expect(lp).toBeCloseTo(want[i], 5));
      } finally {
        await srv.app.close();
      }
    }
    await expectIdle(lckv);
  });
});

test("an error names the model's files by the model's id, not by their path on the server", async () => {
  // The shipped model has no chat template: the refusal names where it looked.
  const e = await english.client.chat.completions.create({ model: "m", messages: user("Hello"), max_tokens: 2 }).catch((x) => x);
  expect(e.status).toBe(400);
  expect(e.error.code).toBe("LCKV_NO_CHAT_TEMPLATE");
  expect(e.error.message).not.toContain(DEFAULT_MODEL_DIR);
  expect(e.error.message).toContain(`no chat_template in ${path.join(path.basename(DEFAULT_MODEL_DIR), "tokenizer_config.json")}`);
});
