/**
 * Closing keep-alive connections when the server closes, so that close() ends once the requests
 * in flight have. Node's server.close() drops only the connections it counts as idle, and it
 * counts a connection that has not sent a request yet as active (clients open such spare
 * connections: fetch does, when a streamed request is aborted beside others); nothing would
 * close those. Here every connection with no request in flight is closed at close(), and each
 * other one once its response has been written.
 */
import type { Socket } from "node:net";
import type { FastifyInstance } from "fastify";

export function closeConnectionsOnClose(app: FastifyInstance): void {
  const inFlight = new Map<Socket, number>();
  let closing = false;
  app.server.on("connection", (socket: Socket) => {
    inFlight.set(socket, 0);
    socket.once("close", () => inFlight.delete(socket));
  });
  app.addHook("onRequest", async (request, reply) => {
    const socket = request.raw.socket;
    // A request with no connection of the server's (app.inject()'s stand-in socket) has nothing to close.
    if (!inFlight.has(socket)) return;
    inFlight.set(socket, inFlight.get(socket)! + 1);
    reply.raw.once("close", () => {
      const n = (inFlight.get(socket) ?? 1) - 1;
      if (inFlight.has(socket)) inFlight.set(socket, n);
      if (closing && n === 0) socket.end();
    });
  });
  app.addHook("preClose", async () => {
    closing = true;
    // Nothing is being written on these: they can go at once.
    for (const [socket, n] of inFlight) if (n === 0) socket.destroy();
  });
}
