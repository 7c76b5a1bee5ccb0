/**
 * POST /v1/chat/completions: the messages rendered with the model's chat template, the reply
 * generated, answered as a `chat.completion` or streamed as `chat.completion.chunk` events.
 */
import type { FastifyInstance } from "fastify";
import { InvalidOptionError } from "../errors";
import type { ChatMessage } from "../tokenizer";
import type { GenerateResult, StreamChunk } from "../types";
import { finishReason, generateOptions, openStreams, requestPromptIds, responseHeader, streamRequested, usage } from "./generation";
import { ChatLogprobs, ChatTokenLogprob, TokenTexts } from "./logprobs";
import { errorBody, HttpError } from "./openai-errors";
import { serveCompletions, ServerContext } from "./request-handler";
import { ChatCompletionBody, chatCompletionBody, ChatMessageBody } from "./schemas";

/**
 * A message's text: its text parts joined by newlines, as vLLM's and llama.cpp's servers join
 * them (two parts are two pieces of text, not one cut in two). An assistant's content may be null, as OpenAI allows (a
 * client replays a turn that had no text, such as a tool call): it is empty text.
 */
function messageText(m: ChatMessageBody, i: number): string {
  if (m.content === null) {
    if (m.role === "assistant") return "";
    const message = `Invalid value for 'messages[${i}].content': must be a string or an array (null only in an assistant's message)`;
    throw new HttpError({ status: 400, body: errorBody(message, "invalid_request_error", `messages[${i}].content`, "invalid_value"), headers: {} });
  }
  return typeof m.content === "string" ? m.content : m.content.map((p) => p.text).join("\n");
}

/** The template's messages, "developer" (OpenAI's newer name) as "system". */
function templateMessages(messages: ChatMessageBody[]): ChatMessage[] {
  return messages.map((m, i) => ({ role: m.role === "developer" ? "system" : m.role, content: messageText(m, i) }));
}

/** The prompt's token ids, checked against the context. */
function chatPrompt(ctx: ServerContext, messages: ChatMessageBody[]): number[] {
  return requestPromptIds(ctx.model, "messages", () => ctx.model.chatTokenIds(templateMessages(messages), "messages"));
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
    const stream = streamRequested(body);
    const includeUsage = body.stream_options?.include_usage === true;
    const content: string[] = Array(n).fill("");
    // One per completion once the prompt is known, when logprobs are asked for.
    let tokenLogprobs: ChatLogprobs[] = [];
    const roleSent: boolean[] = Array(n).fill(false);
    const chunkEvent = (choices: unknown[]) => ({ ...header, object: "chat.completion.chunk", choices, ...(includeUsage ? { usage: null } : {}) });
    const roleEvent = (index: number) => chunkEvent([{ index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }]);
    // A choice's new text and log-probabilities, if any; the assistant's role opens each choice's
    // stream, as OpenAI's does.
    const deltaEvents = (index: number, text: string, lp: ChatTokenLogprob[]) => {
      if (text === "" && lp.length === 0) return [];
      const events = roleSent[index] ? [] : [roleEvent(index)];
      roleSent[index] = true;
      events.push(chunkEvent([{ index, delta: { content: text }, logprobs: lp.length > 0 ? { content: lp, refusal: null } : null, finish_reason: null }]));
      return events;
    };
    await serveCompletions(ctx, request, reply, {
      endpoint: "chat",
      promptParam: "messages",
      stream,
      start: (signal) => {
        const prompt = chatPrompt(ctx, body.messages);
        const streams = openStreams(ctx.model, prompt, n, generateOptions(body, body.max_completion_tokens ?? body.max_tokens, logprobs, signal, ctx.prefill), "messages");
        if (logprobs !== undefined) tokenLogprobs = Array.from({ length: n }, () => new ChatLogprobs(texts, prompt));
        return streams;
      },
      chunk: (index: number, c: StreamChunk) => {
        content[index] += c.text;
        return deltaEvents(index, c.text, tokenLogprobs[index]?.chunk(c) ?? []);
      },
      finish: (index: number, r: GenerateResult) => [
        // The end may hand out entries of tokens whose text is empty, at the text's end.
        ...deltaEvents(index, "", tokenLogprobs[index]?.end() ?? []),
        ...(roleSent[index] ? [] : [roleEvent(index)]),
        chunkEvent([{ index, delta: {}, logprobs: null, finish_reason: finishReason(r) }]),
      ],
      streamEnd: (results: GenerateResult[]) => (includeUsage ? [{ ...chunkEvent([]), usage: usage(results) }] : []),
      body: (results: GenerateResult[]) => ({
        ...header,
        object: "chat.completion",
        choices: results.map((r, index) => ({
          index,
          message: { role: "assistant", content: content[index], refusal: null },
          logprobs: tokenLogprobs[index] ? { content: tokenLogprobs[index].content, refusal: null } : null,
          finish_reason: finishReason(r),
        })),
        usage: usage(results),
      }),
    });
  });
}
