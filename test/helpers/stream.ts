/** Drains a stream()/generate() iterator: every chunk it yields, then its result. */
export async function collectStream<C, R>(it: AsyncGenerator<C, R, undefined>): Promise<{ chunks: C[]; result: R }> {
  const chunks: C[] = [];
  for (;;) {
    const x = await it.next();
    if (x.done) return { chunks, result: x.value };
    chunks.push(x.value);
  }
}
