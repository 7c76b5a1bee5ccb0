/**
 * Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, `data: [DONE]\n\n` at
 * the end. Written on the raw response (fastify's reply is hijacked), with the socket's
 * backpressure honoured: a slow reader pauses its generation instead of filling memory.
 */
import type { FastifyReply } from "fastify";
import type { OutgoingHttpHeaders, ServerResponse } from "node:http";

/**
 * Writes a hijacked reply's status and headers on its raw response, with the headers already set
 * on the reply (CORS's, set by @fastify/cors's hook before the handler ran): fastify sends those
 * only with a response it sends itself. Every raw response of the server starts here.
 */
export function writeRawHead(reply: FastifyReply, status: number, headers: OutgoingHttpHeaders): void {
  for (const [name, value] of Object.entries(reply.getHeaders())) if (value !== undefined) reply.raw.setHeader(name, value);
  reply.raw.writeHead(status, headers);
}

export class SseWriter {
  private begun = false;
  private readonly res: ServerResponse;

  constructor(private readonly reply: FastifyReply) {
    this.res = reply.raw;
  }

  /** Whether the client is gone (nothing written from here on reaches it). */
  get closed(): boolean {
    return this.res.destroyed || this.res.writableEnded;
  }

  /** Whether the headers went out. */
  get started(): boolean {
    return this.begun;
  }

  /** Sends the headers: from here on errors can only be reported as events. */
  start(): void {
    if (this.begun || this.closed) return;
    this.begun = true;
    writeRawHead(this.reply, 200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      // Proxies (nginx) would otherwise buffer the stream.
      "x-accel-buffering": "no",
    });
    this.res.flushHeaders();
  }

  /** One event; resolves once the socket can take more (at once, unless its buffer is full). */
  async send(data: unknown): Promise<void> {
    if (this.closed) return;
    this.start();
    if (this.res.write(`data: ${JSON.stringify(data)}\n\n`)) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        this.res.off("drain", done);
        this.res.off("close", done);
        resolve();
      };
      this.res.on("drain", done);
      this.res.on("close", done);
    });
  }

  /** `data: [DONE]` and the end of the response. */
  end(): void {
    if (this.closed) return;
    this.start();
    this.res.end("data: [DONE]\n\n");
  }
}
