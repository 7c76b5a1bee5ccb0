/**
 * A sequence: one stream of tokens with its own K/V cache, kept across calls. A multi-turn
 * chat keeps its sequence, so each turn prefills only its new tokens; fork() branches it.
 *
 * Evaluation is lazy by one token: append() runs the forward over all new tokens but the last,
 * which stays pending until generate() (or the next append()) needs it. That way generate()
 * gets the logits of the last token from the same forward that evaluates it, and no forward is
 * ever run twice.
 */
import "./dispose-symbols";
import { KV_PAGE_TOKENS, ReserveOptions } from "./admission";
import { AbortError, BusyError, DisposedError, fromNative, InvalidOptionError, LckvError } from "./errors";
import type { EngineContext } from "./engine-context";
import { GenerationProgress, GenerationStream, generationStream, tokenLogprob } from "./generation-stream";
import { NativeSamplingParams, NativeSequence, NativeTokenLogprobs } from "./native";
import { DEFAULT_PREFILL_TOLERANCE, GenerateOptions, nonNegInt, PrefillMode } from "./options";
import { checkPrefillOptions, nativePrefill, prefillKvTolerance, resolvePrefill, ResolvedPrefill } from "./prefill-options";
import { TEXT_CONTEXT_TOKENS, TextStream } from "./textstream";
import type { GenerateResult, PrefillOptions, StreamChunk } from "./types";

export class Sequence implements Disposable {
  private native: NativeSequence | null;
  /** Tokens whose K/V is in the cache. */
  private evaluated: number[] = [];
  /** Tokens of the sequence not run through the model yet (at most the last one, or a fork's). */
  private pending: number[] = [];
  private busy = false;
  /**
   * How far the cached K/V may be from the sequential computation's: 0 when it is that
   * computation (sequential prefill, decode, any prefill of a model without a cyclic group), the
   * loosest fixed-point tolerance a prefill of several tokens ran with, iterativeKvTolerance of
   * the fewest passes once the iterative scheme ran, Infinity once a context shift or a lossy
   * rewind did. The prefix cache reuses K/V only for a request that accepts at least this much.
   */
  private kvTol = 0;
  /** Tokens the current request's page reservation covers (0: none). */
  private reservedUpTo = 0;

  /** @internal Use model.createSequence() (the constructor is private, so the published types offer no `new Sequence()`). */
  static create(engine: EngineContext, native: NativeSequence): Sequence {
    return new Sequence(engine, native);
  }

  private constructor(
    private readonly engine: EngineContext,
    native: NativeSequence,
  ) {
    this.native = native;
  }

  /** Every token of the sequence, in order. */
  get tokens(): number[] {
    return [...this.evaluated, ...this.pending];
  }

  get length(): number {
    return this.evaluated.length + this.pending.length;
  }

  /** True once dispose() ran, or the model was disposed (which frees every sequence). */
  get disposed(): boolean {
    return this.native === null || this.engine.disposed;
  }

  /**
   * Whether every K/V in the cache is the sequential computation's, to within the default
   * fixed-point tolerance (no iterative prefill, no context shift, no looser tolerance ran).
   */
  get exact(): boolean {
    return this.kvTol <= DEFAULT_PREFILL_TOLERANCE;
  }

  /** @internal See kvTol. */
  get kvTolerance(): number {
    return this.kvTol;
  }

  /** @internal A prefill of `tokens` tokens ran in `mode`: how far its K/V may be from exact. */
  private notePrefill(mode: string, tokens: number, tolerance: number, passes: number): void {
    if (tokens <= 1 || !this.engine.config.plan.cyclicGroup) return;  // one pass, exact
    this.kvTol = Math.max(this.kvTol, prefillKvTolerance(mode, tolerance, passes));
  }

  /**
   * @internal The largest m <= n to which truncate(m) keeps the K/V exact: n, unless an int4
   * cache would read the rows of m's page back from their codes (NativeSequence.exactRewind).
   */
  exactRewind(n: number): number {
    if (n >= this.evaluated.length) return n;
    try {
      return this.live().exactRewind(n);
    } catch (e) {
      throw fromNative(e);
    }
  }

  /**
   * Rewinds the engine's sequence to n tokens. A rewind into an int4 cache's quantized page
   * reads that page's rows back from their codes (lossy once): the K/V is then no longer the
   * sequential computation's, and is never reused.
   */
  private rewind(native: NativeSequence, n: number): void {
    if (native.exactRewind(n) < n) this.kvTol = Infinity;
    native.truncate(n);
  }

  private live(): NativeSequence {
    // Said as the caller sees it: a sequence it never disposed went with its model.
    if (this.engine.disposed) throw new DisposedError("the model this sequence belongs to");
    if (!this.native) throw new DisposedError("the sequence");
    return this.native;
  }

  private async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.busy) throw new BusyError("the sequence is busy: await its previous append() or generate() first");
    this.busy = true;
    try {
      return await fn();
    } finally {
      this.busy = false;
    }
  }

  /**
   * Reserves the K/V pages for `total` tokens (waiting in the model's queue while the pool is
   * short). False when `signal` aborted the wait.
   */
  private async ensureReserved(total: number, opts: ReserveOptions = {}): Promise<boolean> {
    // A promise of the same size may still change shape (the copies of a shift, a window's pages).
    if (total <= this.reservedUpTo && !opts.extraPages && opts.decodeFrom === undefined) return true;
    const ok = await this.engine.admission.reserve(this.live(), total, opts);
    if (ok) this.reservedUpTo = total;
    return ok;
  }

  /** Drops what is left of the page reservation, and lets waiting requests in. */
  private releaseReservation(): void {
    this.reservedUpTo = 0;
    if (!this.native && !this.engine.disposed) {
      // Disposed while its call ran: the engine frees its pages as that call's worker ends,
      // just after this; the queue may go on then.
      this.engine.admission.pumpSoon();
      return;
    }
    if (this.native && !this.engine.disposed) {
      try {
        this.native.reserve(0);
      } catch {
        // busy or disposed meanwhile: its pages come back when it is disposed
      }
      this.engine.admission.pump();
    }
  }

  /**
   * @internal model.stream(): reserve the whole request up front, the prompt prefilled up to
   * `promptTokens` and the generation decoded after it.
   */
  async reserveRequest(promptTokens: number, maxNewTokens: number, signal?: AbortSignal): Promise<boolean> {
    return this.ensureReserved(this.requestTokens(promptTokens, maxNewTokens), { signal, decodeFrom: promptTokens });
  }

  /** @internal model.streamMany(): refuses forks of a prefill that could never run (Admission.refuseForksThatCannotFit). */
  refuseForksThatCannotFit(promptTokens: number, maxNewTokens: number): void {
    this.engine.admission.refuseForksThatCannotFit(this.live(), this.requestTokens(promptTokens, maxNewTokens), promptTokens);
  }

  /** The tokens a request of a prompt and its generation can hold: both, up to the context. */
  private requestTokens(promptTokens: number, maxNewTokens: number): number {
    return Math.min(promptTokens + maxNewTokens, this.engine.maxContext);
  }

  /** @internal Drops a reservation reserveRequest() made, when the request does not go on. */
  releaseRequest(): void {
    this.releaseReservation();
  }

  /** Adds text or token ids to the sequence (prefilling all but the last new token). */
  async append(input: string | readonly number[], options: PrefillOptions = {}): Promise<{ passes: number }> {
    return this.appendTokens(input, checkPrefillOptions(options, this.engine), false);
  }

  /** @internal append(); keepReservation: the request goes on to generate (model.stream). */
  async appendTokens(input: string | readonly number[], options: PrefillOptions, keepReservation: boolean): Promise<{ passes: number }> {
    return this.exclusive(async () => {
      this.live();
      const ids = this.engine.toTokenIds(input, "input", this.length);
      const prefill = resolvePrefill(this.engine, options);
      const run = [...this.pending, ...ids.slice(0, -1)];
      try {
        if (!(await this.ensureReserved(this.evaluated.length + run.length, { signal: prefill.signal }))) {
          throw new AbortError("the request was aborted while it waited for K/V pages");
        }
        // The sequence, or its model, may have been disposed meanwhile: said as live() says it.
        return await this.prefill(this.live(), ids, run, prefill);
      } finally {
        if (!keepReservation) this.releaseReservation();
      }
    });
  }

  private async prefill(native: NativeSequence, ids: number[], run: number[], prefill: ResolvedPrefill): Promise<{ passes: number }> {
    let passes = 0;
    // Long inputs go in chunks, so that other sequences' decode steps run in between. Exact
    // modes stay exact across chunks (each chunk reads the final K/V of the ones before), and
    // each chunk picks its way and size anew: while other requests are in flight, batched token
    // steps (a model with a cyclic group) or rows of mixed steps beside the decode rows (a model
    // without one); else a native prefill call, of the lone chunk while no other request is. A
    // piece handed to mixed steps stays there until it is in, whoever else comes or goes: the
    // scheduler sizes each step's share of it. The iterative scheme is defined over the whole
    // input, so it is not cut.
    const before = { evaluated: this.evaluated.length, pending: this.pending };
    const done = this.engine.working();
    try {
      // An int4 sequence ending mid-page keeps that page's rows in bf16 until the page fills: a
      // rewind to here after a later chunk filled it is exact only from this copy. Inside the
      // try: a sequence disposed while it waited for its pages fails here, and must still stop
      // counting as in flight.
      if (run.length > 0) native.checkpointResidual();
      // Yield once so that prompts that arrive in the same turn of the event loop count each
      // other in flight before the first chunk picks its way.
      if (this.engine.mayBatchPrefill(prefill)) await new Promise((resolve) => setImmediate(resolve));
      for (let at = 0; at < run.length; ) {
        const batched = this.engine.batchedPrefill(prefill);
        const mixed = !batched && this.engine.mixedPrefill();
        // Rows of mixed steps go in lone-chunk pieces: the scheduler cuts a piece to each step's
        // budget (one chunk while a stream waits for tokens, so that bounds its wait), and while
        // only prompts are in flight a step then takes whole prompts, one attention launch each,
        // instead of a piece of every prompt, a launch per piece.
        const chunk = prefill.mode === "iterative" ? run.length : mixed ? this.engine.lonePrefillChunk : this.engine.prefillChunkNow();
        const part = run.slice(at, at + chunk);
        at += part.length;
        if (prefill.signal?.aborted) throw new AbortError("the prefill was aborted");
        let mode: PrefillMode = prefill.mode;
        if (batched) {
          await this.engine.runCancellable(prefill.signal, (cancel) => this.engine.scheduler.append(native, part, cancel));
          mode = "sequential";
          passes = Math.max(passes, 1);
        } else if (mixed) {
          await this.engine.runCancellable(prefill.signal, (cancel) => this.engine.scheduler.append(native, part, cancel, true));
          passes = Math.max(passes, 1);
        } else {
          const r = await this.engine.runCancellable(prefill.signal, (cancel) => native.append(Int32Array.from(part), { ...nativePrefill(prefill), logits: "none", cancel }));
          passes = Math.max(passes, r.passes);
        }
        this.engine.countPrefilled(part.length);
        this.notePrefill(mode, part.length, prefill.tolerance, prefill.passes);
        this.evaluated.push(...part);
        this.pending = [];
      }
    } catch (e) {
      // All or nothing: drop what did go in (whole chunks, and the tokens of a chunk cut short
      // between its shared steps), so the sequence is as it was.
      const inEngine = this.engineLength();
      if (inEngine !== undefined && inEngine > before.evaluated) {
        try {
          this.rewind(native, before.evaluated);
          this.evaluated.length = before.evaluated;
          this.pending = before.pending;
        } catch {
          // Disposed meanwhile, or a sliding window already released what the rewind needs:
          // then what went in stays, so that this side still matches the engine's.
          this.evaluated.push(...run.slice(this.evaluated.length - before.evaluated, inEngine - before.evaluated));
          this.pending = [];
        }
      } else {
        this.pending = before.pending;
      }
      throw fromNative(e);
    } finally {
      done();
      // Best effort: a checkpoint left behind stays correct (the engine drops it when the rows
      // before its length change) and only holds a page's worth of memory.
      try {
        if (this.engineLength() !== undefined) native.dropResidualCheckpoint();
      } catch {
        // busy or freed meanwhile
      }
    }
    this.pending = ids.slice(-1);
    return { passes };
  }

  /** Tokens in the engine's sequence; undefined once it is freed. */
  private engineLength(): number | undefined {
    if (!this.native || this.engine.disposed) return undefined;
    try {
      return this.native.length;
    } catch {
      return undefined;
    }
  }

  /**
   * Generates from the end of the sequence; the generated tokens become part of it. The stream's
   * `result` settles with the GenerateResult however the stream ends.
   */
  generate(options?: GenerateOptions): GenerationStream {
    return generationStream((progress) => this.run(options, 0, 0, progress));
  }

  /**
   * @internal The generation loop behind generate() and model.generate(). `progress` receives
   * the tokens as they come (an early return() builds its result from it).
   */
  async *run(
    options: GenerateOptions | undefined,
    promptTokens: number,
    prefillPasses = 0,
    progress = new GenerationProgress(),
  ): AsyncGenerator<StreamChunk, GenerateResult, undefined> {
    progress.promptTokens = promptTokens;
    progress.prefillPasses = prefillPasses;
    const opts = this.engine.resolveGenerate(options, this.length, progress.stopSignal);
    if (this.busy) throw new BusyError("the sequence is busy: await its previous append() or generate() first");
    const native = this.live();
    if (this.length === 0 && opts.maxNewTokens > 0) {
      throw new LckvError("LCKV_EMPTY_SEQUENCE", "generate() needs a non-empty sequence: append() input first");
    }
    // A sequence that fills the context has no room for a token without a shift: nothing runs
    // (no rewind, no pages reserved, no step).
    if (opts.maxNewTokens > 0 && this.engine.fillsContext(this.length, opts)) return progress.result("length");
    if (this.pending.length === 0 && opts.maxNewTokens > 0) {
      // The last token's logits are not kept: drop its K/V and run it again, with sampling.
      this.rewind(native, this.evaluated.length - 1);
      this.pending = [this.evaluated.pop()!];
    }
    this.busy = true;
    // Every page this request can need, before it starts (it may wait here for pages).
    let admitted: boolean;
    try {
      const total = this.evaluated.length + this.pending.length + opts.maxNewTokens;
      // A generation that will shift its context also promises, from the start, the copies of
      // shared pages the shift will rotate: waiting for them at the shift, with every page of
      // the context held, could wait on another request that does the same.
      const shiftCopies = opts.contextShift === "sink-window" && total > this.engine.maxContext ? () => this.shiftCopies(opts.sinkTokens) : undefined;
      admitted = opts.maxNewTokens <= 0 || (await this.ensureReserved(Math.min(total, this.engine.maxContext), { signal: opts.signal, extraPages: shiftCopies, decodeFrom: this.evaluated.length }));
    } catch (e) {
      this.busy = false;
      this.releaseReservation();
      throw e;
    }
    if (!admitted) {
      // Aborted while waiting for pages: nothing ran, and the sequence is free again.
      this.busy = false;
      this.releaseReservation();
      return progress.result("abort");
    }
    const eos = new Set(opts.ignoreEos ? [] : this.engine.eosTokenIds);
    const tokenizer = this.engine.tokenizer;
    // The last tokens before the generation are decoding context (a SentencePiece decoder strips
    // the leading space of text decoded alone).
    const text = new TextStream((ids) => (tokenizer ? tokenizer.decode(ids) : ""), opts.stop, this.tokens.slice(-TEXT_CONTEXT_TOKENS));
    const tokens = progress.tokens;
    let finishReason: GenerateResult["finishReason"] = "length";
    const sample: NativeSamplingParams = {
      temperature: opts.temperature,
      topK: opts.topK,
      topP: opts.topP,
      minP: opts.minP,
      repetitionPenalty: opts.repetitionPenalty,
      seed: opts.seed,
    };
    // The options beyond these go to the engine only when set (its common path reads none).
    if (opts.presencePenalty || opts.frequencyPenalty) {
      sample.presencePenalty = opts.presencePenalty ?? 0;
      sample.frequencyPenalty = opts.frequencyPenalty ?? 0;
      // The penalties count this request's tokens only: those from here on.
      sample.penaltyFrom = this.length;
    }
    if (opts.logitBias && opts.logitBias.tokens.length > 0) sample.logitBias = opts.logitBias;
    if (opts.logprobs !== undefined) {
      sample.logprobs = opts.logprobs;
      progress.logprobs = [];
    }
    const working = this.engine.working();
    try {
      while (opts.maxNewTokens > 0) {
        if (opts.signal?.aborted) {
          finishReason = "abort";
          break;
        }
        // Without a context shift the step whose token would lie past the context does not run
        // (what the server's max_tokens check promises). With "sink-window" the pending token is
        // what must fit, and the shift makes room for it.
        if (this.engine.fillsContext(this.length, opts)) break;
        if (this.length > this.engine.maxContext) {
          const before = this.evaluated.length;
          const { sink } = this.shiftPlan(opts.sinkTokens, before);
          if (!(await this.shiftContext(opts.sinkTokens, opts.maxNewTokens - tokens.length, opts.signal))) {
            if (opts.signal?.aborted) finishReason = "abort";  // aborted while the shift waited for pages
            break;
          }
          // The generated tokens moved down with the rest (those the shift dropped no longer count).
          if (sample.penaltyFrom !== undefined) sample.penaltyFrom = Math.max(sink, sample.penaltyFrom - (before - this.evaluated.length));
        }
        const run = this.pending;
        let tok: number;
        let logprobs: NativeTokenLogprobs | undefined;
        if (run.length === 1) {
          // A decode step: batched with every other sequence decoding now.
          try {
            // The last step (of maxNewTokens, or the one that fills the context without a shift)
            // queues no step after it.
            const last = this.engine.fillsContext(this.length + 1, opts) || tokens.length + 1 >= opts.maxNewTokens;
            ({ token: tok, logprobs } = await this.engine.scheduler.decode(native, run[0], sample, last));
          } catch (e) {
            // Said of this sequence, not of "a sequence in the batch" it ran in.
            if (e instanceof DisposedError && this.native === null && !this.engine.disposed) throw new DisposedError("the sequence");
            throw e;
          }
        } else {
          let r;
          try {
            r = await native.append(Int32Array.from(run), {
              mode: opts.prefill,
              passes: opts.prefillPasses,
              tolerance: opts.prefillTolerance,
              logits: "none",
              sample,
            });
          } catch (e) {
            throw fromNative(e);
          }
          progress.prefillPasses = Math.max(progress.prefillPasses, r.passes);
          this.engine.countPrefilled(run.length);
          this.notePrefill(opts.prefill, run.length, opts.prefillTolerance, opts.prefillPasses);
          tok = r.token!;
          logprobs = r.logprobs;
        }
        progress.noteToken();
        this.evaluated.push(...run);
        this.pending = [];
        if (eos.has(tok)) {
          finishReason = "stop";
          progress.endedOnEos = true;
          break;
        }
        tokens.push(tok);
        this.pending = [tok];
        const delta = text.push(tokens);
        // Every token in the result has its chunk, the one that completed a stop string included.
        if (progress.logprobs && logprobs) {
          const lp = tokenLogprob(tok, logprobs);
          progress.logprobs.push(lp);
          yield { text: delta, token: tok, logprob: lp.logprob, topLogprobs: lp.topLogprobs };
        } else {
          yield { text: delta, token: tok };
        }
        if (text.stopped) {
          finishReason = "stop";
          break;
        }
        if (tokens.length >= opts.maxNewTokens) break;
      }
    } finally {
      working();
      this.busy = false;
      this.releaseReservation();
    }
    const rest = text.flush();
    if (text.stopped && finishReason === "length") finishReason = "stop";  // a stop string in the text held back to the end
    if (rest) yield { text: rest, token: null };
    return progress.result(finishReason, text.value);
  }

  /** Where a context shift of a sequence of `length` tokens cuts: whole pages. */
  private shiftPlan(sinkTokens: number, length: number): { sink: number; drop: number } {
    const P = KV_PAGE_TOKENS;
    const sink = Math.ceil(sinkTokens / P) * P;
    return { sink, drop: Math.max(P, Math.floor((length - sink) / 2 / P) * P) };
  }

  /**
   * Pages the next context shift (at the context limit) takes beyond those it frees: copies of
   * the pages it moves that are shared now. Pages written from here on are private, so the
   * count can only fall.
   */
  private shiftCopies(sinkTokens: number, length = this.engine.maxContext): number {
    const { sink, drop } = this.shiftPlan(sinkTokens, length);
    if (sink + drop > this.evaluated.length) return 0;
    try {
      return this.live().pagesToShift(sink, drop);
    } catch (e) {
      throw fromNative(e);
    }
  }

  /**
   * "sink-window" context shift: keeps the first sinkTokens (rounded up to a page) and drops
   * half of the rest, in whole pages, so the sequence fits again. False when it cannot.
   */
  private async shiftContext(sinkTokens: number, remaining: number, signal?: AbortSignal): Promise<boolean> {
    const { sink, drop } = this.shiftPlan(sinkTokens, this.evaluated.length);
    if (sink + drop > this.evaluated.length) return false;
    const native = this.live();
    // Keys that move are rotated, so moved pages this sequence shares (a fork, a prefix-cache
    // hit) are copied: the reservation made when the generation began holds those pages; this
    // only waits if sharing the sequence's pages began after that.
    const copies = () => this.shiftCopies(sinkTokens, this.evaluated.length);
    if (copies() > 0) {
      this.reservedUpTo = 0;
      if (!(await this.engine.admission.reserve(native, this.evaluated.length, { signal, resumed: true, extraPages: copies }))) return false;
    }
    try {
      await native.shift(sink, drop);
    } catch (e) {
      // A device error past the point of no return leaves the engine's sequence at `sink` tokens.
      if (native.length < this.evaluated.length) this.evaluated.splice(native.length);
      throw fromNative(e);
    }
    this.evaluated.splice(sink, drop);
    // The K/V no longer belongs to the token prefix it follows: never reuse it.
    this.kvTol = Infinity;
    // The dropped pages went back to the pool; promise the ones the rest of the request needs.
    this.reservedUpTo = 0;
    const ok = await this.ensureReserved(Math.min(this.length + remaining, this.engine.maxContext), { signal, resumed: true, decodeFrom: this.evaluated.length });
    this.engine.admission.pump();  // what the shift gave back beyond that may let a waiting request in
    return ok;
  }

  /** A new sequence that shares everything so far (its pages are shared, copied on write). */
  fork(): Sequence {
    const native = this.live();
    if (this.busy) throw new BusyError("the sequence is busy: await its previous append() or generate() first");
    let child: NativeSequence;
    try {
      child = native.fork();
    } catch (e) {
      throw fromNative(e);
    }
    this.engine.adopt(child);
    const s = new Sequence(this.engine, child);
    s.evaluated = [...this.evaluated];
    s.pending = [...this.pending];
    s.kvTol = this.kvTol;
    return s;
  }

  /**
   * @internal Gives back the page past its end that a generation which stopped before its last
   * step can leave held (its next position's, taken early for a step run ahead: docs/
   * architecture.md), for a sequence kept idle: the pages past its evaluated tokens, which hold
   * no K/V (its pending tokens stay pending). Nothing for a busy one, or one whose rewind would
   * not be exact (an int4 page, which never takes one).
   */
  releasePagesPastEnd(): void {
    const native = this.live();
    const n = this.evaluated.length;
    if (this.busy || native.exactRewind(n) < n) return;
    native.truncate(n);
    this.engine.admission.pump();
  }

  /** Rewinds the sequence to its first n tokens. */
  truncate(n: number): void {
    const native = this.live();
    if (this.busy) throw new BusyError("the sequence is busy: await its previous append() or generate() first");
    nonNegInt("n", n);
    if (n > this.length) throw new InvalidOptionError("n", `must be at most the sequence length ${this.length}, got ${n}`);
    if (n <= this.evaluated.length) {
      try {
        this.rewind(native, n);
      } catch (e) {
        throw fromNative(e);
      }
      this.evaluated.length = n;
      this.pending = [];
      this.engine.admission.pump();  // pages past n went back to the pool
    } else {
      this.pending.length = n - this.evaluated.length;
    }
  }

  /** @internal Marks the pages as held for prefix reuse (cacheStats' pagesCached). */
  markCached(cached: boolean): void {
    this.native?.setCached(cached);
  }

  /** Frees the sequence's cache. Later calls throw DisposedError. */
  dispose(): void {
    if (!this.native) return;
    this.engine.closeSequence(this.native);
    this.native = null;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
