/**
 * POST /v1/completions (OpenAI's legacy text completions): the prompt, text or token ids,
 * continued; answered as a `text_completion` or streamed as `text_completion` events. A list of
 * prompts makes n completions of each, as OpenAI's does: the choices of prompt i are
 * i*n .. i*n+n-1.
 */
import type { FastifyInstance } from "fastify";
import { MAX_COMPLETIONS } from "../model";
import type { GenerateResult, StreamChunk } from "../types";
import { finishReason, generateOptions, openStreams, requestPromptIds, responseHeader, streamRequested, usage } from "./generation";
import { CompletionLogprobsBuilder, TokenTexts } from "./logprobs";
import { errorBody, HttpError } from "./openai-errors";
import { serveCompletions, ServerContext } from "./request-handler";
import { CompletionBody, completionBody } from "./schemas";

function badPrompt(message: string): HttpError {
  return new HttpError({ status: 400, body: errorBody(message, "invalid_request_error", "prompt", "invalid_value"), headers: {} });
}

/**
 * The request's prompts, each text or token ids, and the field each is in (for errors): one
 * prompt (a string, a list of token ids) or a list of them.
 */
function promptList(prompt: CompletionBody["prompt"], n: number): { input: string | number[]; field: string }[] {
  if (typeof prompt === "string") return [{ input: prompt, field: "prompt" }];
  const ids = prompt.filter((p) => typeof p === "number").length;
  if (ids === prompt.length) return [{ input: prompt as number[], field: "prompt" }];
  if (ids > 0) {
    throw badPrompt(
      "Invalid value for 'prompt': a list that mixes token ids with strings or lists; send one prompt as a string or a list of " +
        "token ids, or several as a list of strings and lists of token ids",
    );
  }
  if (prompt.length * n > MAX_COMPLETIONS) {
    throw badPrompt(`Invalid value for 'prompt': ${prompt.length} prompts with n = ${n} make ${prompt.length * n} completions; a request makes at most ${MAX_COMPLETIONS}`);
  }
  return (prompt as (string | number[])[]).map((input, i) => ({ input, field: `prompt[${i}]` }));
}

export function registerCompletionRoutes(app: FastifyInstance, ctx: ServerContext): void {
  const texts = new TokenTexts(ctx.model.tokenizer);
  app.post<{ Body: CompletionBody }>("/v1/completions", { schema: { body: completionBody } }, async (request, reply) => {
    const body = request.body;
    const header = responseHeader("cmpl", ctx.modelId);
    const n = body.n ?? 1;
    const logprobs = body.logprobs ?? undefined;
    const stream = streamRequested(body);
    const includeUsage = body.stream_options?.include_usage === true;
    // One entry per completion, made when the prompts are known (no builders without logprobs).
    let text: string[] = [];
    let builders: (CompletionLogprobsBuilder | undefined)[] = [];
    const event = (choices: unknown[]) => ({ ...header, object: "text_completion", choices, ...(includeUsage ? { usage: null } : {}) });
    await serveCompletions(ctx, request, reply, {
      endpoint: "completions",
      promptParam: "prompt",
      stream,
      start: (signal) => {
        // Every prompt is checked before any completion is opened.
        const prompts = promptList(body.prompt, n).map(({ input, field }) => ({ ids: requestPromptIds(ctx.model, field, () => ctx.model.toTokenIds(input, field)), field }));
        const options = generateOptions(body, body.max_tokens, logprobs, signal, ctx.prefill);
        const streams = prompts.flatMap(({ ids, field }) => openStreams(ctx.model, ids, n, options, field));
        text = Array(streams.length).fill("");
        if (logprobs !== undefined) builders = prompts.flatMap(({ ids }) => Array.from({ length: n }, () => new CompletionLogprobsBuilder(texts, ids)));
        return streams;
      },
      chunk: (index: number, c: StreamChunk) => {
        text[index] += c.text;
        const lp = builders[index]?.chunk(c);
        if (c.text === "" && !lp) return [];
        return [event([{ index, text: c.text, logprobs: lp ?? null, finish_reason: null }])];
      },
      // The end may hand out entries of tokens whose text is empty, at the text's end.
      finish: (index: number, r: GenerateResult) => [event([{ index, text: "", logprobs: builders[index]?.end() ?? null, finish_reason: finishReason(r) }])],
      streamEnd: (results: GenerateResult[]) => (includeUsage ? [{ ...event([]), usage: usage(results, n) }] : []),
      body: (results: GenerateResult[]) => ({
        ...header,
        object: "text_completion",
        choices: results.map((r, index) => ({
          index,
          text: text[index],
          logprobs: builders[index]?.value ?? null,
          finish_reason: finishReason(r),
        })),
        usage: usage(results, n),
      }),
    });
  });
}
