/**
 * The OpenAI-compatible server (createServer, lckv serve) driven by the official openai ctx.client
 * over 127.0.0.1: chat and text completions, streamed and not; disconnects that stop their
 * generation and free its pages, as does a client that stops reading a stream (after
 * writeStallTimeout); 64 concurrent streams that each get what they get alone; 1000
 * requests with random disconnects that leak no page and no memory; models, health, metrics;
 * and SIGTERM on the command line, which finishes the request in flight and exits 0.
 */
import { spawn } from "node:child_process";
import * as http from "node:http";
import * as net from "node:net";
import * as path from "node:path";
import OpenAI, { APIUserAbortError } from "openai";
import { createServer, loadModel } from "../../lib";
import { rng } from "../helpers/tiny-model";
import { expectIdle, metric, postJson, serverForFile, startServer } from "../helpers/openai-server";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";
const root = path.join(__dirname, "..", "..");
const fixture = path.join(root, "test", "fixtures", "llama-mha-hd16");
const user = (content: string) => [{ role: "user" as const, content }];

const ctx = serverForFile(fixture);

const metrics = async () => (await fetch(`${ctx.srv.url}/metrics`)).text();

/** A streamed chat completion: its text, finish reason and usage chunk. */
async function streamChat(params: Omit<OpenAI.ChatCompletionCreateParamsStreaming, "stream" | "model">) {
  const stream = await ctx.client.chat.completions.create({ model: "m", ...params, stream: true, stream_options: { include_usage: true } });
  let text = "";
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | null | undefined;
  let roles = 0;
  for await (const c of stream) {
    if (c.choices.length === 0) usage = c.usage;
    for (const ch of c.choices) {
      text += ch.delta.content ?? "";
      if (ch.delta.role) roles++;
      finish = ch.finish_reason ?? finish;
    }
  }
  return { text, finish, usage, roles };
}

/** A streamed text completion: its text and finish reason. */
async function streamCompletion(params: Omit<OpenAI.CompletionCreateParamsStreaming, "stream" | "model">) {
  const stream = await ctx.client.completions.create({ model: "m", ...params, stream: true });
  let text = "";
  let finish: string | null = null;
  for await (const c of stream) for (const ch of c.choices) {
    text += ch.text;
    finish = ch.finish_reason ?? finish;
  }
  return { text, finish };
}

test("chat: the streamed text, concatenated, is the non-streamed text (greedy), with the usage chunk", async () => {
  for (const content of ["Hello there", "Tell me a story about the sea"]) {
    const full = await ctx.client.chat.completions.create({ model: "m", messages: user(content), max_tokens: 20, temperature: 0 });
    expect(full.object).toBe("chat.completion");
    expect(full.model).toBe("llama-mha-hd16");
    expect(full.choices).toHaveLength(1);
    expect(full.choices[0].message.role).toBe("assistant");
    expect(full.usage!.completion_tokens).toBeLessThanOrEqual(20);
    expect(full.usage!.total_tokens).toBe(full.usage!.prompt_tokens + full.usage!.completion_tokens);
    const s = await streamChat({ messages: user(content), max_tokens: 20, temperature: 0 });
    expect(s.text).toBe(full.choices[0].message.content);
    expect(s.finish).toBe(full.choices[0].finish_reason);
    expect(s.usage).toEqual(full.usage);
    expect(s.roles).toBe(1);
  }
});

test("completions: streamed equals non-streamed (greedy), for text and for token ids", async () => {
  for (const prompt of ["Once upon a time", [0, 5, 17, 42, 99]]) {
    const full = await ctx.client.completions.create({ model: "m", prompt, max_tokens: 16, temperature: 0 });
    expect(full.object).toBe("text_completion");
    expect(full.usage!.prompt_tokens).toBe(typeof prompt === "string" ? ctx.model.toTokenIds(prompt).length : prompt.length);
    const s = await streamCompletion({ prompt, max_tokens: 16, temperature: 0 });
    expect(s.text).toBe(full.choices[0].text);
    expect(s.finish).toBe(full.choices[0].finish_reason);
  }
});

test("stop, max_completion_tokens and seed", async () => {
  const base = await ctx.client.completions.create({ model: "m", prompt: "The king", max_tokens: 24, temperature: 0 });
  const text = base.choices[0].text;
  const stop = text.slice(8, 10);
  const cut = await ctx.client.completions.create({ model: "m", prompt: "The king", max_tokens: 24, temperature: 0, stop: [stop] });
  expect(cut.choices[0].text).toBe(text.slice(0, text.indexOf(stop)));
  expect(cut.choices[0].finish_reason).toBe("stop");
  const short = await ctx.client.chat.completions.create({ model: "m", messages: user("Hi"), max_completion_tokens: 3, temperature: 0 });
  expect(short.usage!.completion_tokens).toBeLessThanOrEqual(3);
  const sample = () => ctx.client.chat.completions.create({ model: "m", messages: user("Hi"), max_tokens: 12, temperature: 1, top_p: 0.9, seed: 7 });
  expect((await sample()).choices[0].message.content).toBe((await sample()).choices[0].message.content);
});

test("GET /v1/models, /health and /metrics", async () => {
  const models = await ctx.client.models.list();
  expect(models.data.map((m) => m.id)).toEqual(["llama-mha-hd16"]);
  expect((await ctx.client.models.retrieve("llama-mha-hd16")).id).toBe("llama-mha-hd16");
  const health = await fetch(`${ctx.srv.url}/health`);
  expect(health.status).toBe(200);
  expect(await health.json()).toEqual({ status: "ok" });
  const before = metric(await metrics(), "lckv_generated_tokens_total");
  const r = await ctx.client.completions.create({ model: "m", prompt: "A", max_tokens: 5, temperature: 0 });
  const text = await metrics();
  expect(metric(text, "lckv_generated_tokens_total") - before).toBe(r.usage!.completion_tokens);
  for (const name of ["lckv_queue_length", "lckv_running_sequences", "lckv_kv_pages_used", "lckv_kv_pages_cached"]) expect(text).toMatch(new RegExp(`^${name} \\d+$`, "m"));
  expect(metric(text, "lckv_kv_pages_used")).toBe(ctx.model.cacheStats().pagesUsed);
  expect(metric(text, "lckv_time_to_first_token_seconds_count")).toBeGreaterThan(0);
  expect(metric(text, "lckv_inter_token_latency_seconds_count")).toBeGreaterThan(0);
  // An end-of-sequence token is generated: the counter takes it as usage does, and a completion
  // that is nothing but one has its time to first token.
  const eos = ctx.model.eosTokenIds[0];
  const ttft = metric(text, "lckv_time_to_first_token_seconds_count");
  const ended = await ctx.client.completions.create({ model: "m", prompt: "A", max_tokens: 5, n: 3, logit_bias: { [eos]: 100 } });
  expect(ended.usage!.completion_tokens).toBe(3);
  const after = await metrics();
  expect(metric(after, "lckv_generated_tokens_total") - metric(text, "lckv_generated_tokens_total")).toBe(3);
  expect(metric(after, "lckv_time_to_first_token_seconds_count") - ttft).toBe(3);
});

test("any model name: requests take it, models.retrieve answers for it, /v1/models lists the model's id", async () => {
  // The README's own client example names "lckv".
  const lckv = await ctx.client.models.retrieve("lckv");
  expect(lckv).toMatchObject({ id: "lckv", object: "model", owned_by: "lckv" });
  const r = await ctx.client.chat.completions.create({ model: "lckv", messages: user("Hi"), max_tokens: 2 });
  expect(r.model).toBe("llama-mha-hd16");
  expect((await ctx.client.models.retrieve("gpt-4")).id).toBe("gpt-4");
  // A hub id is a name with a slash: the client sends it as %2F, curl as a slash.
  const hubId = "HuggingFaceTB/SmolLM2-135M-Instruct";
  const named = await startServer(ctx.model, { modelId: hubId });
  try {
    expect((await named.client.models.list()).data.map((m) => m.id)).toEqual([hubId]);
    expect((await named.client.models.retrieve(hubId)).id).toBe(hubId);
    const raw = await fetch(`${named.url}/v1/models/${hubId}`);
    expect(raw.status).toBe(200);
    expect(((await raw.json()) as { id: string }).id).toBe(hubId);
    // No name at all is no model.
    const none = await fetch(`${named.url}/v1/models/`);
    expect(none.status).toBe(404);
    expect(((await none.json()) as { error: { code: string } }).error.code).toBe("model_not_found");
  } finally {
    await named.app.close();
  }
});

test("a ctx.client that disconnects mid-stream stops its generation, and its pages are freed", async () => {
  const aborted = () => metrics().then((t) => metric(t, "lckv_requests_total", 'status="499"'));
  const before = await aborted();
  const stream = await ctx.client.chat.completions.create({ model: "m", messages: user("Go on"), max_tokens: 100, temperature: 0, stream: true });
  for await (const c of stream) {
    void c;
    break;  // ends the iteration and aborts the request: its connection closes
  }
  for (let i = 0; i < 200 && (await aborted()) === before; i++) await new Promise((r) => setTimeout(r, 10));
  expect(await aborted()).toBe(before + 1);
  await expectIdle(ctx.model);
  expect(metric(await metrics(), "lckv_running_sequences")).toBe(0);
});

/** A request over a server's Unix socket: its status and body. */
function unixRequest(socketPath: string, method: string, urlPath: string, body?: object): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method, path: urlPath, headers: body ? { "content-type": "application/json" } : {} }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (text += d));
      res.on("end", () => resolve({ status: res.statusCode!, text }));
    });
    req.on("error", reject);
    req.end(body ? JSON.stringify(body) : undefined);
  });
}

test("a client that stops reading a stream is dropped after writeStallTimeout: its generation stops, its pages go back, the next request is served", async () => {
  // Over a Unix socket, whose buffers fill with a small part of what this stream writes (loopback
  // TCP's grow to megabytes, as much as the whole stream on some hosts): the stall reaches the server.
  const sock = path.join(testTempDir("stall-"), "s.sock");
  const app = createServer(ctx.model, { writeStallTimeout: 300 });
  await app.listen({ path: sock });
  const scrape = async () => (await unixRequest(sock, "GET", "/metrics")).text;
  let opened: net.Socket | undefined;
  try {
    const before = await scrape();
    const added = (text: string, name: string, labels = "") => metric(text, name, labels) - metric(before, name, labels);
    // 64 completions of 100 tokens, each token with its 20 most likely: megabytes of events.
    const body = JSON.stringify({ model: "m", prompt: "Once upon a time", n: 64, logprobs: 20, max_tokens: 100, ignore_eos: true, temperature: 0, stream: true });
    const client = (opened = net.connect(sock));
    client.on("error", () => undefined);  // the server drops the connection: whichever way it ends is fine
    const closed = new Promise((resolve) => client.once("close", resolve));
    client.write(`POST /v1/completions HTTP/1.1\r\nHost: lckv\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    client.pause();  // and reads nothing
    let after = await scrape();
    for (let i = 0; i < 500 && added(after, "lckv_requests_total") === 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      after = await scrape();
    }
    // Counted as a client that went away, with its generation cut short and every sequence stopped.
    expect(added(after, "lckv_requests_total", 'status="499"')).toBe(1);
    expect(added(after, "lckv_requests_total")).toBe(1);
    expect(added(after, "lckv_generated_tokens_total")).toBeLessThan(64 * 100);
    expect(metric(after, "lckv_running_sequences")).toBe(0);
    await expectIdle(ctx.model);
    // The connection was dropped: reading what it had buffered, the client comes to its end, with no [DONE].
    let received = "";
    client.setEncoding("utf8");
    client.on("data", (d: string) => (received += d));
    client.resume();
    await closed;
    expect(received).toMatch(/^HTTP\/1\.1 200/);
    expect(received).toMatch(/"logprobs":\{/);
    expect(received).not.toMatch(/\[DONE\]/);
    // The next request is served.
    const next = await unixRequest(sock, "POST", "/v1/completions", { model: "m", prompt: "Once", max_tokens: 5, temperature: 0 });
    expect(next.status).toBe(200);
    expect(JSON.parse(next.text).choices[0].finish_reason).toBe("length");
  } finally {
    opened?.destroy();  // (close() would wait for it, had the server not dropped it)
    await app.close();
  }
});

/** Sends raw HTTP/1.1 on a Unix socket and reads all that comes back, `bytesPerTick` every 10 ms (all at once if Infinity). */
async function rawExchange(sock: string, requests: string, bytesPerTick: number): Promise<string> {
  const client = net.connect(sock);
  try {
    client.write(requests);
    client.pause();
    let received = "";
    let ended = false;
    client.on("end", () => (ended = true));
    client.on("close", () => (ended = true));
    while (!ended) {
      await new Promise((r) => setTimeout(r, 10));
      let chunk: Buffer | null;
      while ((chunk = client.read(Math.min(bytesPerTick, client.readableLength || 1))) !== null) {
        received += chunk.toString("latin1");
        if (bytesPerTick !== Infinity) break;
      }
    }
    let rest: Buffer | null;
    while ((rest = client.read()) !== null) received += rest.toString("latin1");
    return received;
  } finally {
    client.destroy();
  }
}

const post = (body: object, close = false) =>
  `POST /v1/completions HTTP/1.1\r\nHost: lckv\r\nContent-Type: application/json\r\n${close ? "Connection: close\r\n" : ""}Content-Length: ${Buffer.byteLength(JSON.stringify(body))}\r\n\r\n${JSON.stringify(body)}`;

test("a client that reads slowly but steadily is not dropped: the deadline runs between two writes the socket completes", async () => {
  const sock = path.join(testTempDir("slow-"), "s.sock");
  // At 200 KiB/s a Unix socket's writer wakes about once a second (the kernel wakes it when half
  // of its buffer has gone): well within this deadline, though the stream takes seconds in all.
  const app = createServer(ctx.model, { writeStallTimeout: 3000 });
  await app.listen({ path: sock });
  try {
    const body = { model: "m", prompt: "Once upon a time", n: 32, logprobs: 20, max_tokens: 50, ignore_eos: true, temperature: 0, stream: true };
    const received = await rawExchange(sock, post(body, true), 2048);
    expect(received.length).toBeGreaterThan(800_000);  // far more than the socket's buffers hold
    expect(received).toMatch(/^HTTP\/1\.1 200/);
    // The request asked to close its connection after the response, and the stream says it will.
    expect(received.slice(0, received.indexOf("\r\n\r\n"))).toMatch(/\r\nconnection: close(\r\n|$)/i);
    expect(received).toMatch(/data: \[DONE\]\n\n\r\n0\r\n\r\n$/);
    await expectIdle(ctx.model);
  } finally {
    await app.close();
  }
});

test("a stream pipelined behind another response on its connection waits its turn without being dropped as stalled", async () => {
  const sock = path.join(testTempDir("pipe-"), "s.sock");
  const app = createServer(ctx.model, { writeStallTimeout: 200 });
  await app.listen({ path: sock });
  try {
    // The first (not streamed) takes far longer than the deadline; the stream behind it fills its
    // buffer meanwhile, with no socket yet to write to. The client reads everything at once.
    const first = { model: "m", prompt: "Once", n: 32, max_tokens: 120, ignore_eos: true, temperature: 0 };
    const second = { model: "m", prompt: "Once upon a time", n: 16, logprobs: 20, max_tokens: 40, ignore_eos: true, temperature: 0, stream: true };
    const received = await rawExchange(sock, post(first) + post(second, true), Infinity);
    const responses = received.split(/(?=HTTP\/1\.1 )/);
    expect(responses).toHaveLength(2);
    expect(responses[0]).toMatch(/^HTTP\/1\.1 200/);
    expect(JSON.parse(responses[0].slice(responses[0].indexOf("\r\n\r\n") + 4)).choices).toHaveLength(32);
    expect(responses[1]).toMatch(/^HTTP\/1\.1 200/);
    expect(responses[1]).toMatch(/data: \[DONE\]\n\n\r\n0\r\n\r\n$/);
    await expectIdle(ctx.model);
  } finally {
    await app.close();
  }
});

const words = ["The sea", "A king", "Once", "In the morning", "Hello", "The letter said", "Rain", "She walked"];

test("64 concurrent streaming clients each get exactly what they get alone (greedy)", async () => {
  const requests = Array.from({ length: 64 }, (_, i) => ({ prompt: `${words[i % words.length]} ${i}`, chat: i % 2 === 0, max: 4 + (i % 13) }));
  const run = (q: (typeof requests)[number]) =>
    q.chat
      ? streamChat({ messages: user(q.prompt), max_tokens: q.max, temperature: 0 }).then((s) => s.text)
      : streamCompletion({ prompt: q.prompt, max_tokens: q.max, temperature: 0 }).then((s) => s.text);
  const alone: string[] = [];
  for (const q of requests) alone.push(await run(q));
  const together = await Promise.all(requests.map(run));
  expect(together).toEqual(alone);
  await expectIdle(ctx.model);
  // Together they shared steps: the gauge of the largest step says how many.
  const most = metric(await metrics(), "lckv_step_sequences_max");
  expect(most).toBeGreaterThan(1);
  expect(most).toBe(ctx.model.schedulerStats().maxBatch);
});

test("1000 requests with random disconnects: no page leaked, memory flat", async () => {
  const r = rng(2024);
  const pick = (n: number) => Math.floor(r() * n);
  let disconnected = 0;
  const one = async () => {
    const ac = new AbortController();
    const stream = r() < 0.5;
    const chat = r() < 0.5;
    const disconnect = r() < 0.3;
    const after = pick(3);
    const body = { model: "m", max_tokens: 1 + pick(6), temperature: r() < 0.5 ? 0 : 1, seed: pick(1000) };
    const prompt = `${words[pick(words.length)]} ${pick(100)}`;
    try {
      if (stream) {
        const s = chat
          ? await ctx.client.chat.completions.create({ ...body, messages: user(prompt), stream: true }, { signal: ac.signal })
          : await ctx.client.completions.create({ ...body, prompt, stream: true }, { signal: ac.signal });
        // Leaving the loop aborts the request: its connection closes. (Aborting through the
        // signal instead can leave fetch waiting forever when the response had already ended.)
        let k = 0;
        for await (const c of s as AsyncIterable<unknown>) {
          void c;
          if (disconnect && k++ >= after) break;
        }
      } else {
        const p = chat ? ctx.client.chat.completions.create({ ...body, messages: user(prompt) }, { signal: ac.signal }) : ctx.client.completions.create({ ...body, prompt }, { signal: ac.signal });
        if (disconnect) setTimeout(() => ac.abort(), after);
        await p;
      }
    } catch (e) {
      if (!(e instanceof APIUserAbortError)) throw e;
      disconnected++;
    }
  };
  const batch = async (n: number) => {
    for (let i = 0; i < n; i += 25) await Promise.all(Array.from({ length: 25 }, one));
  };
  await batch(100);  // warm-up: buffers, pools and code paths reach their working size
  const rss0 = process.memoryUsage().rss;
  await batch(900);
  const rss1 = process.memoryUsage().rss;
  expect(disconnected).toBeGreaterThan(50);
  expect(rss1 - rss0).toBeLessThan(100 * 2 ** 20);
  await expectIdle(ctx.model);
  expect(metric(await metrics(), "lckv_running_sequences")).toBe(0);
});

test("close() takes no new request, finishes the one in flight, then resolves", async () => {
  const other = await startServer(ctx.model);
  const stream = await other.client.completions.create({ model: "m", prompt: "Once", max_tokens: 60, temperature: 0, stream: true });
  let closed: Promise<void> | undefined;
  let text = "";
  let finish: string | null = null;
  for await (const c of stream) {
    closed ??= other.app.close();
    text += c.choices[0]?.text ?? "";
    finish = c.choices[0]?.finish_reason ?? finish;
  }
  const alone = await ctx.client.completions.create({ model: "m", prompt: "Once", max_tokens: 60, temperature: 0 });
  expect(text).toBe(alone.choices[0].text);
  expect(finish).toBe(alone.choices[0].finish_reason);
  await closed;
  await expect(fetch(`${other.url}/health`)).rejects.toThrow();
});

/**
 * `lckv serve --port 0 --device cpu ...args` in a child process: resolves with its URL once it
 * listens. `stderr()` is what it printed so far; `exited` its exit code.
 */
function spawnServe(args: string[]) {
  const child = spawn(process.execPath, [path.join(root, "dist", "cli.js"), "serve", "--port", "0", "--device", "cpu", ...args], { cwd: root, stdio: ["ignore", "ignore", "pipe"] });
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  let stderr = "";
  child.stderr.setEncoding("utf8");
  const url = new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no URL on stderr after 60 s: ${stderr}`)), 60000);
    child.stderr.on("data", (d: string) => {
      stderr += d;
      const m = /lckv: listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on("exit", () => {
      clearTimeout(timer);
      reject(new Error(`exited before listening: ${stderr}`));
    });
  });
  url.catch(() => undefined);  // a test that expects the exit reads `exited` instead
  return { child, url, exited, stderr: () => stderr };
}

test("a chunked body over the limit is drained: its 413 arrives and the connection serves the next request; past 8 times the limit it closes", async () => {
  const srv = await startServer(ctx.model, { bodyLimit: 1 << 16 });
  try {
    const { port } = new URL(srv.url);
    const good = JSON.stringify({ model: "m", prompt: "x", max_tokens: 1 });
    const next = `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${good.length}\r\n\r\n${good}`;
    // The whole chunked body, then the next request on the same connection; the statuses it read.
    const send = (bytes: number) =>
      new Promise<{ statuses: string[]; error?: string }>((resolve) => {
        const socket = net.connect(Number(port), "127.0.0.1");
        let got = "";
        let error: string | undefined;
        const statuses = () => [...got.matchAll(/HTTP\/1\.1 (\d+)/g)].map((m) => m[1]);
        socket.on("data", (d) => {
          got += d.toString("latin1");
          if (statuses().length === 2) socket.destroy();
        });
        socket.on("error", (e: NodeJS.ErrnoException) => (error = e.code));
        socket.on("close", () => resolve({ statuses: statuses(), error }));
        socket.write("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
        socket.write(`${bytes.toString(16)}\r\n`);
        socket.write(Buffer.alloc(bytes, "x"));
        socket.write(`\r\n0\r\n\r\n${next}`);
        setTimeout(() => socket.destroy(), 5000);
      });
    for (const times of [2, 7]) expect(await send(times << 16)).toEqual({ statuses: ["413", "200"], error: undefined });
    expect((await send(9 << 16)).statuses).not.toContain("200");
    expect((await postJson(`${srv.url}/v1/completions`, { model: "m", prompt: "x", max_tokens: 1 })).status).toBe(200);
  } finally {
    await srv.app.close();
  }
});

test("lckv serve: a body over the limit gets its 413 while the client still sends it, and the connection goes on", async () => {
  // fetch sends the whole body without waiting for 100 Continue. fastify answers at once, and
  // closing the connection with most of the body unread reset it: about 1 request in 8 saw EPIPE
  // instead of the 413. (In-process the race did not show: the server runs in another process.)
  const { child, exited, ...served } = spawnServe([]);
  try {
    const url = `${await served.url}/v1/completions`;
    const body = JSON.stringify({ model: "default", prompt: "x".repeat(9 << 20), max_tokens: 2 });
    for (let i = 0; i < 30; i++) {
      const r = await postJson(url, body);
      expect(r.status).toBe(413);
      expect(r.json.error.code).toBe("request_too_large");
    }
    expect((await postJson(url, { model: "default", prompt: "x", max_tokens: 2 })).status).toBe(200);
  } finally {
    child.kill("SIGTERM");
    await exited;
  }
});

test("lckv serve: SIGTERM finishes the request in flight, then the process exits 0", async () => {
  const { child, exited, stderr: output, ...served } = spawnServe([]);
  try {
    const url = await served.url;
    const c = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 });
    const stream = await c.completions.create({ model: "default", prompt: "Once upon a time", max_tokens: 200, temperature: 0.8, seed: 1, stream: true });
    let text = "";
    let finish: string | null = null;
    let signalled = false;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
      if (!signalled) child.kill("SIGTERM");
      signalled = true;
    }
    expect(finish === "stop" || finish === "length").toBe(true);
    expect(text.length).toBeGreaterThan(0);
    // No new work once it is stopping: the listener is closed (or, on an open connection, 503).
    const late = await fetch(`${url}/health`).then((r) => r.status, () => "refused");
    expect([503, "refused"]).toContain(late);
    expect(await exited).toBe(0);
    expect(output()).toMatch(/stopping/);
  } finally {
    if (child.exitCode === null) child.kill("SIGKILL");
  }
});

test("lckv serve --max-batch caps the sequences of a step; a bad value is refused by name", async () => {
  const { child, url, exited } = spawnServe(["--max-batch", "1"]);
  try {
    const c = new OpenAI({ baseURL: `${await url}/v1`, apiKey: "unused", maxRetries: 0 });
    const done = await Promise.all(["The sea", "A king", "Once"].map((prompt) => c.completions.create({ model: "default", prompt, max_tokens: 20, temperature: 0 })));
    for (const r of done) expect(r.usage!.completion_tokens).toBeGreaterThan(0);
    const text = await (await fetch(`${await url}/metrics`)).text();
    expect(metric(text, "lckv_step_sequences_max")).toBe(1);
    child.kill("SIGTERM");
    expect(await exited).toBe(0);
  } finally {
    if (child.exitCode === null) child.kill("SIGKILL");
  }
  const bad = spawnServe(["--max-batch", "0"]);
  expect(await bad.exited).toBe(1);
  expect(bad.stderr()).toMatch(/--max-batch must be a positive integer/);
});

test("lckv serve --write-stall-timeout: a bad value is refused by name before the model loads", async () => {
  for (const [value, message] of [
    ["0", /option '--write-stall-timeout': must be a positive integer, got 0/],
    ["soon", /--write-stall-timeout must be an integer/],
  ] as const) {
    const bad = spawnServe(["--write-stall-timeout", value]);
    expect(await bad.exited).toBe(1);
    expect(bad.stderr()).toMatch(message);
  }
});

test("fastify's inject() (how a server is tested without a port) is answered, and close() ends after it", async () => {
  // In a node of its own: jest cannot load inject's cookie module (ESM), which node itself can.
  const script = `
    const { loadModel, createServer } = require(${JSON.stringify(path.join(root, "dist"))});
    (async () => {
      const m = await loadModel(${JSON.stringify(fixture)}, { device: "cpu" });
      const app = createServer(m);
      const r = await app.inject({ method: "GET", url: "/health" });
      await app.close();
      await m.dispose();
      console.log(r.statusCode, r.body, "closed");
    })().catch((e) => { console.error(e); process.exit(1); });`;
  const child = spawn(process.execPath, ["-e", script], { cwd: root, env: { ...process.env, LCKV_QUIET: "1" } });
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const code = await new Promise((resolve) => child.on("close", resolve));
  expect(err).toBe("");
  expect(code).toBe(0);
  expect(out.trim()).toBe('200 {"status":"ok"} closed');
});

test("lckv_running_sequences counts the sequences prefilling or generating, not the requests waiting for K/V pages (lckv_queue_length)", async () => {
  const probe = await loadModel(fixture, { device: "cpu" });
  const pageBytes = probe.cacheStats().pageBytes;
  await probe.dispose();
  const model = await loadModel(fixture, { device: "cpu", prefixCache: 0, kvCacheMemory: 8 * pageBytes });
  const srv = await startServer(model);
  try {
    const scrape = async () => (await fetch(`${srv.url}/metrics`)).text();
    const hog = model.createSequence();
    await hog.append(Array.from({ length: 120 }, (_, i) => 3 + (i % 50))); // all 8 pages, and idle
    const waiting = srv.client.completions.create({ model: "m", prompt: "Once upon", max_tokens: 4, n: 2 });
    let text = await scrape();
    for (let i = 0; i < 200 && metric(text, "lckv_queue_length") === 0; i++) text = (await new Promise((r) => setTimeout(r, 10)), await scrape());
    expect(metric(text, "lckv_queue_length")).toBe(1);
    expect(metric(text, "lckv_running_sequences")).toBe(0);
    // A running request counts once it is admitted: its prefill, then each of its n completions.
    const running = model.createSequence();
    hog.dispose();
    const r = await waiting;
    expect(r.choices).toHaveLength(2);
    await running.append([5, 6, 7]);
    const gen = running.generate({ maxNewTokens: 30, ignoreEos: true });
    let sawRunning = 0;
    for await (const c of gen) {
      void c;
      sawRunning = Math.max(sawRunning, metric(await scrape(), "lckv_running_sequences"));
    }
    expect(sawRunning).toBe(1);
    running.dispose();
    expect(metric(await scrape(), "lckv_running_sequences")).toBe(0);
  } finally {
    await srv.app.close();
    await model.dispose();
  }
});
