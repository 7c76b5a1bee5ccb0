/**
 * GenerationStream: what stream(), chatStream(), streamMany() and Sequence.generate() return.
 * An async generator of chunks whose return value is the GenerateResult, and which also holds
 * that result as a promise, so that a `for await` loop (which drops the return value) still
 * gets the finish reason, the usage and the timings. GenerationProgress is what the generation
 * has produced so far: the loop fills it in, and an early return() builds its result from it.
 */
import type { NativeTokenLogprobs } from "./native";
import type { GenerateResult, GenerationTimings, StreamChunk, TokenLogprob } from "./types";

export interface GenerationStream extends AsyncGenerator<StreamChunk, GenerateResult, undefined> {
  /**
   * Settles when the generation ends, however the stream is consumed: iterated to the end (the
   * generator's return value), ended early with return() or `break` (finishReason "abort", with
   * the tokens and usage so far), or failed (rejects with the error the iteration threw).
   * Awaited (or given a then()) before the stream is iterated, it runs the stream itself: the
   * chunks are kept for a later iteration, which gets every one. Reading it to await later
   * starts nothing. Once the stream is iterated (a next() call), the caller drives it and the
   * result settles when that iteration ends: awaited by a caller who stops calling next()
   * without return(), it waits for good. An unobserved rejection is not reported as unhandled.
   */
  readonly result: Promise<GenerateResult>;
  /**
   * Ends the generation early (what `break` in a `for await` loop calls): the generator's
   * cleanup runs, and the result is finishReason "abort" with what was generated so far (or the
   * result it had already ended with). Resolves with that result; an argument is ignored.
   */
  return(): Promise<IteratorReturnResult<GenerateResult>>;
  return(value: GenerateResult | PromiseLike<GenerateResult>): Promise<IteratorResult<StreamChunk, GenerateResult>>;
}

/** @internal What a generation has produced so far. */
export class GenerationProgress {
  /** When the call that began the generation was made. */
  readonly startedAt = performance.now();
  private firstTokenAt: number | undefined;
  promptTokens = 0;
  prefillPasses = 0;
  /** The text of the chunks delivered so far. */
  text = "";
  private readonly stopper = new AbortController();
  /** Aborted when the stream's return() is called: ends a step in flight (GenerateOptions.signal's way). */
  readonly stopSignal = this.stopper.signal;
  /** The generated tokens so far (the generation loop pushes to this array). */
  readonly tokens: number[] = [];
  /**
   * Whether the generation ended on a sampled end-of-sequence token: not in `tokens` or the text,
   * but generated, so usage counts it (as OpenAI, vLLM and llama.cpp's server count it).
   */
  endedOnEos = false;
  /** One entry per token, when log-probabilities were asked for. */
  logprobs: TokenLogprob[] | undefined;

  /** Ends a step in flight: see stopSignal. */
  stop(): void {
    this.stopper.abort();
  }

  /** A token was sampled (the first one marks the time to first token). */
  noteToken(): void {
    this.firstTokenAt ??= performance.now();
  }

  timings(): GenerationTimings {
    const end = performance.now();
    const totalMs = end - this.startedAt;
    const first = this.firstTokenAt;
    const after = first === undefined ? 0 : end - first;
    return {
      timeToFirstTokenMs: first === undefined ? totalMs : first - this.startedAt,
      totalMs,
      tokensPerSecond: this.generated >= 2 && after > 0 ? (this.generated - 1) / (after / 1000) : 0,
    };
  }

  /** Tokens generated: `tokens`, and an end-of-sequence token that ended the generation. */
  private get generated(): number {
    return this.tokens.length + (this.endedOnEos ? 1 : 0);
  }

  /** The result of a generation that ended now for `finishReason`. */
  result(finishReason: GenerateResult["finishReason"], text = this.text): GenerateResult {
    const r: GenerateResult = {
      text,
      tokens: this.tokens,
      finishReason,
      usage: { promptTokens: this.promptTokens, completionTokens: this.generated },
      prefillPasses: this.prefillPasses,
      timings: this.timings(),
    };
    if (this.logprobs) r.logprobs = this.logprobs;
    return r;
  }
}

/** @internal The engine's log-probabilities of a token as the API gives them. */
export function tokenLogprob(token: number, lp: NativeTokenLogprobs): TokenLogprob {
  const topLogprobs = Array.from(lp.topTokens, (t, i) => ({ token: t, logprob: lp.topLogprobs[i] }));
  return { token, logprob: lp.logprob, topLogprobs };
}

/**
 * @internal Wraps the generator `body` makes (given the progress it fills in) as a
 * GenerationStream. onSettled runs once, synchronously, as the result settles (with the result,
 * or undefined and the error).
 */
export function generationStream(
  body: (progress: GenerationProgress) => AsyncGenerator<StreamChunk, GenerateResult, undefined>,
  onSettled?: (result: GenerateResult | undefined, error?: unknown) => void,
): GenerationStream {
  return new Stream(body, onSettled);
}

/**
 * A promise that tells when it is awaited: `await p` (and Promise.all, Promise.resolve) call a
 * subclass's then(), which a plain read of the promise does not. Promises derived from it
 * (then(), catch()) are plain ones.
 */
class AwaitedPromise<T> extends Promise<T> {
  onAwaited?: () => void;

  static override get [Symbol.species]() {
    return Promise;
  }

  override then<A = T, B = never>(
    onFulfilled?: ((value: T) => A | PromiseLike<A>) | null,
    onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    this.onAwaited?.();
    return super.then(onFulfilled, onRejected);
  }
}

class Stream implements GenerationStream {
  readonly result: Promise<GenerateResult>;
  private readonly progress = new GenerationProgress();
  private readonly inner: AsyncGenerator<StreamChunk, GenerateResult, undefined>;
  private settled = false;
  private failed = false;
  /** next(), return() or throw() was called (by the caller, or by drain()). */
  private iterated = false;
  /** The result was awaited before any iteration, and drain() runs the stream. */
  private draining = false;
  /** The steps drain() ran that next() has not handed out yet, in order. */
  private readonly drained: Promise<IteratorResult<StreamChunk, GenerateResult>>[] = [];
  /** return() was called: drain() asks for no more chunks (the generator's end is return()'s). */
  private returning = false;
  private resolve!: (r: GenerateResult) => void;
  private reject!: (e: unknown) => void;

  constructor(
    body: (progress: GenerationProgress) => AsyncGenerator<StreamChunk, GenerateResult, undefined>,
    private readonly onSettled?: (result: GenerateResult | undefined, error?: unknown) => void,
  ) {
    const settled = new AwaitedPromise<GenerateResult>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // The caller may only iterate: a failure it sees there must not also surface as unhandled.
    settled.catch(() => {});
    settled.onAwaited = () => this.awaited();
    this.result = settled;
    this.inner = body(this.progress);
  }

  /**
   * The result was awaited (or given a then()): before the stream is iterated, it runs the stream
   * itself, so that a caller who awaits the result alone does not wait for ever. Reading `result`
   * to await later does nothing, and the check waits a turn of the event loop, so that a loop
   * begun in the same turn (`const done = s.result.then(...); for await ...`) iterates as usual.
   */
  private awaited(): void {
    if (this.iterated || this.settled) return;
    setImmediate(() => {
      if (!this.iterated && !this.settled) void this.drain();
    });
  }

  /**
   * Runs the stream to its end (a failure settles the result), keeping its steps for a later
   * next(), until a caller who iterates catches up and drives it again.
   */
  private async drain(): Promise<void> {
    this.iterated = this.draining = true;
    while (this.draining && !this.returning) {
      const step = this.step(() => this.inner.next());
      step.catch(() => {});  // handed to next() as it is; the failure settles the result
      this.drained.push(step);
      try {
        if ((await step).done) break;
      } catch {
        break;
      }
    }
    this.draining = false;
  }

  private finish(r: GenerateResult): void {
    if (this.settled) return;
    this.settled = true;
    this.onSettled?.(r);
    this.resolve(r);
  }

  private fail(e: unknown): void {
    if (this.settled) return;
    this.settled = true;
    this.failed = true;
    this.onSettled?.(undefined, e);
    this.reject(e);
  }

  /** Passes a step of the inner generator on, settling the result when it ends. */
  private async step(run: () => Promise<IteratorResult<StreamChunk, GenerateResult>>): Promise<IteratorResult<StreamChunk, GenerateResult>> {
    let r: IteratorResult<StreamChunk, GenerateResult>;
    try {
      r = await run();
    } catch (e) {
      this.fail(e);
      throw e;
    }
    if (r.done) this.finish(r.value);
    else this.progress.text += r.value.text;
    return r;
  }

  next(): Promise<IteratorResult<StreamChunk, GenerateResult>> {
    const kept = this.drained.shift();
    if (kept) return kept;
    // The caller caught up with drain() (or never awaited the result): it drives the stream. A
    // step drain() still has in flight comes first: the generator queues the calls in order.
    this.iterated = true;
    this.draining = false;
    return this.step(() => this.inner.next());
  }

  /** See GenerationStream.return(); after a failure the value is undefined, as a generator's is once it has thrown. */
  async return(): Promise<IteratorReturnResult<GenerateResult>> {
    this.iterated = this.returning = true;
    this.drained.length = 0;
    // A step in flight (drain()'s, or a caller's pending next()) would hold return() until it
    // ends, a wait for pages or a whole prefill: the stop signal ends it as an abort.
    this.progress.stop();
    const ended = this.settled;
    try {
      await this.inner.return(undefined as never);
    } catch (e) {
      this.fail(e);
      throw e;
    }
    if (!ended) this.finish(this.progress.result("abort"));
    return { done: true, value: this.failed ? (undefined as never) : await this.result };
  }

  throw(e: unknown): Promise<IteratorResult<StreamChunk, GenerateResult>> {
    this.iterated = true;
    this.draining = false;
    this.drained.length = 0;
    return this.step(() => this.inner.throw(e));
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.return();
  }
}
