/**
 * Errors in OpenAI's shape, `{error: {message, type, param, code}}`, with the HTTP status a client
 * can act on: a body that fails its schema names the field (400), lckv's typed errors map by kind
 * (bad option or input 400, a full queue 429 with Retry-After, a wait for pages that timed out or
 * a model going away 503, a request whose client went away 499), a body that is not JSON says why
 * (400, invalid_json), fastify's own client errors keep their status (not their internal codes),
 * the rest is 500.
 */
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { AbortError, ContextOverflowError, DisposedError, InvalidInputError, InvalidOptionError, KvCacheFullError, LckvError } from "../errors";

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export interface HttpErrorResponse {
  status: number;
  body: OpenAIErrorBody;
  headers: Record<string, string>;
}

/** An error whose response is already decided (a body the server cannot read, say). */
export class HttpError extends Error {
  constructor(readonly response: HttpErrorResponse) {
    super(response.body.error.message);
  }
}

/** The seconds a client is asked to wait before it retries a request the server could not take now. */
export const RETRY_AFTER_SECONDS = 1;

// lckv's option names for the OpenAI fields the handlers map onto them, so that an option the
// library refuses is reported under the name the client sent.
const OPENAI_PARAM: Record<string, string> = {
  maxNewTokens: "max_tokens",
  temperature: "temperature",
  topP: "top_p",
  topK: "top_k",
  minP: "min_p",
  repetitionPenalty: "repetition_penalty",
  ignoreEos: "ignore_eos",
  seed: "seed",
  stop: "stop",
  presencePenalty: "presence_penalty",
  frequencyPenalty: "frequency_penalty",
  logitBias: "logit_bias",
  logprobs: "logprobs",
};

export function errorBody(message: string, type: string, param: string | null = null, code: string | null = null): OpenAIErrorBody {
  return { error: { message, type, param, code } };
}

function typeOf(status: number): string {
  if (status === 429) return "rate_limit_error";
  return status >= 500 ? "server_error" : "invalid_request_error";
}

/** An ajv instance path ("/messages/0/content") as a parameter name ("messages[0].content"). */
function paramName(instancePath: string, child?: string): string | null {
  const parts = instancePath.split("/").filter((p) => p !== "");
  if (child !== undefined) parts.push(child);
  let name = "";
  for (const p of parts) name += /^\d+$/.test(p) ? `[${p}]` : name === "" ? p : `.${p}`;
  return name === "" ? null : name;
}

interface AjvError {
  instancePath: string;
  keyword: string;
  message?: string;
  params: Record<string, unknown>;
}

// JSON schema's type names as the English a message uses.
const TYPE_NAMES: Record<string, string> = {
  integer: "an integer",
  number: "a number",
  string: "a string",
  boolean: "a boolean",
  array: "an array",
  object: "an object",
  null: "null",
};

/** "a, b or c". */
function either(words: string[]): string {
  return words.length <= 1 ? words.join("") : `${words.slice(0, -1).join(", ")} or ${words[words.length - 1]}`;
}

const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? "" : "s"}`;

/**
 * What a failed schema keyword asks for, in English ("must be an integer or null"), not in ajv's
 * terms ("must be integer,null", "must NOT have fewer than 1 characters"); the one place every
 * schema message of the server is worded. An unknown keyword keeps ajv's message.
 */
export function describeSchemaError(e: Pick<AjvError, "keyword" | "message" | "params">): string {
  const p = e.params;
  const limit = Number(p.limit);
  switch (e.keyword) {
    case "type": {
      const types = Array.isArray(p.type) ? p.type.map(String) : String(p.type).split(",");
      return `must be ${either(types.map((t) => TYPE_NAMES[t] ?? t))}`;
    }
    case "minimum":
      return `must be at least ${p.limit}`;
    case "maximum":
      return `must be at most ${p.limit}`;
    case "exclusiveMinimum":
      return `must be greater than ${p.limit}`;
    case "exclusiveMaximum":
      return `must be less than ${p.limit}`;
    case "minItems":
      return limit === 1 ? "must not be empty" : `must have at least ${plural(limit, "item")}`;
    case "maxItems":
      return `must have at most ${plural(limit, "item")}`;
    case "minLength":
      return limit === 1 ? "must not be empty" : `must be at least ${plural(limit, "character")} long`;
    case "maxLength":
      return `must be at most ${plural(limit, "character")} long`;
    case "enum":
      return `must be ${either((p.allowedValues as unknown[]).map((v) => JSON.stringify(v)))}`;
    case "const":
      return `must be ${JSON.stringify(p.allowedValue)}`;
    case "pattern":
      return `must match the pattern ${JSON.stringify(p.pattern)}`;
    default:
      return e.message ?? "is not valid";
  }
}

function validationError(errors: AjvError[]): HttpErrorResponse {
  // The first error is the one that stopped validation (fastify's ajv does not collect them all).
  const e = errors[0];
  let body: OpenAIErrorBody;
  if (e.keyword === "additionalProperties" && paramName(e.instancePath) === "logit_bias") {
    // logit_bias's keys are token ids, not names.
    const key = JSON.stringify(String(e.params.additionalProperty));
    body = errorBody(`Invalid value for 'logit_bias': its keys must be token ids (strings of at most 10 digits), got ${key}`, "invalid_request_error", "logit_bias", "invalid_value");
  } else if (e.keyword === "additionalProperties") {
    const param = paramName(e.instancePath, String(e.params.additionalProperty));
    body = errorBody(`Unrecognized request argument supplied: ${param}`, "invalid_request_error", param, "unknown_parameter");
  } else if (e.keyword === "required") {
    const param = paramName(e.instancePath, String(e.params.missingProperty));
    body = errorBody(`Missing required parameter: '${param}'`, "invalid_request_error", param, "missing_required_parameter");
  } else {
    const param = paramName(e.instancePath);
    body = errorBody(`Invalid value for '${param ?? "body"}': ${describeSchemaError(e)}`, "invalid_request_error", param, "invalid_value");
  }
  return { status: 400, body, headers: {} };
}

/**
 * The 400 for a request body sent as JSON that is not: JSON.parse's own account of what it
 * expected and at which position. A body fastify's parser refuses that is JSON all the same holds
 * a prototype-poisoning key.
 */
export function invalidJsonBody(text: string): HttpError {
  let message: string;
  if (text.trim() === "") {
    message = "The request body is empty: it must be a JSON object.";
  } else {
    try {
      JSON.parse(text);
      message = "The request body holds a '__proto__' or 'constructor.prototype' key, which is not accepted.";
    } catch (e) {
      message = `The request body is not valid JSON: ${(e as Error).message}.`;
    }
  }
  return new HttpError({ status: 400, body: errorBody(message, "invalid_request_error", null, "invalid_json"), headers: {} });
}

// fastify's own errors that reach a client, by the codes OpenAI-style clients read; any other
// fastify code (FST_...) is its internal name and is not sent.
const FASTIFY_CODES: Record<string, string> = {
  FST_ERR_CTP_BODY_TOO_LARGE: "request_too_large",
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: "invalid_content_length",
};

function lckvError(e: LckvError, promptParam: string, publicText: (message: string) => string): HttpErrorResponse {
  const message = publicText(e.message);
  const retry = { "retry-after": String(RETRY_AFTER_SECONDS) };
  if (e instanceof KvCacheFullError) {
    if (e.code === "LCKV_QUEUE_FULL") return { status: 429, body: errorBody(message, "rate_limit_error", null, e.code), headers: retry };
    if (e.code === "LCKV_REQUEST_TOO_LARGE") return { status: 400, body: errorBody(message, "invalid_request_error", "max_tokens", e.code), headers: {} };
    return { status: 503, body: errorBody(message, "server_error", null, e.code), headers: retry };
  }
  if (e instanceof ContextOverflowError) {
    // The code clients look for to shorten a conversation.
    return { status: 400, body: errorBody(message, "invalid_request_error", promptParam, "context_length_exceeded"), headers: {} };
  }
  if (e instanceof InvalidOptionError) {
    const param = OPENAI_PARAM[e.option] ?? e.option;
    const message = publicText(`'${param}': ${e.detail}`);
    return { status: 400, body: errorBody(message, "invalid_request_error", param, e.code), headers: {} };
  }
  if (e instanceof InvalidInputError) return { status: 400, body: errorBody(message, "invalid_request_error", promptParam, e.code), headers: {} };
  // The client went away (nginx's 499, "client closed request"): nothing reads this answer, and
  // the metrics count it as such.
  if (e instanceof AbortError) return { status: 499, body: errorBody(message, "invalid_request_error", null, e.code), headers: {} };
  if (e instanceof DisposedError) return { status: 503, body: errorBody("the server is shutting down", "server_error", null, e.code), headers: retry };
  return { status: 500, body: errorBody(message, "server_error", null, e.code), headers: {} };
}

/**
 * The response for any error a request met. `promptParam` names the field that held the input
 * ("messages" or "prompt"), for errors about the input itself.
 */
export function toHttpError(err: unknown, promptParam: string | null = null, publicText: (message: string) => string = (m) => m): HttpErrorResponse {
  const e = err as FastifyError & { validation?: AjvError[] };
  if (Array.isArray(e?.validation) && e.validation.length > 0) return validationError(e.validation);
  if (err instanceof HttpError) return err.response;
  if (err instanceof LckvError) return lckvError(err, promptParam ?? "prompt", publicText);
  const status = typeof e?.statusCode === "number" && e.statusCode >= 400 && e.statusCode < 600 ? e.statusCode : 500;
  // A client's mistake (malformed JSON, wrong content type, too large a body) says what it was;
  // a fault of the server does not send its internals.
  const message = status < 500 ? (e?.message ?? String(err)) : "internal server error";
  const headers: Record<string, string> = status === 503 ? { "retry-after": String(RETRY_AFTER_SECONDS) } : {};
  const code = status >= 500 || typeof e?.code !== "string" ? null : e.code.startsWith("FST_") ? (FASTIFY_CODES[e.code] ?? null) : e.code;
  return { status, body: errorBody(message, typeOf(status), null, code), headers };
}

export function sendHttpError(reply: FastifyReply, r: HttpErrorResponse): FastifyReply {
  return reply.code(r.status).headers(r.headers).send(r.body);
}

/**
 * fastify answers a body over the limit before reading it, with `Connection: close`: the socket
 * then closes with the body's rest unread, the kernel resets it, and a client still sending (one
 * that does not wait for `100 Continue`, as fetch and the openai client do not) sees EPIPE or
 * ECONNRESET instead of the 413, or the 413 only by luck. A declared body of up to
 * DRAIN_LIMIT_FACTOR times the limit keeps the connection instead: Node reads the rest and
 * discards it (memory stays flat), and the client reads its 413. A chunked body (no declared
 * length) is drained as it comes, up to the same bound. A larger declared one closes the
 * connection, as does a chunked one once past the bound, so that no client makes the server read
 * without end.
 */
const DRAIN_LIMIT_FACTOR = 8;
function drainRefusedBody(request: FastifyRequest, reply: FastifyReply, bodyLimit: number): void {
  const most = DRAIN_LIMIT_FACTOR * bodyLimit;
  const declared = Number(request.headers["content-length"]);
  if (Number.isFinite(declared)) {
    if (declared <= most) reply.removeHeader("connection");
    return;
  }
  // A chunked body: fastify read it past the limit and stopped listening, and the stream flows on
  // (what arrives is dropped). The rest is drained likewise, counted: past the same bound the
  // connection goes.
  const raw = request.raw;
  if (raw.complete || !raw.socket) return;
  reply.removeHeader("connection");
  let read = bodyLimit;
  const count = (chunk: Buffer) => {
    read += chunk.length;
    if (read > most) {
      raw.off("data", count);
      raw.socket?.destroy();
    }
  };
  raw.on("data", count);
  raw.once("end", () => raw.off("data", count));
  raw.resume();
}

/**
 * Every error and every unknown route answers in OpenAI's shape. `publicText`: an lckv error's
 * message as a client may read it (the server's files named by the model's id, not their paths).
 */
export function installErrorHandlers(app: FastifyInstance, publicText: (message: string) => string): void {
  app.setErrorHandler((err, request, reply) => {
    if ((err as FastifyError).code === "FST_ERR_CTP_INVALID_MEDIA_TYPE") {
      const type = request.headers["content-type"] ?? "none";
      const message = `Unsupported Content-Type '${type}': the body must be JSON, sent with 'Content-Type: application/json'`;
      return sendHttpError(reply, { status: 415, body: errorBody(message, "invalid_request_error", null, "unsupported_media_type"), headers: {} });
    }
    if ((err as FastifyError).code === "FST_ERR_CTP_BODY_TOO_LARGE") drainRefusedBody(request, reply, app.initialConfig.bodyLimit ?? 0);
    // The route matched, not the URL as sent (which may be percent-encoded or absolute).
    const r = toHttpError(err, request.routeOptions.url === "/v1/chat/completions" ? "messages" : "prompt", publicText);
    if (r.status >= 500) request.log.error(err);
    return sendHttpError(reply, r);
  });
  app.setNotFoundHandler((request, reply) =>
    sendHttpError(reply, { status: 404, body: errorBody(`Invalid URL (${request.method} ${request.url})`, "invalid_request_error", null, "unknown_url"), headers: {} }),
  );
}
