/**
 * createServer(): an OpenAI-compatible HTTP server over a loaded model (fastify): chat and text
 * completions, streamed or not, GET /v1/models, /health and Prometheus /metrics. The caller
 * owns the model and the server's life: `await app.listen({ host, port })` starts it, and
 * `await app.close()` stops taking requests, lets those in flight finish, then resolves.
 *
 *     const app = createServer(model, { apiKey: "secret" });
 *     const url = await app.listen({ host: "127.0.0.1", port: 8080 });
 */
import { createHash, timingSafeEqual } from "node:crypto";
import * as path from "node:path";
import cors from "@fastify/cors";
import Fastify, { FastifyInstance } from "fastify";
import { InvalidOptionError } from "../errors";
import { Model } from "../model";
import { describe, INT32_MAX, MAX_PREFILL_PASSES, posInt, prefillMode, type PrefillMode, tolerance } from "../options";
import { refuseUnusedPrefillOptions } from "../prefill-options";
import { ConnectionTracker } from "./connections";
import type { ServerPrefill } from "./generation";
import { ServerMetrics } from "./metrics";
import { errorBody, installErrorHandlers, invalidJsonBody, sendHttpError } from "./openai-errors";
import type { ServerContext } from "./request-handler";
import { registerChatRoutes } from "./routes-chat";
import { registerCompletionRoutes } from "./routes-completions";
import { DEFAULT_WRITE_STALL_TIMEOUT_MS } from "./sse";

export interface ServerOptions {
  /**
   * When set, every request must carry `Authorization: Bearer <apiKey>` (what OpenAI's clients
   * send); others get 401, a path that names no route included. /health and /metrics stay open,
   * and so does a browser's CORS preflight (OPTIONS), which never carries a key.
   */
  apiKey?: string;
  /**
   * The model's id in /v1/models and in responses (default: the model directory's name). Requests
   * may name any model, and GET /v1/models/{name} answers for any name.
   */
  modelId?: string;
  /**
   * Largest request body in bytes (default 8 MiB); a larger one is answered 413. The rest of a
   * body of up to 8 times this (declared, or chunked) is read and dropped, so that a client still
   * sending it gets the 413; beyond that the connection closes.
   */
  bodyLimit?: number;
  /** fastify's logger: false (default), true, or its options. */
  logger?: boolean | Record<string, unknown>;
  /**
   * Origins whose pages a browser lets call the server (CORS): ["*"] (the default: any, as vLLM's
   * and llama.cpp's servers allow), a list of origins ("https://app.example:8443"), or [] for
   * none (browsers then refuse cross-origin calls; other clients are unaffected).
   */
  allowedOrigins?: string[];
  /**
   * Milliseconds a streamed response waits for a client that stopped reading (its socket's buffer
   * full, nothing drained) before it drops the connection and stops the generation, freeing its
   * K/V pages, as for a client that went away (default 30000; Infinity: no limit; at most 2^31 - 1).
   */
  writeStallTimeout?: number;
  /**
   * Milliseconds a client has to send a whole request, headers and body, before it is answered
   * 408 (in OpenAI's error shape) and its connection closed (default 60000; at most 2^31 - 1;
   * Infinity: no limit on the body, while Node's own 60 s for the headers stays). A client that
   * sends a request a few bytes at a time would otherwise hold its connection for good: fastify
   * turns off Node's own limit. The response is not bounded by it (a stream may run long).
   */
  requestTimeout?: number;
  /**
   * How every request's prompt is prefilled, as generate()'s `prefill` (OpenAI's API has no field
   * for it). Default: the model's (Model.generationDefaults), which on a model with a cyclic group
   * also lets the engine run prompts as batched token steps while other requests are in flight.
   * A mode set here is every request's, as if each had asked for it.
   */
  prefill?: PrefillMode;
  /** Passes of `prefill: "iterative"` (default: the model's m + b); only with that prefill. */
  prefillPasses?: number;
  /** The tolerance of `prefill: "fixed-point"` (default 1e-6); only with that prefill. */
  prefillTolerance?: number;
}

/** ServerOptions.requestTimeout's default, in ms. */
const DEFAULT_REQUEST_TIMEOUT_MS = 60_000;
/** Node's own deadline for a request's headers (http.Server's headersTimeout), in ms. */
const NODE_HEADERS_TIMEOUT_MS = 60_000;

const SERVER_KEYS = new Set(["apiKey", "modelId", "bodyLimit", "logger", "allowedOrigins", "writeStallTimeout", "requestTimeout", "prefill", "prefillPasses", "prefillTolerance"]);

/**
 * createServer's options, checked as loadModel checks its own: an unknown or mistyped option is
 * an InvalidOptionError naming it (the command line checks them before it loads the model).
 */
export function checkServerOptions(options: unknown): ServerOptions {
  if (options === null || typeof options !== "object" || Array.isArray(options)) throw new InvalidOptionError("options", `must be an object, got ${describe(options)}`);
  const o = options as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!SERVER_KEYS.has(k)) throw new InvalidOptionError(k, `is not a createServer option (known: ${[...SERVER_KEYS].join(", ")})`);
  }
  if (o.apiKey !== undefined) apiKey(o.apiKey);
  if (o.modelId !== undefined && (typeof o.modelId !== "string" || o.modelId === "")) throw new InvalidOptionError("modelId", `must be a non-empty string, got ${describe(o.modelId)}`);
  if (o.bodyLimit !== undefined) posInt("bodyLimit", o.bodyLimit);
  if (o.logger !== undefined && typeof o.logger !== "boolean" && (o.logger === null || typeof o.logger !== "object" || Array.isArray(o.logger))) {
    throw new InvalidOptionError("logger", `must be true, false or fastify's logger options (an object), got ${describe(o.logger)}`);
  }
  if (o.allowedOrigins !== undefined) allowedOrigins(o.allowedOrigins);
  // setTimeout takes at most 2^31 - 1 ms (a larger delay fires at once): no limit is Infinity.
  if (o.writeStallTimeout !== undefined && o.writeStallTimeout !== Infinity) posInt("writeStallTimeout", o.writeStallTimeout, INT32_MAX);
  if (o.requestTimeout !== undefined && o.requestTimeout !== Infinity) posInt("requestTimeout", o.requestTimeout, INT32_MAX);
  if (o.prefill !== undefined) prefillMode(o.prefill);
  if (o.prefillPasses !== undefined) posInt("prefillPasses", o.prefillPasses, MAX_PREFILL_PASSES);
  if (o.prefillTolerance !== undefined) tolerance(o.prefillTolerance);
  // With the mode given, an option of another mode is refused here; without it, createServer
  // refuses one that the model's default mode would ignore.
  refuseUnusedPrefillOptions(null, o);
  return o as ServerOptions;
}

/** The prefill options every request gets (ServerOptions.prefill and its passes and tolerance), leaving out those not given. */
function requestPrefill(options: ServerOptions): ServerPrefill {
  const p: ServerPrefill = {};
  if (options.prefill !== undefined) p.prefill = options.prefill;
  if (options.prefillPasses !== undefined) p.prefillPasses = options.prefillPasses;
  if (options.prefillTolerance !== undefined) p.prefillTolerance = options.prefillTolerance;
  return p;
}

// Each entry is "*" or an origin as browsers send it: scheme, host and port, no path.
function allowedOrigins(v: unknown): void {
  const shape = 'must be a list of origins (as "https://host:port"), ["*"] for any or [] for none';
  if (!Array.isArray(v)) throw new InvalidOptionError("allowedOrigins", `${shape}, got ${describe(v)}`);
  for (const o of v) {
    let origin: string | undefined;
    try {
      origin = typeof o === "string" && o !== "*" ? new URL(o).origin : undefined;
    } catch {
      origin = undefined;
    }
    if (o !== "*" && origin !== o) throw new InvalidOptionError("allowedOrigins", `${shape}; ${describe(o)} is not one${origin ? ` (its origin is ${JSON.stringify(origin)})` : ""}`);
  }
}

// A key no request can send would lock every request out: an empty one, or one that begins
// or ends with whitespace (the header's key is read without it).
function apiKey(v: unknown): void {
  if (typeof v !== "string" || v === "") throw new InvalidOptionError("apiKey", `must be a non-empty string, got ${describe(v)}`);
  if (v.trim() !== v) throw new InvalidOptionError("apiKey", `must not begin or end with whitespace, which the Authorization header's key is read without; got ${describe(v)}`);
}

// The routes any client may call without the key: health probes and metrics scrapers.
const PUBLIC_ROUTES = new Set(["/health", "/metrics"]);

// Keys are compared as digests, in constant time, so that the time a wrong key takes says
// nothing about the right one (not even its length).
function keyCheck(apiKey: string): (header: string | undefined) => boolean {
  const want = createHash("sha256").update(apiKey).digest();
  return (header) => {
    const m = /^Bearer\s+(.+)$/i.exec(header ?? "");
    return !!m && timingSafeEqual(createHash("sha256").update(m[1].trim()).digest(), want);
  };
}

export function createServer(model: Model, options: ServerOptions = {}): FastifyInstance {
  if (!(model instanceof Model)) throw new InvalidOptionError("model", `must be a Model from loadModel(), got ${describe(model)}`);
  if (model.disposed) throw new InvalidOptionError("model", "was disposed: load it again");
  checkServerOptions(options);
  const prefill = requestPrefill(options);
  refuseUnusedPrefillOptions(model, prefill);
  const requestTimeout = options.requestTimeout ?? DEFAULT_REQUEST_TIMEOUT_MS;
  const headersTimeout = Math.min(NODE_HEADERS_TIMEOUT_MS, requestTimeout);
  // CORS: the origins whose pages may read the answers (applied below through @fastify/cors, and
  // by the connection tracker to the answers it writes itself).
  const origins = options.allowedOrigins ?? ["*"];
  // As @fastify/cors answers: "*" for any origin; with a list, the request's origin where listed,
  // and Vary: Origin either way.
  const corsFor = (origin: string | undefined) =>
    origins.length === 0 || origins.includes("*")
      ? { allow: origins.length === 0 ? null : "*", vary: false }
      : { allow: origin !== undefined && origins.includes(origin) ? origin : null, vary: true };
  const connections = new ConnectionTracker(requestTimeout, headersTimeout, corsFor);
  const app = Fastify({
    logger: options.logger ?? false,
    bodyLimit: options.bodyLimit ?? 8 * 1024 * 1024,
    // Requests are checked exactly as sent: an unknown field is refused, not dropped, and a
    // string is not taken for a number.
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: false, allErrors: false, allowUnionTypes: true } },
    // While closing, requests on open connections are answered 503 (others find no listener).
    return503OnClosing: true,
    // Node checks its request and header deadlines every connectionsCheckingInterval ms (30000 by
    // default): a tenth of the deadline cuts a request within 1.1 times it. Headers get the same
    // deadline where it is shorter than Node's 60 s for them. (With no deadline, Node's defaults.)
    requestTimeout: requestTimeout === Infinity ? 0 : requestTimeout,
    // A request Node could not read is answered in OpenAI's shape, and never inside another response.
    clientErrorHandler: connections.clientError,
    http: { connectionsCheckingInterval: Math.max(10, Math.min(30_000, Math.floor(requestTimeout / 10))), headersTimeout },
  });
  const modelId = options.modelId ?? path.basename(model.directory);
  // The model's files are named to clients by the model's id, not by where they lie on the server.
  const publicText = (message: string) => message.split(model.directory).join(modelId);
  const ctx: ServerContext = {
    model,
    metrics: new ServerMetrics(model),
    modelId,
    publicText,
    writeStallTimeout: options.writeStallTimeout ?? DEFAULT_WRITE_STALL_TIMEOUT_MS,
    prefill,
  };
  installErrorHandlers(app, publicText);
  connections.attach(app);
  // Bodies are JSON only. fastify would also take text/plain, as a string that then fails the
  // schema with "must be object"; without that parser such a body gets 415, naming its type.
  app.removeContentTypeParser("text/plain");
  // fastify's JSON parser (which also refuses prototype-poisoning keys), with OpenAI's error for a
  // body that is not JSON, saying where it went wrong, in place of fastify's FST_ERR_CTP_ code.
  const parseJson = app.getDefaultJsonParser("error", "error");
  app.removeContentTypeParser("application/json");
  app.addContentTypeParser("application/json", { parseAs: "string" }, (request, body, done) => {
    const text = String(body);
    parseJson(request, text, (err, value) => (err ? done(invalidJsonBody(text), undefined) : done(null, value)));
  });

  // CORS: the answer to a browser's preflight (OPTIONS), and the headers that let a page of an
  // allowed origin read responses. A preflight carries no key, so the key check passes it.
  if (origins.length > 0) app.register(cors, { origin: origins.includes("*") ? "*" : origins, methods: ["GET", "POST"], exposedHeaders: ["Retry-After"] });
  if (options.apiKey !== undefined) {
    const ok = keyCheck(options.apiKey);
    app.addHook("onRequest", async (request, reply) => {
      // Decided by the route the request matched, not by its URL as sent: the router decodes
      // the path ("/%761/models" is /v1/models) and takes an absolute URL's, so a test of the
      // raw URL would let those through. A path that matches no route needs the key as well.
      // Without CORS there is no preflight to pass, so an OPTIONS needs the key as any request does.
      if ((origins.length > 0 && request.method === "OPTIONS") || PUBLIC_ROUTES.has(request.routeOptions.url ?? "")) return;
      const header = request.headers.authorization;
      if (ok(header)) return;
      const message = header ? "Incorrect API key provided." : "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.";
      return sendHttpError(reply, { status: 401, body: errorBody(message, "invalid_request_error", null, "invalid_api_key"), headers: { "www-authenticate": "Bearer" } });
    });
  }

  // One model, under any name: requests may name any model (as llama.cpp's server takes them),
  // so GET /v1/models/{name} answers for any name too, under the name asked for (as OpenAI's
  // aliases answer under their own id), while /v1/models lists the model's own id and responses
  // name it. The route takes the rest of the path, so that a hub id ("org/name") is a name too,
  // sent with its slash or as %2F.
  const created = Math.floor(Date.now() / 1000);
  const modelEntry = (id: string) => ({ id, object: "model", created, owned_by: "lckv" });
  app.get("/v1/models", async () => ({ object: "list", data: [modelEntry(ctx.modelId)] }));
  app.get<{ Params: { "*": string } }>("/v1/models/*", async (request, reply) => {
    const name = request.params["*"];
    if (name === "") return sendHttpError(reply, { status: 404, body: errorBody("No model named: GET /v1/models lists the models, GET /v1/models/{model} retrieves one", "invalid_request_error", "model", "model_not_found"), headers: {} });
    return modelEntry(name);
  });
  app.get("/health", async (_request, reply) => {
    if (model.disposed) return reply.code(503).send({ status: "unavailable" });
    return { status: "ok" };
  });
  app.get("/metrics", async (_request, reply) => reply.type(ctx.metrics.contentType).send(await ctx.metrics.text()));
  registerChatRoutes(app, ctx);
  registerCompletionRoutes(app, ctx);
  return app;
}
