/**
 * POST /v1/chat/completions: the messages rendered with the model's chat template, the reply
 * generated, answered as a `chat.completion` or streamed as `chat.completion.chunk` events.
 */
import type { FastifyInstance } from "fastify";
import { InvalidInputError, InvalidOptionError } from "../errors";
import type { ChatMessage } from "../tokenizer";
import type { GenerateResult, StreamChunk } from "../types";
import { finishReason, generateOptions, openStreams, responseHeader, usage } from "./generation";
import { chatLogprob, ChatTokenLogprob, TokenTexts } from "./logprobs";
import { serveCompletions, ServerContext } from "./request-handler";
import { ChatCompletionBody, chatCompletionBody, ChatMessageBody } from "./schemas";

/** The template's messages: text parts joined, and "developer" (OpenAI's newer name) as "system". */
function templateMessages(messages: ChatMessageBody[]): ChatMessage[] {
  return messages.map((m) => ({
    role: m.role === "developer" ? "system" : m.role,
    content: typeof m.content === "string" ? m.content : m.content.map((p) => p.text).join(""),
  }));
}

/** The prompt's token ids, checked against the context. */
function chatPrompt(ctx: ServerContext, messages: ChatMessageBody[]): number[] {
  const tokenizer = ctx.model.tokenizer;
  if (!tokenizer) throw new InvalidInputError(`${ctx.model.directory} has no tokenizer.json`, "LCKV_NO_TOKENIZER");
  const ids = tokenizer.encodeChat(templateMessages(messages));
  return ctx.model.toTokenIds(ids, "messages");
}

/** The log-probabilities the request asks for, as lckv's `logprobs` option (undefined: none). */
function requestedLogprobs(body: ChatCompletionBody): number | undefined {
  if (!body.logprobs) {
    if (body.top_logprobs !== null && body.top_logprobs !== undefined) throw new InvalidOptionError("top_logprobs", "needs logprobs: true");
    return undefined;
  }
  return body.top_logprobs ?? 0;
}

export function registerChatRoutes(app: FastifyInstance, ctx: ServerContext): void {
  const texts = new TokenTexts(ctx.model.tokenizer);
  app.post<{ Body: ChatCompletionBody }>("/v1/chat/completions", { schema: { body: chatCompletionBody } }, async (request, reply) => {
    const body = request.body;
    const header = responseHeader("chatcmpl", ctx.modelId);
    const n = body.n ?? 1;
    const logprobs = requestedLogprobs(body);
    const includeUsage = body.stream_options?.include_usage === true;
    const content: string[] = Array(n).fill("");
    const tokenLogprobs: ChatTokenLogprob[][] = Array.from({ length: n }, () => []);
    const roleSent: boolean[] = Array(n).fill(false);
    const chunkEvent = (choices: unknown[]) => ({ ...header, object: "chat.completion.chunk", choices, ...(includeUsage ? { usage: null } : {}) });
    await serveCompletions(ctx, request, reply, {
      endpoint: "chat",
      promptParam: "messages",
      stream: body.stream === true,
      start: (signal) => {
        const prompt = chatPrompt(ctx, body.messages);
        return openStreams(ctx.model, prompt, n, generateOptions(body, body.max_completion_tokens ?? body.max_tokens, logprobs, signal), "messages");
      },
      chunk: (index: number, c: StreamChunk) => {
        content[index] += c.text;
        const lp = logprobs === undefined ? undefined : chatLogprob(texts, c);
        if (lp) tokenLogprobs[index].push(lp);
        if (c.text === "" && !lp) return [];
        const events = [];
        // The assistant's role opens each choice's stream, as OpenAI's does.
        if (!roleSent[index]) events.push(chunkEvent([{ index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }]));
        roleSent[index] = true;
        events.push(chunkEvent([{ index, delta: { content: c.text }, logprobs: lp ? { content: [lp], refusal: null } : null, finish_reason: null }]));
        return events;
      },
      finish: (index: number, r: GenerateResult) => [
        ...(roleSent[index] ? [] : [chunkEvent([{ index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }])]),
        chunkEvent([{ index, delta: {}, logprobs: null, finish_reason: finishReason(r) }]),
      ],
      streamEnd: (results: GenerateResult[]) => (includeUsage ? [{ ...chunkEvent([]), usage: usage(results) }] : []),
      body: (results: GenerateResult[]) => ({
        ...header,
        object: "chat.completion",
        choices: results.map((r, index) => ({
          index,
          message: { role: "assistant", content: content[index], refusal: null },
          logprobs: logprobs === undefined ? null : { content: tokenLogprobs[index], refusal: null },
          finish_reason: finishReason(r),
        })),
        usage: usage(results),
      }),
    });
  });
}
