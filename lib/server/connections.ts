/**
 * What the server knows of each connection: the requests in flight on it and the last one routed.
 *
 * Closing keep-alive connections when the server closes, so that close() ends once the requests
 * in flight have. Node's server.close() drops only the connections it counts as idle, and it
 * counts a connection that has not sent a request yet as active (clients open such spare
 * connections: fetch does, when a streamed request is aborted beside others); nothing would
 * close those. Here every connection with no request in flight is closed at close(), and each
 * other one once its response has been written.
 *
 * Answering a request that never arrived whole (requestTimeout, a malformed request line): Node
 * then closes the connection, and the answer, in OpenAI's error shape, goes out only where it
 * answers that request and cannot fall inside another response. The request is the last one
 * routed on the connection if its body is still arriving, else one whose headers are: the
 * answer goes out if the first has no other request in flight before it and no response yet (one
 * answered before its body was read, a 413 say, gets no second answer), or if the second has no
 * request in flight before it (a pipelined request's deadline can pass while a stream runs). It
 * carries the CORS header the server's other answers would (@fastify/cors's: the allowed origin,
 * or "*"), since a page whose browser finds none sees a network error instead of the 408.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Socket } from "node:net";
import type { FastifyInstance } from "fastify";
import { errorBody } from "./openai-errors";

interface ConnectionState {
  inFlight: number;
  last: { request: IncomingMessage; response: ServerResponse } | null;
}

export class ConnectionTracker {
  private readonly connections = new Map<Socket, ConnectionState>();
  private closing = false;

  /**
   * The server's deadlines, in ms: for a whole request (Infinity: none), and for its headers; and
   * its CORS rule: the Access-Control-Allow-Origin a request from `origin` gets (null: none), and
   * whether the answer names Origin in Vary (it depends on it), so that a browser's page reads
   * these answers as it reads the server's others.
   */
  constructor(
    private readonly requestTimeout: number,
    private readonly headersTimeout: number,
    private readonly cors: (origin: string | undefined) => { allow: string | null; vary: boolean },
  ) {}

  attach(app: FastifyInstance): void {
    app.server.on("connection", (socket: Socket) => {
      this.connections.set(socket, { inFlight: 0, last: null });
      socket.once("close", () => this.connections.delete(socket));
    });
    app.addHook("onRequest", async (request, reply) => {
      const socket = request.raw.socket;
      const state = this.connections.get(socket);
      // A request with no connection of the server's (app.inject()'s stand-in socket) has nothing to close.
      if (!state) return;
      state.inFlight += 1;
      state.last = { request: request.raw, response: reply.raw };
      reply.raw.once("close", () => {
        state.inFlight -= 1;
        if (this.closing && state.inFlight === 0) socket.end();
      });
    });
    app.addHook("preClose", async () => {
      this.closing = true;
      // Nothing is being written on these: they can go at once.
      for (const [socket, state] of this.connections) if (state.inFlight === 0) socket.destroy();
    });
  }

  // Where the headers' deadline is the shorter one, either may have passed.
  private timeoutMessage(): string {
    const t = this.requestTimeout;
    return this.headersTimeout === t
      ? `the request did not arrive whole within ${t} ms (the server's requestTimeout)`
      : `the request did not arrive in time: the server waits ${this.headersTimeout} ms for its headers and ${t === Infinity ? "without limit" : `${t} ms`} for the whole request`;
  }

  /** fastify's clientErrorHandler: Node's error for a request it could not read, on its connection. */
  readonly clientError = (err: NodeJS.ErrnoException, socket: Socket): void => {
    if (err.code === "ECONNRESET" || socket.destroyed) return;
    const state = this.connections.get(socket);
    const arriving = state?.last && !state.last.request.complete ? state.last : null;
    const answers = !state || (arriving ? state.inFlight === 1 && !arriving.response.headersSent : state.inFlight === 0);
    if (socket.writable && answers) {
      const [status, reason, body] =
        err.code === "ERR_HTTP_REQUEST_TIMEOUT"
          ? [408, "Request Timeout", errorBody(this.timeoutMessage(), "invalid_request_error", null, "request_timeout")]
          : err.code === "HPE_HEADER_OVERFLOW"
            ? [431, "Request Header Fields Too Large", errorBody("the request's headers are too large", "invalid_request_error", null, "headers_too_large")]
            : [400, "Bad Request", errorBody(`the request is not valid HTTP (${err.code ?? err.message})`, "invalid_request_error", null, "bad_request")];
      const text = JSON.stringify(body);
      // The request's Origin where its headers arrived (a request cut in its headers has none known).
      const { allow, vary } = this.cors(arriving?.request.headers.origin);
      const cors = `${allow === null ? "" : `Access-Control-Allow-Origin: ${allow}\r\n`}${vary ? "Vary: Origin\r\n" : ""}`;
      socket.write(`HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(text)}\r\n${cors}Connection: close\r\n\r\n${text}`);
    }
    socket.destroy(err);
  };
}
