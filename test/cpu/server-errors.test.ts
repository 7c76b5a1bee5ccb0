/**
 * The server's error statuses, in OpenAI's error shape, as the openai client and raw HTTP see
 * them: 400 for a malformed body, an unknown or mistyped field (named in `param`) and a prompt
 * longer than the context; 401 for a missing or wrong key; 429 with Retry-After when the queue
 * for K/V pages is full (and a client that leaves the queue frees its place); a completion that
 * fails, which ends its request's others with no finish reason (only the error is sent); 404 for
 * an unknown route. (Any model name is served: see server.test.ts.)
 */
import * as net from "node:net";
import * as path from "node:path";
import OpenAI from "openai";
import { createServer, InvalidOptionError, loadModel, Model, ServerOptions } from "../../lib";
import { expectIdle, postJson, requestAsWritten, startServer, TestServer } from "../helpers/openai-server";

process.env.LCKV_QUIET = "1";
const fixture = path.join(__dirname, "..", "fixtures", "llama-mha-hd16");
const user = (content: string) => [{ role: "user" as const, content }];

let model: Model;
let srv: TestServer;
beforeAll(async () => {
  model = await loadModel(fixture, { device: "cpu" });
  srv = await startServer(model);
});
afterAll(async () => {
  await srv?.app.close();
  await model?.dispose();
});

/** The error a call fails with (the test fails if it does not). */
async function failure(p: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(OpenAI.APIError);
    return e as InstanceType<typeof OpenAI.APIError>;
  }
  throw new Error("the call did not fail");
}

function expectShape(json: any, param: string | null, type = "invalid_request_error") {
  expect(Object.keys(json)).toEqual(["error"]);
  expect(json.error).toEqual({ message: expect.any(String), type, param, code: expect.anything() });
}

test("400: malformed JSON, a body that is not an object, a missing field", async () => {
  const url = `${srv.url}/v1/chat/completions`;
  const bad = await postJson(url, '{"messages": [');
  expect(bad.status).toBe(400);
  expectShape(bad.json, null);
  const list = await postJson(url, "[1, 2]");
  expect(list.status).toBe(400);
  const missing = await postJson(url, { model: "m" });
  expect(missing.status).toBe(400);
  expectShape(missing.json, "messages");
  expect((await postJson(`${srv.url}/v1/completions`, { model: "m" })).json.error.param).toBe("prompt");
});

test("400: a body that is not JSON says so, and where, in OpenAI's shape with no framework code", async () => {
  const url = `${srv.url}/v1/completions`;
  const cases: [string, RegExp][] = [
    ["{bad", /not valid JSON: .*property name.* at position 1\./],
    ['{"prompt": "x",\n  "max_tokens": 2,,}', /not valid JSON: .* at position 34\./],
    ['{"prompt": "x"} trailing', /not valid JSON: .* at position 16\./],
    ['{"prompt": [1, 2', /not valid JSON: .* at position 16\./],
    ['{"prompt": "\\q"}', /not valid JSON: .*escape.* at position 13\./],
    ["", /request body is empty/],
  ];
  for (const [body, message] of cases) {
    const r = await postJson(url, body);
    expect(r.status).toBe(400);
    expectShape(r.json, null);
    expect(r.json.error.code).toBe("invalid_json");
    expect(r.json.error.message).toMatch(message);
  }
  // Valid JSON that fastify's parser refuses (prototype poisoning) is not reported as a syntax error.
  const poisoned = await postJson(url, '{"prompt": "x", "__proto__": {"max_tokens": 1}}');
  expect(poisoned.status).toBe(400);
  expect(poisoned.json.error.message).toMatch(/__proto__/);
  expect(poisoned.json.error.code).not.toMatch(/^FST_/);
  // Nor does a body over the limit send fastify's code.
  const small = await startServer(model, { bodyLimit: 64 });
  try {
    const big = await postJson(`${small.url}/v1/completions`, { prompt: "x".repeat(100) });
    expect(big.status).toBe(413);
    expectShape(big.json, null);
    expect(big.json.error.code).toBe("request_too_large");
  } finally {
    await small.app.close();
  }
});

test("415: a body that is not sent as JSON names its content type and says what to send", async () => {
  const body = { model: "m", prompt: "x", max_tokens: 1 };
  for (const type of ["text/plain", "application/x-www-form-urlencoded"]) {
    const r = await postJson(`${srv.url}/v1/completions`, body, { "content-type": type });
    expect(r.status).toBe(415);
    expectShape(r.json, null);
    expect(r.json.error.message).toContain(type);
    expect(r.json.error.message).toContain("Content-Type: application/json");
  }
  // The same body as JSON is served.
  expect((await postJson(`${srv.url}/v1/completions`, body)).status).toBe(200);
});

test("400: an unknown field, at the top or nested, is named; so is a mistyped or out-of-range one", async () => {
  const c = srv.client;
  const top = await failure(c.chat.completions.create({ model: "m", messages: user("x"), tools: [{ type: "function", function: { name: "f" } }] }));
  expect(top.status).toBe(400);
  expect(top.param).toBe("tools");
  expect(top.code).toBe("unknown_parameter");
  const nested = await postJson(`${srv.url}/v1/chat/completions`, { messages: [{ role: "user", content: "x", extra: 1 }] });
  expect(nested.status).toBe(400);
  expectShape(nested.json, "messages[0].extra");
  const unknown = await failure(c.completions.create({ model: "m", prompt: "x", best_of: 2 }));
  expect(unknown.param).toBe("best_of");
  const typed = await postJson(`${srv.url}/v1/chat/completions`, { messages: user("x"), temperature: "hot" });
  expect(typed.status).toBe(400);
  expectShape(typed.json, "temperature");
  const range = await failure(c.chat.completions.create({ model: "m", messages: user("x"), temperature: 3 }));
  expect(range.status).toBe(400);
  expect(range.param).toBe("temperature");
  const format = await failure(c.chat.completions.create({ model: "m", messages: user("x"), response_format: { type: "json_object" } }));
  expect(format.param).toBe("response_format.type");
  // An image part is refused for its type (the server takes text), not for the 'text' it lacks.
  const image = await postJson(`${srv.url}/v1/chat/completions`, { messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }] });
  expect(image.status).toBe(400);
  expect(image.json.error).toEqual({ message: `Invalid value for 'messages[0].content[0].type': must be "text"`, type: "invalid_request_error", param: "messages[0].content[0].type", code: "invalid_value" });
  const noText = await postJson(`${srv.url}/v1/chat/completions`, { messages: [{ role: "user", content: [{ type: "text" }] }] });
  expect(noText.json.error.message).toBe("Missing required parameter: 'messages[0].content[0].text'");
  // The fields clients send for "unset" are accepted.
  const ok = await c.chat.completions.create({
    model: "m",
    messages: [{ role: "system", content: "Be brief" }, { role: "user", content: [{ type: "text", text: "Hi" }] }],
    max_tokens: 2,
    n: 1,
    stop: null,
    temperature: null,
    presence_penalty: 0,
    frequency_penalty: 0,
    logit_bias: {},
    logprobs: false,
    user: "someone",
    response_format: { type: "text" },
  });
  expect(ok.choices).toHaveLength(1);
});

test("400: the request checker's messages are English, not JSON schema's terms", async () => {
  const chat = (extra: object) => ({ messages: user("x"), ...extra });
  const cases: [string, object, string, string][] = [
    ["/v1/completions", { prompt: "x", n: "2" }, "n", "must be an integer or null"],
    ["/v1/completions", { prompt: "x", stop: 5 }, "stop", "must be a string, an array or null"],
    ["/v1/chat/completions", chat({ stream: "yes" }), "stream", "must be a boolean or null"],
    ["/v1/chat/completions", chat({ temperature: "hot" }), "temperature", "must be a number or null"],
    ["/v1/chat/completions", chat({ temperature: 3 }), "temperature", "must be at most 2"],
    ["/v1/completions", { prompt: "x", n: 0 }, "n", "must be at least 1"],
    ["/v1/completions", { prompt: "x", stop: ["a", "b", "c", "d", "e"] }, "stop", "must have at most 4 items"],
    ["/v1/completions", { prompt: "" }, "prompt", "must not be empty"],
    ["/v1/chat/completions", { messages: [] }, "messages", "must not be empty"],
    ["/v1/chat/completions", { messages: [{ role: "bot", content: "x" }] }, "messages[0].role", 'must be "system", "developer", "user" or "assistant"'],
    ["/v1/chat/completions", chat({ response_format: { type: "json_object" } }), "response_format.type", 'must be "text"'],
    ["/v1/chat/completions", { messages: "hi" }, "messages", "must be an array"],
    ["/v1/chat/completions", chat({ stream_options: 1 }), "stream_options", "must be an object or null"],
    ["/v1/chat/completions", chat({ logit_bias: { a: 1 } }), "logit_bias", 'its keys must be token ids (strings of at most 10 digits), got "a"'],
    // Named as sent, not as the number it would round to (1e+23).
    ["/v1/completions", { prompt: "x", logit_bias: { "99999999999999999999999": 1 } }, "logit_bias", 'its keys must be token ids (strings of at most 10 digits), got "99999999999999999999999"'],
  ];
  for (const [route, body, param, detail] of cases) {
    const r = await postJson(`${srv.url}${route}`, body);
    expect(r.status).toBe(400);
    expectShape(r.json, param);
    expect(r.json.error.message).toBe(`Invalid value for '${param}': ${detail}`);
  }
  // A body that is not an object, and the same through the openai client.
  expect((await postJson(`${srv.url}/v1/completions`, "[1, 2]")).json.error.message).toBe("Invalid value for 'body': must be an object");
  const e = await failure(srv.client.completions.create({ model: "m", prompt: "x", max_tokens: "4" as unknown as number }));
  expect(e.message).toBe("400 Invalid value for 'max_tokens': must be an integer or null");
});

test("400: top_k, min_p, repetition_penalty and ignore_eos out of lckv's ranges are named, on both endpoints; null and their no-op values are served", async () => {
  const cases: [Record<string, unknown>, string, string][] = [
    [{ top_k: -2 }, "top_k", "must be at least -1"],
    [{ top_k: 1.5 }, "top_k", "must be an integer or null"],
    [{ top_k: 2 ** 31 }, "top_k", "must be at most 2147483647"],
    [{ min_p: 1.5 }, "min_p", "must be at most 1"],
    [{ min_p: -0.1 }, "min_p", "must be at least 0"],
    [{ repetition_penalty: 0 }, "repetition_penalty", `must be at least ${2 ** -126}`],
    [{ repetition_penalty: 1e39 }, "repetition_penalty", `must be at most ${2 ** 126}`],
    [{ repetition_penalty: "high" }, "repetition_penalty", "must be a number or null"],
    [{ ignore_eos: "yes" }, "ignore_eos", "must be a boolean or null"],
  ];
  for (const [route, body] of [["/v1/chat/completions", { messages: user("x") }], ["/v1/completions", { prompt: "x" }]] as const) {
    for (const [fields, param, detail] of cases) {
      const r = await postJson(`${srv.url}${route}`, { ...body, ...fields });
      expect(r.status).toBe(400);
      expect(r.json.error).toEqual({ message: `Invalid value for '${param}': ${detail}`, type: "invalid_request_error", param, code: "invalid_value" });
    }
    for (const fields of [{ top_k: null, min_p: null, repetition_penalty: null, ignore_eos: null }, { top_k: 0, min_p: 0, repetition_penalty: 1, ignore_eos: false }]) {
      expect((await postJson(`${srv.url}${route}`, { ...body, ...fields, max_tokens: 2 })).status).toBe(200);
    }
  }
});

test("400: stream_options on a request that does not stream, as OpenAI refuses it; null is served", async () => {
  const message = "The 'stream_options' parameter is only allowed when 'stream' is enabled.";
  for (const [route, body] of [["/v1/chat/completions", { messages: user("x"), max_tokens: 2 }], ["/v1/completions", { prompt: "x", max_tokens: 2 }]] as const) {
    for (const stream of [undefined, false, null]) {
      const r = await postJson(`${srv.url}${route}`, { ...body, stream, stream_options: { include_usage: true } });
      expect(r.status).toBe(400);
      expect(r.json.error).toEqual({ message, type: "invalid_request_error", param: "stream_options", code: "invalid_value" });
    }
    expect((await postJson(`${srv.url}${route}`, { ...body, stream: false, stream_options: null })).status).toBe(200);
  }
  const e = await failure(srv.client.completions.create({ model: "m", prompt: "x", max_tokens: 2, stream_options: { include_usage: true } }));
  expect(e.status).toBe(400);
  expect(e.param).toBe("stream_options");
  await expectIdle(model);
});

test("chat: an assistant message's content may be null (empty text), as OpenAI allows; another role's may not", async () => {
  const turns = (content: string | null) => [
    { role: "user" as const, content: "Hi" },
    { role: "assistant" as const, content },
    { role: "user" as const, content: "Go on" },
  ];
  const ask = (content: string | null) => srv.client.chat.completions.create({ model: "m", messages: turns(content), max_tokens: 6, temperature: 0 });
  const none = await ask(null);
  const empty = await ask("");
  expect(none.choices[0].message.content).toBe(empty.choices[0].message.content);
  expect(none.usage).toEqual(empty.usage);
  for (const role of ["user", "system", "developer"]) {
    const r = await postJson(`${srv.url}/v1/chat/completions`, { messages: [{ role: "user", content: "x" }, { role, content: null }] });
    expect(r.status).toBe(400);
    expectShape(r.json, "messages[1].content");
    expect(r.json.error.message).toMatch(/^Invalid value for 'messages\[1\]\.content': .*null only in an assistant's message/);
  }
  await expectIdle(model);
});

test("400: a value lckv refuses names the OpenAI field", async () => {
  const e = await failure(srv.client.chat.completions.create({ model: "m", messages: user("x"), logit_bias: { 999999: 1 } }));
  expect(e.status).toBe(400);
  expect(e.param).toBe("logit_bias");
  expect(e.message).toMatch(/'logit_bias': token 999999 is outside the vocabulary/);
});

test("400: top_p outside (0, 1], at either end, is refused in the shape of every range error", async () => {
  for (const [route, body] of [["/v1/chat/completions", { messages: user("x") }], ["/v1/completions", { prompt: "x" }]] as const) {
    for (const [topP, detail] of [[0, "must be greater than 0"], [-0.5, "must be greater than 0"], [2, "must be at most 1"]] as const) {
      const r = await postJson(`${srv.url}${route}`, { ...body, top_p: topP });
      expect(r.status).toBe(400);
      expect(r.json.error).toEqual({ message: `Invalid value for 'top_p': ${detail}`, type: "invalid_request_error", param: "top_p", code: "invalid_value" });
    }
  }
  // The ends that are in the range are served.
  expect((await postJson(`${srv.url}/v1/completions`, { prompt: "x", max_tokens: 1, top_p: 1 })).status).toBe(200);
  expect((await postJson(`${srv.url}/v1/completions`, { prompt: "x", max_tokens: 1, top_p: 1e-9 })).status).toBe(200);
});

test("400: a prompt longer than the context", async () => {
  const long = "word ".repeat(400);
  const chat = await failure(srv.client.chat.completions.create({ model: "m", messages: user(long) }));
  expect(chat.status).toBe(400);
  expect(chat.code).toBe("context_length_exceeded");
  expect(chat.param).toBe("messages");
  // In the words of OpenAI's refusal (which clients parse), as one that leaves no room is refused.
  const ctxLen = model.maxContext;
  expect(chat.message).toMatch(new RegExp(`^400 This model's maximum context length is ${ctxLen} tokens\\. However, your messages have (at least )?\\d+ tokens\\. Please reduce the length of the messages\\.$`));
  const streamed = await failure(srv.client.completions.create({ model: "m", prompt: long, stream: true }));
  expect(streamed.status).toBe(400);
  expect(streamed.param).toBe("prompt");
  expect(streamed.message).toMatch(new RegExp(`^400 This model's maximum context length is ${ctxLen} tokens\\. However, your prompt has (at least )?\\d+ tokens\\. Please reduce the length of the prompt\\.$`));
  const ids = await failure(srv.client.completions.create({ model: "m", prompt: Array(ctxLen + 1).fill(5) }));
  expect(ids.code).toBe("context_length_exceeded");
  expect(ids.message).toBe(`400 This model's maximum context length is ${ctxLen} tokens. However, your prompt has ${ctxLen + 1} tokens. Please reduce the length of the prompt.`);
  // A text far past the context is counted from its start only.
  const far = await failure(srv.client.completions.create({ model: "m", prompt: "word ".repeat(100_000) }));
  expect(far.code).toBe("context_length_exceeded");
  expect(far.message).toMatch(new RegExp(`^400 This model's maximum context length is ${ctxLen} tokens\\. However, your prompt has at least \\d+ tokens\\.`));
  // Far more messages than the context holds tokens: refused from the first of them, rendered alone.
  const messages = Array.from({ length: 100 * ctxLen }, () => ({ role: "user" as const, content: "" }));
  const many = await failure(srv.client.chat.completions.create({ model: "m", messages }));
  expect(many.code).toBe("context_length_exceeded");
  expect(many.message).toMatch(new RegExp(`^400 This model's maximum context length is ${ctxLen} tokens\\. However, your messages have at least \\d+ tokens\\.`));
  const outside = await failure(srv.client.completions.create({ model: "m", prompt: [999999] }));
  expect(outside.status).toBe(400);
  await expectIdle(model);
});

test("400: a prompt and max_tokens that together pass the context, refused before anything runs; at the context, served", async () => {
  const ctxLen = model.maxContext;
  const prompt = [5, 6, 7, 8];  // token ids: exactly 4 prompt tokens
  const over = await failure(srv.client.completions.create({ model: "m", prompt, max_tokens: ctxLen - 3, temperature: 0 }));
  expect(over.status).toBe(400);
  expect(over.code).toBe("context_length_exceeded");
  expect(over.param).toBe("prompt");
  expect(over.message).toBe(`400 This model's maximum context length is ${ctxLen} tokens. However, you requested ${ctxLen + 1} tokens (4 in the prompt, ${ctxLen - 3} in the completion). Please reduce the length of the prompt or completion.`);
  const chat = await failure(srv.client.chat.completions.create({ model: "m", messages: user("x"), max_tokens: ctxLen, stream: true }));
  expect(chat.status).toBe(400);
  expect(chat.code).toBe("context_length_exceeded");
  expect(chat.param).toBe("messages");
  expect(chat.message).toMatch(/\(\d+ in the messages, \d+ in the completion\)/);
  await expectIdle(model);
  // Exactly at the context: served.
  const fits = await srv.client.completions.create({ model: "m", prompt, max_tokens: ctxLen - 4, temperature: 0 });
  expect(fits.usage?.prompt_tokens).toBe(4);
  expect(fits.usage?.completion_tokens).toBeGreaterThan(0);
  expect(fits.usage?.completion_tokens).toBeLessThanOrEqual(ctxLen - 4);
  await expectIdle(model);
});

test("400: a prompt that fills the context alone, without max_tokens (no room for a completion); one token shorter, served to the context", async () => {
  const ctxLen = model.maxContext;
  const full = Array.from({ length: ctxLen }, (_, i) => 5 + (i % 7));
  const over = await failure(srv.client.completions.create({ model: "m", prompt: full, temperature: 0 }));
  expect(over.status).toBe(400);
  expect(over.code).toBe("context_length_exceeded");
  expect(over.param).toBe("prompt");
  expect(over.message).toBe(`400 This model's maximum context length is ${ctxLen} tokens. However, your prompt has ${ctxLen} tokens, which leaves no room for the completion. Please reduce the length of the prompt.`);
  const streamedN = await failure(srv.client.completions.create({ model: "m", prompt: full, n: 2, stream: true }));
  expect(streamedN.status).toBe(400);
  expect(streamedN.code).toBe("context_length_exceeded");
  await expectIdle(model);
  // One token shorter: a token of room, and the completion ends there.
  const one = await srv.client.completions.create({ model: "m", prompt: full.slice(1), temperature: 0 });
  expect(one.usage).toMatchObject({ prompt_tokens: ctxLen - 1, completion_tokens: 1, total_tokens: ctxLen });
  expect(one.choices[0].finish_reason).toBe("length");
  await expectIdle(model);
});

test("createServer checks its options as loadModel does: each bad one is an InvalidOptionError naming it", () => {
  const refused = (options: unknown, option: string, detail: RegExp, m: unknown = model) => {
    let error: unknown;
    try {
      createServer(m as Model, options as ServerOptions);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(InvalidOptionError);
    expect((error as InvalidOptionError).option).toBe(option);
    expect((error as InvalidOptionError).detail).toMatch(detail);
  };
  refused({ port: 8080 }, "port", /is not a createServer option \(known: apiKey, modelId, bodyLimit, logger, allowedOrigins, writeStallTimeout, requestTimeout, prefill, prefillPasses, prefillTolerance\)/);
  refused({ apikey: "k" }, "apikey", /is not a createServer option/);
  // An empty key, or one no Authorization header can carry, would lock every request out.
  refused({ apiKey: "" }, "apiKey", /must be a non-empty string, got ""/);
  refused({ apiKey: " key" }, "apiKey", /must not begin or end with whitespace/);
  refused({ apiKey: 5 }, "apiKey", /must be a non-empty string, got 5/);
  refused({ modelId: "" }, "modelId", /must be a non-empty string/);
  refused({ modelId: 3 }, "modelId", /must be a non-empty string, got 3/);
  refused({ bodyLimit: "1mb" }, "bodyLimit", /must be a positive integer/);
  refused({ bodyLimit: 0 }, "bodyLimit", /must be a positive integer/);
  refused({ logger: "info" }, "logger", /must be true, false or fastify's logger options/);
  refused(null, "options", /must be an object/);
  refused({ allowedOrigins: "*" }, "allowedOrigins", /must be a list of origins .*got "\*"/);
  refused({ allowedOrigins: ["https://a.example/app"] }, "allowedOrigins", /"https:\/\/a\.example\/app" is not one \(its origin is "https:\/\/a\.example"\)/);
  refused({ allowedOrigins: ["a.example"] }, "allowedOrigins", /"a\.example" is not one$/);
  refused({ writeStallTimeout: 0 }, "writeStallTimeout", /must be a positive integer, got 0/);
  refused({ writeStallTimeout: "30s" }, "writeStallTimeout", /must be a positive integer/);
  refused({ writeStallTimeout: 2 ** 31 }, "writeStallTimeout", /must be at most 2147483647/);
  refused({ requestTimeout: 0 }, "requestTimeout", /must be a positive integer, got 0/);
  refused({ requestTimeout: 2 ** 31 }, "requestTimeout", /must be at most 2147483647/);
  // Every request's prefill: a mode, its passes or its tolerance, and none that the mode ignores
  // (the mode given, or without one the model's default: sequential on the CPU).
  refused({ prefill: "fast" }, "prefill", /must be one of "fixed-point", "sequential", "iterative", got "fast"/);
  refused({ prefillPasses: 0 }, "prefillPasses", /must be a positive integer, got 0/);
  refused({ prefill: "iterative", prefillPasses: 1025 }, "prefillPasses", /must be at most 1024/);
  refused({ prefill: "fixed-point", prefillTolerance: 1 }, "prefillTolerance", /must be a number in \[0, 1\), got 1/);
  refused({ prefill: "sequential", prefillPasses: 2 }, "prefillPasses", /applies to prefill "iterative" only, and the prefill is sequential/);
  refused({ prefill: "iterative", prefillTolerance: 0.1 }, "prefillTolerance", /applies to prefill "fixed-point" only, and the prefill is iterative/);
  refused({ prefillPasses: 2 }, "prefillPasses", /applies to prefill "iterative" only, and the prefill is sequential/);
  // The model too: not one (a path, an options object, nothing) or one disposed.
  refused({}, "model", /must be a Model from loadModel\(\), got null/, null);
  refused({}, "model", /must be a Model from loadModel\(\), got object/, {});
  refused({}, "model", /must be a Model from loadModel\(\), got "m"/, "m");
  // Options left undefined are unset.
  createServer(model, { apiKey: undefined, modelId: undefined, bodyLimit: 1024, logger: false, writeStallTimeout: undefined });
  // No bound on a stalled stream is Infinity, as loadModel's queueTimeout has it.
  createServer(model, { writeStallTimeout: Infinity, requestTimeout: Infinity });
});

/** Writes `chunks` on a new connection to `url` (each after the previous one's delay) and collects what comes back until the server closes it. */
function rawExchange(url: string, chunks: [string, number][]): Promise<{ text: string; closedAfterMs: number }> {
  const { hostname, port } = new URL(url);
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(port), hostname);
    let text = "";
    socket.setEncoding("utf8");
    socket.on("data", (d: string) => (text += d));
    socket.on("close", () => resolve({ text, closedAfterMs: Date.now() - started }));
    socket.on("error", reject);
    let at = 0;
    for (const [chunk, delay] of chunks) setTimeout(() => socket.writable && socket.write(chunk), (at += delay));
  });
}

const head = (target: string, length: number, extraHeaders = "") =>
  `POST ${target} HTTP/1.1\r\nHost: localhost\r\n${extraHeaders}Content-Type: application/json\r\nContent-Length: ${length}\r\n\r\n`;

test("408: a client that sends its request too slowly is answered in OpenAI's shape and its connection closed; a quick one on the same server is served", async () => {
  const slow = await startServer(model, { requestTimeout: 400 });
  try {
    // Headers whole, then 5 of the 60 bytes the body declares, and nothing more.
    const answer = await rawExchange(slow.url, [[`${head("/v1/completions", 60)}{"mod`, 0]]);
    expect(answer.text).toMatch(/^HTTP\/1\.1 408 Request Timeout\r\n/);
    expect(answer.text).toMatch(/\r\nConnection: close\r\n/);
    const body = JSON.parse(answer.text.slice(answer.text.indexOf("\r\n\r\n") + 4));
    expect(body).toEqual({ error: { message: "the request did not arrive whole within 400 ms (the server's requestTimeout)", type: "invalid_request_error", param: null, code: "request_timeout" } });
    // Within the deadline and one check of it (a tenth of it), with room for a slow machine.
    expect(answer.closedAfterMs).toBeGreaterThanOrEqual(390);
    expect(answer.closedAfterMs).toBeLessThan(5000);
    // The deadline is for receiving a request, not for answering it.
    const ok = await postJson(`${slow.url}/v1/completions`, { model: "m", prompt: "a", max_tokens: 2 });
    expect(ok.status).toBe(200);
  } finally {
    await slow.app.close();
  }
});

test("408 carries the CORS header the server's other answers would, so that a browser's page can read it", async () => {
  const headWithOrigin = (origin: string) => `${head("/v1/completions", 60, `Origin: ${origin}\r\n`)}{"mod`;
  const headerLines = (text: string) => text.slice(0, text.indexOf("\r\n\r\n")).split("\r\n");
  const listed = await startServer(model, { requestTimeout: 300, allowedOrigins: ["https://a.example"] });
  const any = await startServer(model, { requestTimeout: 300 });
  try {
    // An allowed origin gets itself back, with Vary (the answer depends on it); another none.
    const allowed = headerLines((await rawExchange(listed.url, [[headWithOrigin("https://a.example"), 0]])).text);
    expect(allowed[0]).toBe("HTTP/1.1 408 Request Timeout");
    expect(allowed).toContain("Access-Control-Allow-Origin: https://a.example");
    expect(allowed).toContain("Vary: Origin");
    const other = headerLines((await rawExchange(listed.url, [[headWithOrigin("https://b.example"), 0]])).text);
    expect(other[0]).toBe("HTTP/1.1 408 Request Timeout");
    expect(other.filter((l) => /^access-control-/i.test(l))).toEqual([]);
    expect(other).toContain("Vary: Origin");  // as @fastify/cors says for an origin it refuses
    // The default, any origin: "*", also for a request cut in its headers (its Origin unknown).
    const star = headerLines((await rawExchange(any.url, [[headWithOrigin("https://b.example"), 0]])).text);
    expect(star).toContain("Access-Control-Allow-Origin: *");
    expect(star).not.toContain("Vary: Origin");
    const cut = headerLines((await rawExchange(any.url, [["POST /v1/completions HTTP/1.1\r\nHost: local", 0]])).text);
    expect(cut[0]).toBe("HTTP/1.1 408 Request Timeout");
    expect(cut).toContain("Access-Control-Allow-Origin: *");
    // The same headers as a served answer from the same origin, and from another.
    const served = await fetch(`${listed.url}/v1/models`, { headers: { Origin: "https://a.example" } });
    expect(served.headers.get("access-control-allow-origin")).toBe("https://a.example");
    const refused = await fetch(`${listed.url}/v1/models`, { headers: { Origin: "https://b.example" } });
    expect(refused.headers.get("access-control-allow-origin")).toBeNull();
    expect(refused.headers.get("vary")).toMatch(/Origin/);
  } finally {
    await Promise.all([listed.app.close(), any.app.close()]);
  }
});

test("408 never lands inside another response: not after a 413 sent before the body, nor in a stream ahead of a pipelined request", async () => {
  const slow = await startServer(model, { requestTimeout: 200, bodyLimit: 1024 });
  try {
    // A body past bodyLimit is answered 413 at once; the rest of it never comes. The request
    // then times out, and its connection closes with the one answer it got.
    const big = await rawExchange(slow.url, [[`${head("/v1/completions", 4096)}{"prompt": "`, 0]]);
    expect(big.text).toMatch(/^HTTP\/1\.1 413 /);
    expect(big.text).not.toMatch(/HTTP\/1\.1 408/);
    // A stream, then the first bytes of a second request on its connection: that request's
    // deadline passes while the stream runs. Node closes the connection then; the stream gets
    // no status line written into it. (A stream that ended first may be followed by the 408.)
    const stream = JSON.stringify({ model: "m", prompt: "a", max_tokens: 100, n: 64, stream: true, ignore_eos: true });
    const piped = await rawExchange(slow.url, [[`${head("/v1/completions", Buffer.byteLength(stream))}${stream}POST /v1/comp`, 0]]);
    expect(piped.text).toMatch(/^HTTP\/1\.1 200 /);
    const done = piped.text.indexOf("data: [DONE]");
    const timedOut = piped.text.indexOf("HTTP/1.1 408");
    expect(timedOut === -1 || (done !== -1 && timedOut > done)).toBe(true);
    // Not vacuous: the stream was still running when the connection closed.
    expect(done).toBe(-1);
  } finally {
    await slow.app.close();
  }
});

test("createServer refuses a disposed model by name, before it serves a request that could only fail", async () => {
  const gone = await loadModel(fixture, { device: "cpu" });
  await gone.dispose();
  expect(() => createServer(gone)).toThrow(/option 'model': was disposed: load it again/);
});

test("CORS: any origin by default, with the key's check passing the preflight; a list allows its origins only; [] none", async () => {
  // A browser's preflight, and a request from a page: node's fetch sends the headers as given.
  const preflight = (url: string, origin: string) =>
    fetch(`${url}/v1/chat/completions`, { method: "OPTIONS", headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type" } });
  const models = (url: string, headers: Record<string, string>) => fetch(`${url}/v1/models`, { headers: { origin: "https://app.example", ...headers } });
  const anyOrigin = await startServer(model, { apiKey: "k" });
  try {
    const pre = await preflight(anyOrigin.url, "https://app.example");
    expect(pre.status).toBe(204);
    expect(pre.headers.get("access-control-allow-origin")).toBe("*");
    expect(pre.headers.get("access-control-allow-methods")).toMatch(/POST/);
    expect(pre.headers.get("access-control-allow-headers")?.toLowerCase()).toMatch(/authorization/);
    // The request itself still needs the key, and its answer carries the header a page needs.
    expect((await models(anyOrigin.url, {})).status).toBe(401);
    const listed = await models(anyOrigin.url, { authorization: "Bearer k" });
    expect(listed.status).toBe(200);
    expect(listed.headers.get("access-control-allow-origin")).toBe("*");
    // A page may read a 429's Retry-After.
    expect(listed.headers.get("access-control-expose-headers")).toMatch(/Retry-After/i);
  } finally {
    await anyOrigin.app.close();
  }
  const listedOnly = await startServer(model, { allowedOrigins: ["https://app.example"] });
  try {
    expect((await preflight(listedOnly.url, "https://app.example")).headers.get("access-control-allow-origin")).toBe("https://app.example");
    expect((await preflight(listedOnly.url, "https://other.example")).headers.get("access-control-allow-origin")).toBeNull();
  } finally {
    await listedOnly.app.close();
  }
  const none = await startServer(model, { allowedOrigins: [] });
  try {
    const refused = await preflight(none.url, "https://app.example");
    expect(refused.status).toBe(404);
    expect(refused.headers.get("access-control-allow-origin")).toBeNull();
    expect((await models(none.url, {})).headers.get("access-control-allow-origin")).toBeNull();
  } finally {
    await none.app.close();
  }
  // Without CORS an OPTIONS is no preflight: with a key set, it needs the key as any request does.
  const lockedNone = await startServer(model, { allowedOrigins: [], apiKey: "k" });
  try {
    expect((await preflight(lockedNone.url, "https://app.example")).status).toBe(401);
  } finally {
    await lockedNone.app.close();
  }
});

test("401: a missing or wrong key; the right one passes, and /health needs none", async () => {
  const locked = await startServer(model, { apiKey: "sesame" }, "wrong");
  try {
    const wrong = await failure(locked.client.models.list());
    expect(wrong.status).toBe(401);
    expect(wrong.code).toBe("invalid_api_key");
    const none = await postJson(`${locked.url}/v1/completions`, { prompt: "x" });
    expect(none.status).toBe(401);
    expectShape(none.json, null);
    const right = new OpenAI({ baseURL: `${locked.url}/v1`, apiKey: "sesame", maxRetries: 0 });
    expect((await right.completions.create({ model: "m", prompt: "x", max_tokens: 2 })).choices).toHaveLength(1);
    expect((await fetch(`${locked.url}/health`)).status).toBe(200);
  } finally {
    await locked.app.close();
  }
});

test("CORS: a streamed response carries the headers a page needs, and so does an error answered before its stream starts", async () => {
  const origin = "https://app.example";
  const fromPage = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: "unused", maxRetries: 0, defaultHeaders: { origin } });
  const { data: chat, response } = await fromPage.chat.completions.create({ model: "m", messages: user("x"), max_tokens: 2, stream: true }).withResponse();
  for await (const _ of chat);
  expect(response.status).toBe(200);
  expect(response.headers.get("access-control-allow-origin")).toBe("*");
  expect(response.headers.get("access-control-expose-headers")).toMatch(/Retry-After/i);
  // Refused before its first event: the status is the error's own, its headers the same.
  const tooLong = await failure(fromPage.completions.create({ model: "m", prompt: "x", max_tokens: 100000, stream: true }));
  expect(tooLong.status).toBe(400);
  expect(tooLong.code).toBe("context_length_exceeded");
  expect(tooLong.headers?.get("access-control-allow-origin")).toBe("*");
  expect(tooLong.headers?.get("access-control-expose-headers")).toMatch(/Retry-After/i);
  // A listed origin is answered with itself, and told that the answer depends on it.
  const listedOnly = await startServer(model, { allowedOrigins: [origin] });
  try {
    const stream = (o: string) => postJson(`${listedOnly.url}/v1/completions`, { prompt: "x", max_tokens: 2, stream: true }, { origin: o });
    const listed = await stream(origin);
    expect(listed.status).toBe(200);
    expect(listed.json).toMatch(/data: \[DONE\]\n\n$/);
    expect(listed.headers.get("access-control-allow-origin")).toBe(origin);
    expect(listed.headers.get("vary")).toMatch(/Origin/i);
    expect((await stream("https://other.example")).headers.get("access-control-allow-origin")).toBeNull();
  } finally {
    await listedOnly.app.close();
  }
});

test("401 by the route a request reaches: a percent-encoded or absolute path to a /v1 route, or one that reaches none, needs the key; /health and /metrics do not", async () => {
  const locked = await startServer(model, { apiKey: "sesame" });
  try {
    const { port } = new URL(locked.url);
    const key = { authorization: "Bearer sesame" };
    const body = { prompt: "x", max_tokens: 2 };
    // Each reaches /v1/completions or /v1/models (the router decodes the path), as the key shows.
    const targets: [string, string][] = [
      ["POST", "/%761/completions"],
      ["POST", "/v%31/completions"],
      ["POST", `http://127.0.0.1:${port}/v1/completions`],
      ["GET", "/%761/models"],
      ["GET", `http://127.0.0.1:${port}/v1/models`],
    ];
    for (const [method, target] of targets) {
      const sent = method === "POST" ? body : undefined;
      const without = await requestAsWritten(locked.url, method, target, sent);
      expect([method, target, without.status]).toEqual([method, target, 401]);
      expect(without.json.error.code).toBe("invalid_api_key");
      expect(without.headers["www-authenticate"]).toBe("Bearer");
      expect([method, target, (await requestAsWritten(locked.url, method, target, sent, key)).status]).toEqual([method, target, 200]);
    }
    // A path that reaches no route says nothing, not even that there is none, without the key.
    for (const target of ["/v1/engines", "/%761/engines", "/admin"]) {
      expect([target, (await requestAsWritten(locked.url, "GET", target)).status]).toEqual([target, 401]);
      expect([target, (await requestAsWritten(locked.url, "GET", target, undefined, key)).status]).toEqual([target, 404]);
    }
    for (const target of ["/health", "/%68ealth", "/metrics"]) {
      const open = await fetch(`${locked.url}${target}`);
      expect([target, open.status]).toEqual([target, 200]);
    }
  } finally {
    await locked.app.close();
  }
});

test("429 with Retry-After when the queue for K/V pages is full; a client that leaves the queue frees its place", async () => {
  // A pool of one context (8 pages), held whole by a sequence, and a queue of one.
  const pageBytes = model.cacheStats().pageBytes;
  const small = await loadModel(fixture, { device: "cpu", kvCacheMemory: 8 * pageBytes, maxQueue: 1 });
  const s = await startServer(small);
  try {
    const holder = small.createSequence();
    await holder.append(Array.from({ length: 128 }, (_, i) => 2 + (i % 200)));
    expect(small.cacheStats().pagesFree).toBe(0);
    const waitQueued = async (n: number) => {
      for (let i = 0; i < 200 && small.cacheStats().queued !== n; i++) await new Promise((r) => setTimeout(r, 10));
      expect(small.cacheStats().queued).toBe(n);
    };
    // One waits (and leaves: its place is free again) ...
    const leaver = new AbortController();
    const left = s.client.completions.create({ model: "m", prompt: "x", max_tokens: 4 }, { signal: leaver.signal }).catch((e) => e);
    await waitQueued(1);
    leaver.abort();
    expect(await left).toBeInstanceOf(OpenAI.APIUserAbortError);
    await waitQueued(0);
    // ... another waits, and the next is turned away.
    const waiting = s.client.completions.create({ model: "m", prompt: "x", max_tokens: 4, temperature: 0 });
    await waitQueued(1);
    const full = await failure(s.client.chat.completions.create({ model: "m", messages: user("x"), max_tokens: 4, stream: true }));
    expect(full.status).toBe(429);
    expect(full.code).toBe("LCKV_QUEUE_FULL");
    expect(Number(full.headers?.get("retry-after"))).toBeGreaterThan(0);
    expect(full.type).toBe("rate_limit_error");
    holder.dispose();
    expect((await waiting).choices[0].finish_reason).toMatch(/stop|length/);
    // Refused before its stream started, the 429 still lets a page read its Retry-After (CORS).
    expect(full.headers?.get("access-control-expose-headers")).toMatch(/Retry-After/i);
    await expectIdle(small);
  } finally {
    await s.app.close();
    await small.dispose();
  }
});

test("a completion that fails cuts the request's others short: none of them is reported finished, streamed or not, on both endpoints", async () => {
  // A pool that holds two of the three completions, and no wait for pages: the third fails
  // (LCKV_KV_CACHE_FULL) as it starts, which stops the two that are generating.
  const pageBytes = model.cacheStats().pageBytes;
  const small = await loadModel(fixture, { device: "cpu", kvCacheMemory: 16 * pageBytes, queueTimeout: 0 });
  const s = await startServer(small);
  try {
    const common = { model: "m", n: 3, max_tokens: 100, ignore_eos: true, temperature: 0 };
    // Streamed: the error is the stream's last event (the client throws it), and no choice has a
    // finish reason: the two that ran did not finish.
    const streamed = async (stream: AsyncIterable<{ choices: { index: number; finish_reason: string | null }[] }>) => {
      const finishes: string[] = [];
      const error = await failure(
        (async () => {
          for await (const c of stream) for (const ch of c.choices) if (ch.finish_reason !== null) finishes.push(`${ch.index}: ${ch.finish_reason}`);
        })(),
      );
      expect(error.code).toBe("LCKV_KV_CACHE_FULL");
      expect(finishes).toEqual([]);
    };
    await streamed(await s.client.completions.create({ ...common, prompt: "Once", stream: true }));
    await streamed(await s.client.chat.completions.create({ ...common, messages: user("Once"), stream: true }));
    // Not streamed: the error alone, no partial choices.
    for (const request of [() => s.client.completions.create({ ...common, prompt: "Once" }), () => s.client.chat.completions.create({ ...common, messages: user("Once") })]) {
      const e = await failure(request());
      expect(e.status).toBe(503);
      expect(e.code).toBe("LCKV_KV_CACHE_FULL");
    }
    await expectIdle(small);
  } finally {
    await s.app.close();
    await small.dispose();
  }
});

test("404: an unknown route, in OpenAI's error shape", async () => {
  const get = await fetch(`${srv.url}/v1/engines`);
  expect(get.status).toBe(404);
  expectShape(await get.json(), null);
  const post = await postJson(`${srv.url}/v2/chat/completions`, { messages: user("x") });
  expect(post.status).toBe(404);
  expectShape(post.json, null);
});
