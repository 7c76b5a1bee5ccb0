/**
 * What every generating request goes through, whichever endpoint: its AbortSignal, fired when
 * the client goes away before the response ends (the generation stops and its pages go back);
 * its streams run to the end; and its answer, one JSON body or server-sent events. A streamed
 * response sends its headers with the first event, so an error before any (a prompt too long, a
 * full queue) still gets its own status; an error after them ends the stream with an error event.
 */
import type { FastifyReply, FastifyRequest } from "fastify";
import { setMaxListeners } from "node:events";
import type { GenerationStream } from "../generation-stream";
import type { Model } from "../model";
import type { GenerateResult, StreamChunk } from "../types";
import { runStreams, ServerPrefill } from "./generation";
import type { ServerMetrics } from "./metrics";
import { HttpErrorResponse, sendHttpError, toHttpError } from "./openai-errors";
import { SseWriter, writeRawHead } from "./sse";

/** What the server's routes share. */
export interface ServerContext {
  model: Model;
  metrics: ServerMetrics;
  /** The id /v1/models lists and responses name. */
  modelId: string;
  /** ms a stream waits for a client that stopped reading before it drops it (ServerOptions.writeStallTimeout). */
  writeStallTimeout: number;
  /** The prefill options every request gets (ServerOptions.prefill, prefillPasses, prefillTolerance). */
  prefill: ServerPrefill;
  /** An lckv error's message as a client may read it (toHttpError's publicText). */
  publicText: (message: string) => string;
}

type Event = Record<string, unknown>;

/** One request's part: how to start its completions and what to answer with their chunks and results. */
export interface CompletionPlan {
  endpoint: string;
  /** The field that holds the input ("messages", "prompt"), named by errors about it. */
  promptParam: string;
  stream: boolean;
  /** Checks the request and starts its completions; may throw (a 400, say). */
  start(signal: AbortSignal): GenerationStream[];
  /** The events a chunk of completion `index` makes when streaming (it is also to be gathered). */
  chunk(index: number, chunk: StreamChunk): Event[];
  /** The events that end completion `index` when streaming (its end is also to be gathered). */
  finish(index: number, result: GenerateResult): Event[];
  /** The events after every completion has ended (the usage chunk). */
  streamEnd(results: GenerateResult[]): Event[];
  /** The JSON body of a response that does not stream. */
  body(results: GenerateResult[]): Event;
}

function writeRawError(reply: FastifyReply, r: HttpErrorResponse): void {
  const res = reply.raw;
  if (res.headersSent || res.destroyed) return;
  writeRawHead(reply, r.status, { ...r.headers, "content-type": "application/json; charset=utf-8" });
  res.end(JSON.stringify(r.body));
}

export async function serveCompletions(ctx: ServerContext, request: FastifyRequest, reply: FastifyReply, plan: CompletionPlan): Promise<void> {
  const arrivedAt = performance.now();
  const controller = new AbortController();
  // Each of a request's n completions listens on its signal while it waits (for pages, for the
  // shared prefill): more than Node's 10 is no leak.
  setMaxListeners(0, controller.signal);
  const res = reply.raw;
  // The response's close before its end is the client going away (a closed socket, an aborted
  // fetch): nothing will read what the generation makes, so it stops.
  const onClose = () => {
    if (!res.writableEnded) controller.abort();
  };
  res.on("close", onClose);
  const sse = plan.stream ? new SseWriter(reply, ctx.writeStallTimeout) : undefined;
  // A stream writes on the raw response from its first event on.
  if (sse) reply.hijack();
  let status = 200;
  try {
    const streams = plan.start(controller.signal);
    const results = await runStreams(
      streams,
      {
        chunk: async (index, c) => {
          const events = plan.chunk(index, c);
          if (sse) for (const e of events) await sse.send(e);
        },
        done: async (index, r) => {
          const events = plan.finish(index, r);
          if (sse) for (const e of events) await sse.send(e);
        },
      },
      () => controller.abort(),
      ctx.metrics,
      arrivedAt,
    );
    if (sse) {
      for (const e of plan.streamEnd(results)) await sse.send(e);
      sse.end();
    } else {
      // Sent also to a client that has gone: fastify drops it, and ends the request's accounting.
      await reply.send(plan.body(results));
    }
  } catch (e) {
    const r = toHttpError(e, plan.promptParam, ctx.publicText);
    status = r.status;
    if (r.status >= 500) request.log.error(e);
    if (!sse) {
      await sendHttpError(reply, r);
    } else if (!sse.started) {
      writeRawError(reply, r);
    } else {
      // Headers are gone: the error is the stream's last event.
      await sse.send(r.body);
      sse.end();
    }
  } finally {
    res.off("close", onClose);
    ctx.metrics.request(plan.endpoint, controller.signal.aborted && status === 200 ? 499 : status);
  }
}
