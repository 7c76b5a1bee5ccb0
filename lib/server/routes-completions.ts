/**
 * POST /v1/completions (OpenAI's legacy text completions): the prompt, text or token ids,
 * continued; answered as a `text_completion` or streamed as `text_completion` events.
 */
import type { FastifyInstance } from "fastify";
import type { GenerateResult, StreamChunk } from "../types";
import { finishReason, generateOptions, openStreams, responseHeader, usage } from "./generation";
import { CompletionLogprobsBuilder, TokenTexts } from "./logprobs";
import { serveCompletions, ServerContext } from "./request-handler";
import { CompletionBody, completionBody } from "./schemas";

export function registerCompletionRoutes(app: FastifyInstance, ctx: ServerContext): void {
  const texts = new TokenTexts(ctx.model.tokenizer);
  app.post<{ Body: CompletionBody }>("/v1/completions", { schema: { body: completionBody } }, async (request, reply) => {
    const body = request.body;
    const header = responseHeader("cmpl", ctx.modelId);
    const n = body.n ?? 1;
    const logprobs = body.logprobs ?? undefined;
    const includeUsage = body.stream_options?.include_usage === true;
    const text: string[] = Array(n).fill("");
    const builders = Array.from({ length: n }, () => new CompletionLogprobsBuilder(texts));
    const event = (choices: unknown[]) => ({ ...header, object: "text_completion", choices, ...(includeUsage ? { usage: null } : {}) });
    await serveCompletions(ctx, request, reply, {
      endpoint: "completions",
      promptParam: "prompt",
      stream: body.stream === true,
      start: (signal) => {
        const prompt = ctx.model.toTokenIds(body.prompt, "prompt");
        return openStreams(ctx.model, prompt, n, generateOptions(body, body.max_tokens, logprobs, signal), "prompt");
      },
      chunk: (index: number, c: StreamChunk) => {
        const offset = text[index].length;
        text[index] += c.text;
        const lp = logprobs === undefined ? undefined : builders[index].add(c, offset);
        if (c.text === "" && !lp) return [];
        return [event([{ index, text: c.text, logprobs: lp ?? null, finish_reason: null }])];
      },
      finish: (index: number, r: GenerateResult) => [event([{ index, text: "", logprobs: null, finish_reason: finishReason(r) }])],
      streamEnd: (results: GenerateResult[]) => (includeUsage ? [{ ...event([]), usage: usage(results) }] : []),
      body: (results: GenerateResult[]) => ({
        ...header,
        object: "text_completion",
        choices: results.map((r, index) => ({
          index,
          text: text[index],
          logprobs: logprobs === undefined ? null : builders[index].value,
          finish_reason: finishReason(r),
        })),
        usage: usage(results),
      }),
    });
  });
}
