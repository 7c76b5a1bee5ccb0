/**
 * How a request's completions are generated, for both endpoints: the OpenAI body's sampling
 * fields as lckv's GenerateOptions, the streams (one, or n from one prefill), and the loop that
 * hands each chunk to the endpoint's writer while it feeds the metrics. The writer's promise is
 * awaited, so a stream waits for a slow client instead of running ahead of it.
 */
import { randomUUID } from "node:crypto";
import { AbortError, ContextOverflowError, InternalError } from "../errors";
import type { GenerationStream } from "../generation-stream";
import type { Model } from "../model";
import type { GenerateOptions } from "../options";
import type { GenerateResult, StreamChunk } from "../types";
import type { ServerMetrics } from "./metrics";
import { errorBody, HttpError } from "./openai-errors";
import type { CommonBody } from "./schemas";

type CompletionStream = GenerationStream;

/** The prefill options a server gives every request (ServerOptions.prefill, prefillPasses, prefillTolerance). */
export type ServerPrefill = Pick<GenerateOptions, "prefill" | "prefillPasses" | "prefillTolerance">;

/**
 * The options of a request's body, leaving out every field at its no-op value, with the
 * server's prefill options (ServerOptions.prefill), which no request field sets.
 */
export function generateOptions(body: CommonBody, maxTokens: number | null | undefined, logprobs: number | undefined, signal: AbortSignal, prefill: ServerPrefill): GenerateOptions {
  const o: GenerateOptions = { ...prefill, signal };
  if (maxTokens !== null && maxTokens !== undefined) o.maxNewTokens = maxTokens;
  if (body.temperature !== null && body.temperature !== undefined) o.temperature = body.temperature;
  if (body.top_p !== null && body.top_p !== undefined) o.topP = body.top_p;
  if (body.seed !== null && body.seed !== undefined) o.seed = body.seed;
  // An explicit value overrides generation_config.json's, as in vLLM: top_k -1 (vLLM's "all
  // tokens") is lckv's 0.
  if (body.top_k !== null && body.top_k !== undefined) o.topK = Math.max(0, body.top_k);
  if (body.min_p !== null && body.min_p !== undefined) o.minP = body.min_p;
  if (body.repetition_penalty !== null && body.repetition_penalty !== undefined) o.repetitionPenalty = body.repetition_penalty;
  if (body.ignore_eos) o.ignoreEos = true;
  if (body.stop !== null && body.stop !== undefined) o.stop = body.stop;
  // Clients send the defaults (0, {}) for "unset": those ask for nothing.
  if (body.presence_penalty) o.presencePenalty = body.presence_penalty;
  if (body.frequency_penalty) o.frequencyPenalty = body.frequency_penalty;
  if (body.logit_bias && Object.keys(body.logit_bias).length > 0) {
    o.logitBias = Object.fromEntries(Object.entries(body.logit_bias).map(([k, v]) => [Number(k), v]));
  }
  if (logprobs !== undefined) o.logprobs = logprobs;
  return o;
}

/**
 * Whether the request streams. `stream_options` only applies to a stream, and OpenAI refuses it
 * on a request that does not stream (its client would wait for a usage chunk that never comes).
 */
export function streamRequested(body: CommonBody): boolean {
  const stream = body.stream === true;
  if (!stream && body.stream_options !== null && body.stream_options !== undefined) {
    const message = "The 'stream_options' parameter is only allowed when 'stream' is enabled.";
    throw new HttpError({ status: 400, body: errorBody(message, "invalid_request_error", "stream_options", "invalid_value"), headers: {} });
  }
  return stream;
}

/**
 * n completions of the prompt: one stream, or n that share one prefill. A request whose prompt and
 * max_tokens together pass the model's context, or whose prompt alone fills it, is refused (400,
 * context_length_exceeded), as OpenAI and vLLM refuse it, rather than cut short at the context.
 * Without max_tokens a completion takes the model's default length, as vLLM takes it:
 * generation_config.json's max_new_tokens, else what its max_length leaves after the prompt, else
 * 256 tokens (Model.generationDefaults), ending at the context if that comes first.
 */
export function openStreams(model: Model, prompt: readonly number[], n: number, options: GenerateOptions, promptField: string): CompletionStream[] {
  const asked = options.maxNewTokens;
  if (asked !== undefined && prompt.length + asked > model.maxContext) {
    throw new ContextOverflowError(
      `This model's maximum context length is ${model.maxContext} tokens. However, you requested ${prompt.length + asked} tokens ` +
        `(${prompt.length} in the ${promptField}, ${asked} in the completion). Please reduce the length of the ${promptField} or completion.`,
    );
  }
  if (asked === undefined && prompt.length >= model.maxContext) {
    throw new ContextOverflowError(
      `This model's maximum context length is ${model.maxContext} tokens. However, your ${promptField} ${has(promptField)} ${prompt.length} tokens, ` +
        `which leaves no room for the completion. Please reduce the length of the ${promptField}.`,
    );
  }
  return n === 1 ? [model.stream(prompt, options)] : model.streamMany(prompt, n, options);
}

/** The verb for a prompt field's name: "messages" are plural. */
const has = (promptField: string) => (promptField === "messages" ? "have" : "has");

/**
 * A request's prompt ids (`tokenize` checks them): a prompt longer than the context is refused in
 * the words of openStreams' refusals (OpenAI's and vLLM's), which clients may parse.
 */
export function requestPromptIds(model: Model, promptField: string, tokenize: () => number[]): number[] {
  try {
    return tokenize();
  } catch (e) {
    if (!(e instanceof ContextOverflowError) || !e.inputTokens) throw e;
    const { count, atLeast } = e.inputTokens;
    throw new ContextOverflowError(
      `This model's maximum context length is ${model.maxContext} tokens. However, your ${promptField} ${has(promptField)} ${atLeast ? "at least " : ""}${count} tokens. ` +
        `Please reduce the length of the ${promptField}.`,
      e.inputTokens,
    );
  }
}

/** What the endpoint does with each chunk and each result: `index` is the completion's, 0..n-1. */
export interface CompletionWriter {
  chunk(index: number, chunk: StreamChunk): Promise<void>;
  done(index: number, result: GenerateResult): Promise<void>;
}

/**
 * Runs every stream to its end, handing its chunks and its result to `write`, and returns the results in order.
 * If one fails, the others are stopped through `abort` and awaited (their pages go back), and the
 * first error is thrown; the completions it cut short get no `write.done`. If the request's signal
 * stopped them (the client went away) and none failed, an AbortError is thrown: there is no
 * finished response to give.
 */
export async function runStreams(streams: CompletionStream[], write: CompletionWriter, abort: () => void, metrics: ServerMetrics, arrivedAt: number): Promise<GenerateResult[]> {
  const one = async (it: CompletionStream, index: number): Promise<GenerateResult> => {
    let last: number | undefined;
    let seen = 0;
    const token = () => {
      const now = performance.now();
      metrics.token(last === undefined, now - (last ?? arrivedAt));
      last = now;
      seen++;
    };
    try {
      for (;;) {
        const r = await it.next();
        if (r.done) {
          // An end-of-sequence token has no chunk, but usage counts it, and so do the metrics.
          while (seen < r.value.usage.completionTokens) token();
          // A completion cut short by the request's abort (another completion failed, or the
          // client went away) did not finish: it gets no finish event claiming it did.
          if (r.value.finishReason !== "abort") await write.done(index, r.value);
          return r.value;
        }
        if (r.value.token !== null) token();
        await write.chunk(index, r.value);
      }
    } catch (e) {
      abort();
      throw e;
    }
  };
  const settled = await Promise.allSettled(streams.map(one));
  const failed = settled.find((s): s is PromiseRejectedResult => s.status === "rejected");
  if (failed) throw failed.reason;
  const results = settled.map((s) => (s as PromiseFulfilledResult<GenerateResult>).value);
  if (results.some((r) => r.finishReason === "abort")) throw new AbortError("the request was aborted: its client went away (or stopped reading) before the response ended");
  return results;
}

/**
 * OpenAI's finish reason of a completion that ended. An aborted completion has none and never
 * comes here (runStreams gives it no finish event and answers its request with an error): one
 * that did would be refused, not reported finished.
 */
export function finishReason(r: GenerateResult): "stop" | "length" {
  if (r.finishReason === "abort") throw new InternalError("an aborted completion has no finish reason");
  return r.finishReason;
}

/**
 * OpenAI's usage of a request's completions, `n` of each prompt in turn: each prompt counted once,
 * as its n completions share it.
 */
export function usage(results: GenerateResult[], n = results.length): { prompt_tokens: number; completion_tokens: number; total_tokens: number } {
  let prompt = 0;
  for (let i = 0; i < results.length; i += n) prompt += results[i].usage.promptTokens;
  const completion = results.reduce((s, r) => s + r.usage.completionTokens, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** The fields every OpenAI completion object and stream chunk of one request opens with. */
export function responseHeader(prefix: "chatcmpl" | "cmpl", modelId: string) {
  return { id: `${prefix}-${randomUUID().replace(/-/g, "")}`, created: Math.floor(Date.now() / 1000), model: modelId, system_fingerprint: null };
}
