/**
 * For the server's tests: a server over a model on 127.0.0.1 (a free port), the official openai
 * client pointed at it, a raw POST for bodies no client would send, a request whose target is
 * sent exactly as written, and the check that a model is idle again (nothing running, reserved or
 * queued; only the prefix cache holds pages).
 */
import * as http from "node:http";
import OpenAI from "openai";
import type { FastifyInstance } from "fastify";
import { createServer, loadModel, Model, ServerOptions } from "../../lib";

export interface TestServer {
  app: FastifyInstance;
  url: string;
  client: OpenAI;
}

export async function startServer(model: Model, options: ServerOptions = {}, apiKey = options.apiKey ?? "unused"): Promise<TestServer> {
  const app = createServer(model, options);
  const url = await app.listen({ host: "127.0.0.1", port: 0 });
  // No retries: a test sees each status the server answers.
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey, maxRetries: 0 });
  return { app, url, client };
}

/**
 * A CPU model of `dir` behind a server for a whole test file: loaded and started before its
 * tests, stopped and disposed after them. Read the fields inside tests (they are set by then).
 */
export function serverForFile(dir: string): { model: Model; srv: TestServer; client: OpenAI } {
  const ctx = {} as { model: Model; srv: TestServer; client: OpenAI };
  beforeAll(async () => {
    ctx.model = await loadModel(dir, { device: "cpu" });
    ctx.srv = await startServer(ctx.model);
    ctx.client = ctx.srv.client;
  });
  afterAll(async () => {
    await ctx.srv?.app.close();
    await ctx.model?.dispose();
  });
  return ctx;
}

export async function postJson(url: string, body: string | object, headers: Record<string, string> = {}): Promise<{ status: number; headers: Headers; json: any }> {
  const res = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  return { status: res.status, headers: res.headers, json };
}

/**
 * A request whose target is sent exactly as written on the request line, as fetch and the openai
 * client would not send it: a path percent-encoded where it need not be ("/%761/models"), or an
 * absolute URL ("http://host:port/v1/models", as a client sends it to a proxy).
 */
export function requestAsWritten(url: string, method: string, target: string, body?: object, headers: Record<string, string> = {}): Promise<{ status: number; headers: http.IncomingHttpHeaders; json: any }> {
  const { hostname, port } = new URL(url);
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = http.request({ hostname, port, method, path: target, headers: payload === undefined ? headers : { "content-type": "application/json", ...headers } }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (text += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, json: JSON.parse(text) }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(payload);
  });
}

function idle(model: Model): boolean {
  const s = model.cacheStats();
  return s.queued === 0 && s.pagesReserved === 0 && s.liveSequences === s.prefixCache.sequences && s.pagesUsed === s.pagesCached;
}

/**
 * Waits (a bounded number of turns) until the model is idle, then drops the prefix cache and
 * checks that no page is left in use and that the pool's accounting agrees with itself.
 */
export async function expectIdle(model: Model): Promise<void> {
  for (let i = 0; i < 200 && !idle(model); i++) await new Promise((r) => setTimeout(r, 10));
  expect(model.cacheStats()).toMatchObject({ queued: 0, pagesReserved: 0 });
  expect(idle(model)).toBe(true);
  model.clearPrefixCache();
  expect(model.cacheStats()).toMatchObject({ pagesUsed: 0, liveSequences: 0 });
  expect(model.auditCache()).toBe("");
}

/** A metric's value in Prometheus text (the sum over its label sets), or 0 when it is absent. */
export function metric(text: string, name: string, labels = ""): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (!(rest.startsWith(" ") || rest.startsWith("{"))) continue;
    if (labels && !rest.includes(labels)) continue;
    sum += Number(rest.slice(rest.lastIndexOf(" ") + 1));
  }
  return sum;
}
