/**
 * Model: the user-facing engine that loadModel() returns. TypeScript owns policy (options,
 * stopping, streaming, lifecycle); the native addon owns the forward, which runs off the JS thread.
 */
import "./dispose-symbols";
import { Admission, AdmissionOptions, KV_PAGE_TOKENS } from "./admission";
import { ChatSession, ChatSessionOptions } from "./chat-session";
import { ModelConfig } from "./config";
import { EngineContext } from "./engine-context";
import { AbortError, DisposedError, fromNative, InvalidInputError, InvalidOptionError } from "./errors";
import { GenerationProgress, GenerationStream, generationStream } from "./generation-stream";
import { KvPoolStats, NativeModel, NativeSequence } from "./native";
import { describe, GenerateOptions, GenerationDefaults, posInt } from "./options";
import { DecodeScheduler, DEFAULT_MAX_BATCH, SchedulerStats } from "./scheduler";
import { isKvCacheDtype, KV_CACHE_DTYPES, KvCacheDtype } from "./kv-cache-dtype";
import { PrefixCache, PrefixCacheStats } from "./prefix-cache";
import { checkPrefillOptions, nativePrefill, prefillKvTolerance, resolvePrefill } from "./prefill-options";
import { Sequence } from "./sequence";
import { ChatMessage, Tokenizer } from "./tokenizer";
import type { ForwardResult, GenerateResult, PrefillOptions, StreamChunk } from "./types";

/** model.cacheStats(): the pool's pages (KvPoolStats) and the model's own counts. */
export interface CacheStats extends KvPoolStats {
  /** pagesTotal * pageTokens: what the pool holds, whatever the number of sequences. */
  capacityTokens: number;
  kvBytesPerToken: number;
  liveSequences: number;
  /** Bytes of the pages live sequences hold (a shared page counts once per holder). */
  kvBytes: number;
  /** Requests waiting for pages. */
  queued: number;
  /** Requests prefilling or generating now (a sequence's append() or generate(); streamMany()'s shared prefill counts once, then each completion). */
  running: number;
  prefilledTokens: number;
  prefixCache: PrefixCacheStats;
}

export { KV_PAGE_TOKENS };

/** The most completions streamMany() makes of one prompt (OpenAI's limit for `n`). */
export const MAX_COMPLETIONS = 128;

/**
 * Completion i's seed in streamMany(): seed + i, wrapped past Number.MAX_SAFE_INTEGER (the
 * largest seed generate() takes) to 0, 1, ..., so that every seed a request may give works for
 * each of its completions, each with a seed of its own.
 */
export function forkSeed(seed: number, i: number): number {
  return seed > Number.MAX_SAFE_INTEGER - i ? seed - 2 ** 53 + i : seed + i;
}

/** streamMany()'s prefill, shared by its streams; `ended` when no generation is to run. */
interface SharedPrefill {
  promptTokens: number;
  passes: number;
  ended?: "length" | "abort";
}

/** Bytes one token of context costs in the model's cache of `dtype`: the engine's page layout (codes, scales and the page's alignment) over its tokens. */
function kvBytesPerToken(native: NativeModel, dtype: KvCacheDtype): number {
  return native.kvPageBytes(dtype, KV_PAGE_TOKENS) / KV_PAGE_TOKENS;
}

/**
 * An error of a request (stream(), streamMany()) as its caller sees it: the request's sequences
 * are its own, so a DisposedError is the model's, not that of a sequence the caller never had.
 */
function saidOfTheModel(e: unknown): unknown {
  return e instanceof DisposedError ? new DisposedError("the model") : e;
}

export class Model implements AsyncDisposable {
  /** Bytes one token of context costs in the cache (only the KV layers are cached). */
  readonly kvBytesPerToken: number;
  /** What the same model would cost per token with a standard cache (every layer cached). */
  readonly standardKvBytesPerToken: number;
  readonly device: "cpu" | "cuda";
  /** The native model, its live sequences, the queue and the scheduler, shared with every Sequence. */
  private readonly engine: EngineContext;
  /** @internal Batches the decode steps of concurrent generations. */
  readonly scheduler: DecodeScheduler;
  private readonly prefixCache: PrefixCache;
  /** @internal Reserves K/V pages for requests, queueing them while the pool is short. */
  readonly admission: Admission;
  /** The first dispose()'s promise, which every call returns. */
  private disposal: Promise<void> | undefined;

  /**
   * @internal Use loadModel(). The constructor is private so that the published types offer no
   * `new Model()`, which would type-check and then fail on its missing engine.
   */
  static create(
    directory: string,
    config: ModelConfig,
    native: NativeModel,
    tokenizer: Tokenizer | undefined,
    generationConfig: Record<string, unknown>,
    maxContext: number,
    kvCacheDtype: KvCacheDtype,
    prefixCacheSize?: number,
    admission?: AdmissionOptions,
    maxBatch?: number,
  ): Model {
    return new Model(directory, config, native, tokenizer, generationConfig, maxContext, kvCacheDtype, prefixCacheSize, admission, maxBatch);
  }

  private constructor(
    readonly directory: string,
    readonly config: ModelConfig,
    native: NativeModel,
    readonly tokenizer: Tokenizer | undefined,
    readonly generationConfig: Record<string, unknown>,
    readonly maxContext: number,
    /** The K/V cache's value type. */
    readonly kvCacheDtype: KvCacheDtype,
    prefixCacheSize = 8,
    admission: AdmissionOptions = { maxQueue: 1024, queueTimeout: Infinity },
    maxBatch?: number,
  ) {
    this.prefixCache = new PrefixCache(prefixCacheSize);
    this.kvBytesPerToken = kvBytesPerToken(native, kvCacheDtype);
    this.standardKvBytesPerToken = (this.kvBytesPerToken / config.kvLayers.length) * config.numLayers;
    this.device = native.backend === "cuda" ? "cuda" : "cpu";
    this.engine = new EngineContext({
      native,
      directory,
      config,
      tokenizer,
      generationConfig,
      maxContext,
      admission,
      evictCached: () => this.prefixCache.evictOne(),
      // Throughput by default, on the GPU too, where steps above 16 rows take cuBLASLt for bf16
      // weights, whose results depend on the batch; maxBatch 16 keeps decode steps on the GEMVs,
      // batch-invariant (DEFAULT_MAX_BATCH has the trade and its measurements).
      maxBatch: maxBatch ?? DEFAULT_MAX_BATCH,
      device: this.device,
      kvCacheDtype,
    });
    this.admission = this.engine.admission;
    this.scheduler = this.engine.scheduler;
  }

  /**
   * Bytes one token of context would cost in a cache of `dtype`; null when this model cannot keep
   * its K/V in that type on its device (its head size: what loadModel would refuse as kvCacheDtype).
   */
  kvBytesPerTokenIn(dtype: KvCacheDtype): number | null {
    if (!isKvCacheDtype(dtype)) throw new InvalidOptionError("dtype", `must be one of ${KV_CACHE_DTYPES.map((t) => `"${t}"`).join(", ")}, got ${describe(dtype)}`);
    const native = this.engine.nativeModel();
    return native.kvTypeProblem(dtype) === null ? kvBytesPerToken(native, dtype) : null;
  }

  get disposed(): boolean {
    return this.engine.disposed;
  }

  /** Token ids that end generation: generation_config's eos_token_id, else config's, else the tokenizer's. */
  get eosTokenIds(): number[] {
    return this.engine.eosTokenIds;
  }

  /**
   * Text -> ids via the tokenizer; ids are checked against the vocabulary and the context. Text
   * that starts a sequence gets the tokenizer's special tokens (BOS); text appended to a
   * sequence that already holds tokens does not, so a later turn adds only its own text.
   */
  toTokenIds(input: string | readonly number[], what = "prompt", alreadyInContext = 0): number[] {
    return this.engine.toTokenIds(input, what, alreadyInContext);
  }

  /** A chat's prompt ids (the messages through the chat template), checked as toTokenIds checks text. */
  chatTokenIds(messages: readonly ChatMessage[], what = "messages"): number[] {
    return this.engine.chatTokenIds(messages, what);
  }

  /** @internal */
  nativeModel(): NativeModel {
    return this.engine.nativeModel();
  }

  /** @internal Generation defaults from generation_config.json and the config. */
  generationDefaults(contextTokens = 0): GenerationDefaults {
    return this.engine.generationDefaults(contextTokens);
  }

  /** Runs the prompt and returns its logits, [ids.length * vocabSize], and the prefill passes. */
  async forward(input: string | readonly number[], options: PrefillOptions = {}): Promise<ForwardResult> {
    const ids = this.toTokenIds(input, "input");
    const prefill = resolvePrefill(this.engine, checkPrefillOptions(options, this.engine));
    const seq = this.engine.openSequence();
    try {
      // Its pages through the queue like any request's (evicting cached prefixes if need be).
      if (!(await this.admission.reserve(seq, ids.length, { signal: prefill.signal }))) throw new AbortError("the request was aborted while it waited for K/V pages");
      const r = await this.engine.runCancellable(prefill.signal, (cancel) => seq.append(Int32Array.from(ids), { ...nativePrefill(prefill), logits: "all", cancel }));
      return { logits: r.logits!, passes: r.passes };
    } catch (e) {
      throw fromNative(e);
    } finally {
      this.engine.closeSequence(seq);
    }
  }

  /** Prefill logits of every position: Float32Array [ids.length * vocabSize]. */
  async logits(input: string | readonly number[], options: PrefillOptions = {}): Promise<Float32Array> {
    return (await this.forward(input, options)).logits;
  }

  /** @internal Counts tokens run through a prefill. */
  countPrefilled(n: number): void {
    this.engine.countPrefilled(n);
  }

  /**
   * The K/V pool's accounting: page size, pages total / used / free / cached (held only by
   * finished requests kept for prefix reuse) / reserved (promised to running requests), the
   * capacity in tokens, bytes per token, live sequences and the bytes of the pages they hold,
   * requests waiting for pages and those running, prompt tokens prefilled, and prefix reuse.
   */
  cacheStats(): CacheStats {
    // A disposed model has no pool: every count is zero.
    const p = this.engine.disposed
      ? { pageTokens: KV_PAGE_TOKENS, pageBytes: 0, pagesTotal: 0, pagesUsed: 0, pagesFree: 0, pagesCached: 0, pagesReserved: 0, sharedRefs: 0, residualPages: 0 }
      : this.engine.nativeModel().poolStats();
    let kvBytes = 0;
    for (const s of this.engine.live) kvBytes += s.kvBytes;
    return {
      pageTokens: p.pageTokens,
      pageBytes: p.pageBytes,
      pagesTotal: p.pagesTotal,
      pagesUsed: p.pagesUsed,
      pagesFree: p.pagesFree,
      pagesCached: p.pagesCached,
      pagesReserved: p.pagesReserved,
      residualPages: p.residualPages,
      capacityTokens: p.pagesTotal * p.pageTokens,
      kvBytesPerToken: this.kvBytesPerToken,
      liveSequences: this.engine.live.size,
      kvBytes,
      queued: this.admission.queued,
      running: this.engine.disposed ? 0 : this.engine.running,
      prefilledTokens: this.engine.prefilledTokens,
      prefixCache: this.prefixCache.stats(),
    };
  }

  /** Drops every finished request kept for prefix reuse (their pages go back to the pool). */
  clearPrefixCache(): void {
    this.prefixCache.clear();
    if (!this.engine.disposed) this.admission.pump();
  }

  /** @internal Checks every page's reference count against the live page tables ("" = consistent). */
  auditCache(): string {
    return this.nativeModel().auditPool();
  }

  /** Decode steps run so far, tokens decoded, prompt tokens run as batched rows, and the largest batch (continuous batching). */
  schedulerStats(): SchedulerStats {
    return { ...this.scheduler.stats };
  }

  /** A new, empty sequence with its own cache: for multi-turn use, forks and rewinds. */
  createSequence(): Sequence {
    return this.adoptSequence(this.engine.openSequence());
  }

  /** @internal */
  adoptSequence(native: NativeSequence): Sequence {
    this.engine.adopt(native);
    return Sequence.create(this.engine, native);
  }

  /**
   * Streams generated tokens with their text (a one-shot sequence). The stream's `result`
   * settles with the GenerateResult (finish reason, usage, timings) however it ends.
   */
  stream(input: string | readonly number[], options?: GenerateOptions): GenerationStream {
    return generationStream((progress) => this.streamRequest(input, options, progress));
  }

  /** stream()'s generator. */
  private async *streamRequest(
    input: string | readonly number[],
    options: GenerateOptions | undefined,
    progress: GenerationProgress,
  ): AsyncGenerator<StreamChunk, GenerateResult, undefined> {
    const prompt = this.toTokenIds(input);
    const opts = this.engine.resolveGenerate(options, prompt.length, progress.stopSignal);
    this.engine.refuseFullContext(prompt.length, opts, "prompt");
    this.nativeModel();
    progress.promptTokens = prompt.length;
    const done = (finishReason: GenerateResult["finishReason"]): GenerateResult => progress.result(finishReason);
    if (opts.maxNewTokens === 0) return done("length");
    if (opts.signal?.aborted) return done("abort");
    // Reuse the longest prefix a finished request left in the cache; prefill only the rest.
    // A request accepts cached K/V as far from exact as its own prefill would make.
    const hit = this.prefixCache.take(prompt, prefillKvTolerance(opts.prefill, opts.prefillTolerance, opts.prefillPasses));
    const seq = hit ? hit.seq : this.createSequence();
    let finished = false;
    try {
      // The pages for the prompt and every token it may generate, before any work (this is
      // where a request waits while the pool is full).
      if (!(await seq.reserveRequest(prompt.length, opts.maxNewTokens, opts.signal))) return done("abort");
      let passes: number;
      try {
        ({ passes } = await seq.appendTokens(hit ? prompt.slice(hit.reused) : prompt, opts, true));
      } catch (e) {
        if (e instanceof AbortError) return done("abort");  // aborted mid-prefill: nothing was added
        throw e;
      }
      const result = yield* seq.run(options, prompt.length, passes, progress);
      finished = true;
      return result;
    } catch (e) {
      throw saidOfTheModel(e);
    } finally {
      if (finished && !this.disposed) {
        this.prefixCache.offer(seq);
        // Its pages are evictable now (they were not when its run ended): a request may wait for them.
        this.admission.pump();
      }
      else seq.dispose();
    }
  }

  /** Generates a completion of the prompt (text or token ids). */
  async generate(input: string | readonly number[], options?: GenerateOptions): Promise<GenerateResult> {
    const it = this.stream(input, options);
    for (;;) {
      const n = await it.next();
      if (n.done) return n.value;
    }
  }

  /** Renders messages with the chat template, then generates the assistant's reply. */
  async chat(messages: readonly ChatMessage[], options?: GenerateOptions): Promise<GenerateResult> {
    return this.generate(this.chatTokenIds(messages, "prompt"), options);
  }

  /** model.chat(), streaming: the reply's chunks, and `result` as stream() has it. */
  chatStream(messages: readonly ChatMessage[], options?: GenerateOptions): GenerationStream {
    return generationStream((progress) => this.chatRequest(messages, options, progress));
  }

  /** chatStream()'s generator: like stream()'s, the template renders when it is first iterated. */
  private async *chatRequest(
    messages: readonly ChatMessage[],
    options: GenerateOptions | undefined,
    progress: GenerationProgress,
  ): AsyncGenerator<StreamChunk, GenerateResult, undefined> {
    return yield* this.streamRequest(this.chatTokenIds(messages, "prompt"), options, progress);
  }

  /**
   * A multi-turn chat that keeps one sequence between turns: session.send(text) streams the
   * reply, and each turn prefills only the tokens the conversation gained since the last.
   */
  createChatSession(options: ChatSessionOptions = {}): ChatSession {
    if (typeof options !== "object" || options === null) throw new InvalidOptionError("options", "must be an object");
    for (const k of Object.keys(options)) {
      if (k !== "system") throw new InvalidOptionError(k, "is not a chat session option (known: system)");
    }
    if (options.system !== undefined && typeof options.system !== "string") {
      throw new InvalidOptionError("system", `must be a string, got ${describe(options.system)}`);
    }
    if (!this.tokenizer) throw new InvalidInputError(`${this.directory} has no tokenizer.json`, "LCKV_NO_TOKENIZER");
    this.tokenizer.requireChatTemplate();  // now, not at the first send()
    return ChatSession.create(this.engine, this.createSequence(), options.system);
  }

  /**
   * n completions of one prompt from one prefill (OpenAI's `n`): the prompt is prefilled once
   * and the sequence forked n times (the forks share its pages, copy-on-write); completion i
   * samples with seed + i when a seed is given (past 2^53 - 1, the largest seed, it wraps to 0 on:
   * forkSeed). The prefill runs when the first stream is
   * iterated (or its result awaited); a stream neither iterated nor awaited holds its fork until
   * return() is called on it. A stream's return() ends its own wait for the prefill at once; the
   * prefill (and its wait for pages) stops once every stream has been returned, as stream()'s
   * does on its return(), and goes on while any stream has not.
   */
  streamMany(input: string | readonly number[], n: number, options?: GenerateOptions): GenerationStream[] {
    posInt("n", n, MAX_COMPLETIONS);
    const forks: (Sequence | null)[] = new Array(n).fill(null);
    /** Streams that want no completion any more: returned, or ended. */
    const closed: boolean[] = new Array(n).fill(false);
    /** Aborted once every stream is closed: the shared prefill is then for no one. */
    const unwanted = new AbortController();
    const close = (i: number) => {
      closed[i] = true;
      forks[i]?.dispose();  // a fork its stream never took
      forks[i] = null;
      if (closed.every(Boolean)) unwanted.abort();
    };
    let shared: Promise<SharedPrefill> | undefined;
    const prefill = () => {
      if (!shared) {
        shared = this.prefillForForks(input, options, forks, closed, unwanted.signal);
        shared.catch(() => {});  // each stream that waits on it reports the error
      }
      return shared;
    };
    return forks.map((_, i) =>
      generationStream(
        (progress) => {
          progress.stopSignal.addEventListener("abort", () => close(i), { once: true });
          return this.forkedRequest(i, prefill, forks, options, progress, unwanted.signal);
        },
        () => close(i),
      ),
    );
  }

  /** streamMany()'s shared prefill: fills forks[i] for each stream not closed yet; `unwanted` stops it. */
  private async prefillForForks(
    input: string | readonly number[],
    options: GenerateOptions | undefined,
    forks: (Sequence | null)[],
    closed: boolean[],
    unwanted: AbortSignal,
  ): Promise<SharedPrefill> {
    const prompt = this.toTokenIds(input);
    const opts = this.engine.resolveGenerate(options, prompt.length, unwanted);
    this.engine.refuseFullContext(prompt.length, opts, "prompt");
    this.nativeModel();
    if (opts.maxNewTokens === 0) return { promptTokens: prompt.length, passes: 0, ended: "length" };
    if (opts.signal?.aborted) return { promptTokens: prompt.length, passes: 0, ended: "abort" };
    const hit = this.prefixCache.take(prompt, prefillKvTolerance(opts.prefill, opts.prefillTolerance, opts.prefillPasses));
    const seq = hit ? hit.seq : this.createSequence();
    try {
      if (!(await seq.reserveRequest(prompt.length, opts.maxNewTokens, opts.signal))) return { promptTokens: prompt.length, passes: 0, ended: "abort" };
      let passes: number;
      try {
        ({ passes } = await seq.appendTokens(hit ? prompt.slice(hit.reused) : prompt, opts, true));
      } catch (e) {
        if (e instanceof AbortError) return { promptTokens: prompt.length, passes: 0, ended: "abort" };
        throw e;
      }
      forks.forEach((_, i) => {
        if (!closed[i]) forks[i] = seq.fork();
      });
      const open = forks.filter((f): f is Sequence => f !== null);
      if (open.length >= 2) {
        try {
          open[0].refuseForksThatCannotFit(prompt.length, opts.maxNewTokens);
        } catch (e) {
          forks.forEach((f, i) => {
            f?.dispose();
            forks[i] = null;
          });
          throw e;
        }
      }
      return { promptTokens: prompt.length, passes };
    } catch (e) {
      throw saidOfTheModel(e);
    } finally {
      // The forks hold the prompt's pages; its own reservation goes with it.
      seq.dispose();
    }
  }

  /** streamMany()'s stream i: generates on its fork of the shared prefill. */
  private async *forkedRequest(
    i: number,
    prefill: () => Promise<SharedPrefill>,
    forks: (Sequence | null)[],
    options: GenerateOptions | undefined,
    progress: GenerationProgress,
    unwanted: AbortSignal,
  ): AsyncGenerator<StreamChunk, GenerateResult, undefined> {
    // Returned while the shared prefill (or its wait for pages) runs, the stream stops waiting
    // for it at once; the last one returned has stopped the prefill (unwanted) and waits for it
    // to end, as stream()'s return() waits for its own.
    const stopped = new Promise<void>((resolve) => progress.stopSignal.addEventListener("abort", () => resolve(), { once: true }));
    const shared = await Promise.race([prefill(), stopped.then(() => (unwanted.aborted ? prefill() : undefined))]);
    if (shared) progress.promptTokens = shared.promptTokens;
    if (!shared || progress.stopSignal.aborted) return progress.result("abort");
    if (shared.ended) return progress.result(shared.ended);
    const seq = forks[i];
    forks[i] = null;
    if (!seq) throw new DisposedError("the model");  // freed with the model while the prefill ran
    let finished = false;
    try {
      const seed = options?.seed;
      const opts = typeof seed === "number" ? { ...options, seed: forkSeed(seed, i) } : options;
      const result = yield* seq.run(opts, shared.promptTokens, shared.passes, progress);
      finished = true;
      return result;
    } catch (e) {
      throw saidOfTheModel(e);
    } finally {
      // The first completion is kept for prefix reuse, as stream() keeps its sequence.
      if (finished && i === 0 && !this.disposed) {
        this.prefixCache.offer(seq);
        this.admission.pump();
      } else seq.dispose();
    }
  }

  /**
   * Frees the weights and every sequence. Running prefills are cancelled (they reject with
   * DisposedError); the promise settles once they have stopped, at their next pass or token (a
   * later dispose() returns the same promise). Calls after this throw DisposedError.
   */
  dispose(): Promise<void> {
    // A later call settles with the first: only once the prefills it cancelled have stopped.
    this.disposal ??= this.release();
    return this.disposal;
  }

  /** dispose()'s work, done once. */
  private async release(): Promise<void> {
    const stopped = this.engine.cancelAll();
    this.admission.rejectAll(new DisposedError("the model"));
    this.prefixCache.clear();
    this.engine.dispose();
    await stopped;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

