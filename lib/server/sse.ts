/**
 * Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, `data: [DONE]\n\n` at
 * the end. Written on the raw response (fastify's reply is hijacked), with the socket's
 * backpressure honoured: a slow reader pauses its generation instead of filling memory. A reader
 * that stops altogether is dropped after a deadline (writeStallTimeout), as if it had gone away.
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

/**
 * How long a stream waits, by default, for a client that takes nothing of what was written (the
 * socket's buffer full) before it drops the connection: 30 s. nginx's send_timeout (60 s) is the
 * same kind of bound: between two successful writes, not for the whole transfer. A proxy that
 * waits holds only a buffer, while a paused stream holds its sequences' K/V pages, which other
 * requests queue for; so the bound is tighter. A client that reads, however slowly, lets a write
 * complete every few seconds (a write is at most about the stream's 16 KiB buffer) and is never
 * dropped. Node's http server and uvicorn (vLLM's) set no bound on a write: a stalled reader there
 * holds its request until the connection breaks.
 */
export const DEFAULT_WRITE_STALL_TIMEOUT_MS = 30_000;

export class SseWriter {
  private begun = false;
  private readonly res: ServerResponse;
  /** The wait for the socket to drain, shared by every completion of the request that waits. */
  private draining: Promise<void> | undefined;

  /**
   * `stallTimeout`: ms the socket may go without draining what was written before the response
   * is destroyed, which the request sees as its client going away (Infinity: no bound).
   */
  constructor(
    private readonly reply: FastifyReply,
    private readonly stallTimeout = DEFAULT_WRITE_STALL_TIMEOUT_MS,
  ) {
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
    await (this.draining ??= this.flushed("drain"));
  }

  /** `data: [DONE]` and the end of the response. */
  end(): void {
    if (this.closed) return;
    this.start();
    this.res.end("data: [DONE]\n\n");
    // A client that stops reading at the very end would hold its connection, and the server's
    // close(), which waits for it: it has the same deadline.
    if (!this.res.writableFinished) void this.flushed("finish");
  }

  /**
   * Bytes whose write to the socket completed (the kernel took them): what the socket was handed
   * less what it still holds. Undefined before the response has a socket (a pipelined response
   * waiting for the one ahead of it on its connection, which its client is not holding up).
   */
  private bytesTaken(): number | undefined {
    const socket = this.res.socket;
    return socket ? (socket.bytesWritten ?? 0) - socket.writableLength : undefined;
  }

  /**
   * Resolves on `event` (the socket took what was written) or the response's close. If the client
   * takes nothing for the stall timeout (no write completes), the response is destroyed: its
   * close aborts the request. The check runs a few times a timeout, so a drop comes within a
   * quarter of it past the deadline.
   */
  private flushed(event: "drain" | "finish"): Promise<void> {
    return new Promise<void>((resolve) => {
      let taken = this.bytesTaken();
      let progressAt = performance.now();
      const check = () => {
        const now = this.bytesTaken();
        if (now === undefined || now !== taken) {
          taken = now;
          progressAt = performance.now();
        } else if (performance.now() - progressAt >= this.stallTimeout) {
          this.res.destroy();
          done();
        }
      };
      const timer = Number.isFinite(this.stallTimeout) ? setInterval(check, Math.max(1, Math.min(1000, this.stallTimeout / 4))) : undefined;
      const done = () => {
        clearInterval(timer);
        this.res.off(event, done);
        this.res.off("close", done);
        if (event === "drain") this.draining = undefined;
        resolve();
      };
      this.res.on(event, done);
      this.res.on("close", done);
    });
  }
}
