/**
 * EngineContext: what a model's sequences share with it. The native model handle and the
 * native sequences alive on it, the K/V admission queue, the decode scheduler, the context
 * limit, the tokenizer and the generation defaults. Model builds one and hands it to every
 * Sequence it makes, so that a sequence reaches the engine without depending on Model (and the
 * modules do not import each other).
 */
import { setMaxListeners } from "node:events";
import { Admission, AdmissionOptions, KV_PAGE_TOKENS } from "./admission";
import type { ModelConfig } from "./config";
import { generationTokenIds } from "./generation-config";
import type { KvCacheDtype } from "./kv-cache-dtype";
import { AbortError, ContextOverflowError, DisposedError, fromNative, InvalidInputError, InvalidOptionError, TokenOutOfRangeError } from "./errors";
import type { NativeModel, NativeSequence } from "./native";
import { describe, GenerateOptions, GenerationDefaults, ResolvedGenerateOptions, resolveGenerateOptions } from "./options";
import { refuseUnusedPrefillOptions, ResolvedPrefill, withCancel } from "./prefill-options";
import { DecodeScheduler } from "./scheduler";
import type { ChatMessage, Tokenizer } from "./tokenizer";

/**
 * Requests in flight besides a prompt's own (others prefilling or generating) from which a
 * prompt whose mode the caller left to the model goes as batched token steps (throughput mode)
 * rather than in the device's default mode (latency mode). Each device's number must come from
 * measurement (scripts/bench/batched-prefill.js):
 * - cpu: the default mode is sequential, token by token either way, and a step of several rows
 *   reads each weight row once for all of them, their sums interleaved: batched token steps win
 *   from two requests on. Measured with the default model, 200-token prompts, 2 threads (a
 *   shared 2-core machine, 2026-12-06): 1.18x the prompt tokens/s of the same prompts one after
 *   another for 2 prompts, 1.47-1.53x for 4 to 16. (A sequential prompt batches from one other
 *   request on, whatever the device.)
 * - cuda: the default is fixed-point, a few passes of large products over a whole chunk, meant to
 *   beat token steps for a lone prompt. Measured on an H100 (2026-12-06, batched-prefill.js, LCKV
 *   w=2 TinyLlama shape, random bf16 weights, 256-token prompts): 1 prompt 849 tok/s batched or
 *   sequential, 598 fixed-point (random weights do not converge: 64 passes, then token steps);
 *   2 prompts 1559 batched; 4: 3059; 8: 5807; 32: 9097. With the default model's trained weights
 *   and a bf16 cache the fixed point also took 64 passes for 248 tokens (78 ms, against 65 ms
 *   token by token). Batched steps win from two prompts, but 16 stands: with bf16 weights a
 *   prompt of more than 16 tokens prefilled alone runs its products through cuBLASLt on bf16
 *   activations, and as batched token steps through the f32 GEMV, so its greedy tokens can
 *   differ between the two (the GPU's batch-invariance test failed with 1). That has to be made
 *   consistent before the threshold can follow the measurement. The threshold counts requests,
 *   not rows: with the default maxBatch (DEFAULT_MAX_BATCH, 256) a prompt that switches shares
 *   its steps with its 16 or more others, so those steps mostly have more than 16 rows and take
 *   cuBLASLt as well; below the threshold a model with a cyclic group runs no step of more than
 *   16 rows whatever maxBatch, so up to 16 concurrent requests keep the batch invariance of
 *   `maxBatch: 16`. With `maxBatch: 16` a switched prompt takes the seats the decode rows leave
 *   (at least one a step).
 */
export const THROUGHPUT_PREFILL_MIN_OTHERS: Readonly<Record<"cpu" | "cuda", number>> = { cpu: 1, cuda: 16 };

/** What Model hands to its engine context. */
export interface EngineContextInit {
  native: NativeModel;
  /** The model directory (named in errors). */
  directory: string;
  config: ModelConfig;
  tokenizer: Tokenizer | undefined;
  generationConfig: Record<string, unknown>;
  /** Tokens one sequence may hold. */
  maxContext: number;
  admission: AdmissionOptions;
  /** Drops the least recently used prefix-cache entry; false when there is none. */
  evictCached: () => boolean;
  /** Sequences one decode step may run. */
  maxBatch: number;
  /** The backend the model runs on: it picks the default prefill mode and chunk. */
  device: "cpu" | "cuda";
  /** The K/V cache's type (an int4 cache cuts mixed steps' chunks at its pages). */
  kvCacheDtype: KvCacheDtype;
}

/** Throws TokenOutOfRangeError naming the first of `ids` that is not an integer in [0, vocabSize). */
export function refuseTokenIdsOutsideVocabulary(ids: ArrayLike<number>, vocabSize: number, what: string): void {
  for (let i = 0; i < ids.length; i++) {
    const t = ids[i];
    // A fraction or NaN is no id at all, whatever its value: said so, not "outside" a range it may lie in.
    if (!Number.isInteger(t)) {
      throw new TokenOutOfRangeError(`${what} token ${i} is ${describe(t)}, not an integer: token ids are integers in [0, ${vocabSize})`);
    }
    if (t < 0 || t >= vocabSize) throw new TokenOutOfRangeError(`${what} token ${i} is ${describe(t)}, outside the vocabulary [0, ${vocabSize})`);
  }
}

export class EngineContext {
  private native: NativeModel | null;
  /** Native sequences alive on the model (the model's dispose() frees what is left). */
  readonly live = new Set<NativeSequence>();
  /** Batches the decode steps of concurrent generations. */
  readonly scheduler: DecodeScheduler;
  /** Reserves K/V pages for requests, queueing them while the pool is short. */
  readonly admission: Admission;
  readonly directory: string;
  readonly config: ModelConfig;
  readonly tokenizer: Tokenizer | undefined;
  readonly generationConfig: Record<string, unknown>;
  readonly maxContext: number;
  /**
   * Tokens of a prompt per chunk while other requests are in flight, so that a running stream
   * waits at most one chunk for its next token. The CPU prefills about 500 tokens of the default
   * model a second, so 64 tokens keep that wait near 0.1 s; a GPU takes 512 in a few
   * milliseconds. A model without a cyclic group runs its chunks inside the scheduler's steps
   * (mixedPrefill()), and this is also the prompt rows one such step takes in all: a step runs
   * its decode rows plus at most one chunk, so mixing keeps the wait where the chunks between
   * decode steps put it, and the step's activations where one chunk's prefill puts them, however
   * many prompts arrive (they take turns at the chunk). While every request in flight is such a
   * prompt, nothing waits for a token, and a step takes up to lonePrefillChunk rows instead.
   */
  readonly prefillChunk: number;
  /**
   * Tokens per native prefill call while no other request is in flight: nothing waits between
   * chunks then, so a GPU takes the prompt in larger pieces (a quarter of the launches at 2048
   * tokens, larger products, and four times the attention blocks to fill the GPU with). Bounded
   * so that one call's activations stay a few hundred MB. The CPU keeps its chunk: a request
   * that arrives meanwhile waits for the chunk in progress. Also the size of the pieces a prompt
   * hands to mixed steps, which the scheduler cuts to each step's budget (lib/sequence.ts).
   */
  readonly lonePrefillChunk: number;
  /**
   * An int4 cache's page (0 for the other types): a mixed step's chunk of a prompt ends at the
   * page its sequence is writing. int4 keeps that page in bf16 (its residual) until the page is
   * full, then scales its keys per channel over it, so the engine's K/V write and attention
   * take a sequence's rows of one call in one page (native prefill goes a page at a time too),
   * and Model::decodeBatch refuses rows that cross one. Cutting the chunk here keeps int4
   * prompts mixing with the decode rows, a page per step, instead of leaving them out.
   */
  readonly chunkPage: number;
  private readonly device: "cpu" | "cuda";
  private prefilled = 0;
  /** Requests prefilling or generating now (see working()). */
  private inFlight = 0;

  /** Requests prefilling or generating now (working()): admitted, not waiting for pages. */
  get running(): number {
    return this.inFlight;
  }
  /** Raised by the model's dispose(): running prefills stop at their next pass or token. */
  private readonly disposing = new AbortController();
  /** Native prefill calls in flight, which dispose() waits out after cancelling them. */
  private readonly inflight = new Set<Promise<unknown>>();

  constructor(init: EngineContextInit) {
    this.admission = new Admission(() => this.nativeModel(), init.evictCached, init.admission, () => this.running > 0);
    this.native = init.native;
    this.directory = init.directory;
    this.config = init.config;
    this.tokenizer = init.tokenizer;
    this.generationConfig = init.generationConfig;
    this.maxContext = init.maxContext;
    this.device = init.device;
    this.prefillChunk = init.device === "cpu" ? 64 : 512;
    this.lonePrefillChunk = init.device === "cpu" ? 64 : 4096;
    this.chunkPage = init.kvCacheDtype === "int4" ? KV_PAGE_TOKENS : 0;
    // Every prefill in flight listens to it: as many as there are concurrent requests.
    setMaxListeners(0, this.disposing.signal);
    this.scheduler = new DecodeScheduler(() => this.nativeModel(), init.maxBatch, this.prefillChunk, this.chunkPage, this.lonePrefillChunk, () => this.inFlight);
  }

  get disposed(): boolean {
    return this.native === null;
  }

  /** The native model; DisposedError once the model is disposed. */
  nativeModel(): NativeModel {
    if (!this.native) throw new DisposedError("the model");
    return this.native;
  }

  /** Token ids that end generation: generation_config's eos_token_id, else config's, else the tokenizer's. */
  get eosTokenIds(): number[] {
    const fromGen = generationTokenIds(this.generationConfig, "eos_token_id");
    if (fromGen.length) return fromGen;
    if (this.config.eosTokenIds.length) return this.config.eosTokenIds;
    return this.tokenizer?.eosTokenId !== undefined ? [this.tokenizer.eosTokenId] : [];
  }

  /**
   * Text -> ids via the tokenizer; ids are checked against the vocabulary and the context. Text
   * that starts a sequence gets the tokenizer's special tokens (BOS); text appended to a
   * sequence that already holds tokens does not, so a later turn adds only its own text.
   */
  toTokenIds(input: string | readonly number[], what = "prompt", alreadyInContext = 0): number[] {
    let ids: number[];
    if (typeof input === "string") {
      if (!this.tokenizer) throw new InvalidInputError(`${this.directory} has no tokenizer.json: pass token ids instead of text`, "LCKV_NO_TOKENIZER");
      this.refuseTextFarPastContext(input, what, alreadyInContext);
      ids = this.tokenizer.encode(input, { addSpecialTokens: alreadyInContext === 0 });
    } else if (Array.isArray(input) || ArrayBuffer.isView(input)) {
      ids = Array.from(input as ArrayLike<number>);
    } else {
      throw new InvalidInputError(`${what} must be a string or an array of token ids, got ${describe(input)}`);
    }
    refuseTokenIdsOutsideVocabulary(ids, this.config.vocabSize, what);
    if (ids.length === 0) throw new InvalidInputError(`${what} is empty`, "LCKV_EMPTY_PROMPT");
    if (alreadyInContext + ids.length > this.maxContext) {
      throw alreadyInContext > 0
        ? new ContextOverflowError(`${what} has ${ids.length} tokens; with the ${alreadyInContext} already in the sequence that is more than the context holds (${this.maxContext})`)
        : new ContextOverflowError(`${what} has ${ids.length} tokens but the context holds ${this.maxContext}`, { count: ids.length, atLeast: false });
    }
    return ids;
  }

  /**
   * Whether `tokens` leave a generation no room for another: without a context shift, prompt and
   * completion fit in the context together (vLLM's max_model_len); with "sink-window" the shift
   * makes room.
   */
  fillsContext(tokens: number, opts: ResolvedGenerateOptions): boolean {
    return opts.contextShift !== "sink-window" && tokens >= this.maxContext;
  }

  /**
   * A new request whose prompt fills the context (fillsContext) is refused before any work, as
   * vLLM refuses a prompt of max_model_len tokens, rather than prefilled for an empty reply.
   */
  refuseFullContext(promptTokens: number, opts: ResolvedGenerateOptions, what: string): void {
    if (opts.maxNewTokens > 0 && this.fillsContext(promptTokens, opts)) {
      throw new ContextOverflowError(`${what} has ${promptTokens} tokens and the context holds ${this.maxContext}: that leaves no room for a reply`);
    }
  }

  /**
   * A chat's prompt: the messages through the chat template, ready for the reply, checked as
   * toTokenIds checks text (a rendered conversation far past the context is refused before it is
   * tokenized whole).
   */
  chatTokenIds(messages: readonly ChatMessage[], what: string): number[] {
    if (!this.tokenizer) throw new InvalidInputError(`${this.directory} has no tokenizer.json`, "LCKV_NO_TOKENIZER");
    // Rendering is on the event loop and grows with the messages (some 2 s for 280,000 empty
    // ones, a body under the server's limit). A template renders messages in order, so the first
    // 2 x maxContext render to a prefix of the whole: one far past the context refuses the whole
    // unrendered. (A template with no markup around messages may leave that prefix short; the
    // whole is then rendered and checked below.)
    const headMessages = 2 * this.maxContext;
    if (Array.isArray(messages) && messages.length > headMessages) {
      let head: string | undefined;
      try {
        head = this.tokenizer.applyChatTemplate(messages.slice(0, headMessages), { addGenerationPrompt: false });
      } catch {
        head = undefined;  // a template that refuses a prefix (its last role, say) is left to the whole's check
      }
      if (head !== undefined) {
        this.refuseTextFarPastContext(head, what, 0);
        const inHead = this.tokenizer.encode(head, { addSpecialTokens: false }).length;
        if (inHead > this.maxContext) {
          const message = `${what} has more than ${this.maxContext} tokens (${inHead} in its first ${headMessages} of ${messages.length} messages), but the context holds ${this.maxContext}`;
          throw new ContextOverflowError(message, { count: inHead, atLeast: true });
        }
      }
    }
    const text = this.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true });
    this.refuseTextFarPastContext(text, what, 0);
    // The template holds any BOS itself, so no special tokens are added again.
    return this.toTokenIds(this.tokenizer.encode(text, { addSpecialTokens: false }), what);
  }

  /**
   * A text far longer than the context is refused from a prefix: tokenizing all of it (a body of
   * megabytes, on the event loop) would hold up every other request for seconds. Prefixes of 4,
   * then 16 characters a token of the room are tried, each ending before a whitespace character
   * (where pre-tokenizers split), so that the prefix's tokens are the text's first ones but for a
   * few near the cut (a split special token, a whitespace run): a prefix over the room by
   * CUT_SLACK proves the text over it. A text under twice the prefix is tokenized whole anyway.
   */
  private refuseTextFarPastContext(text: string, what: string, alreadyInContext: number): void {
    const CUT_SLACK = 8;
    const room = this.maxContext - alreadyInContext;
    for (const charsPerToken of [4, 16]) {
      const window = (room + CUT_SLACK) * charsPerToken;
      if (text.length <= 2 * window) return;
      const from = Math.max(0, window - 1024);
      const space = text.slice(from, window).search(/\s\S*$/);
      const cut = space > 0 ? from + space : window;
      const inPrefix = this.tokenizer!.encode(text.slice(0, cut), { addSpecialTokens: false }).length;
      if (inPrefix >= room + CUT_SLACK) {
        throw new ContextOverflowError(
          `${what} has more than ${room} tokens (${inPrefix} in its first ${cut} of ${text.length} characters), ` +
            (alreadyInContext > 0 ? `more than the context (${this.maxContext}) holds with the ${alreadyInContext} already in the sequence` : `but the context holds ${this.maxContext}`),
          alreadyInContext > 0 ? undefined : { count: inPrefix, atLeast: true },
        );
      }
    }
  }

  /**
   * Runs a native prefill call that `signal` or the model's dispose() cancels (the engine stops
   * between passes and tokens). Cancelled by dispose(), or begun on a sequence dispose() freed,
   * it rejects with DisposedError naming the model (the sequence may be the call's own, as
   * forward()'s is, which the caller never had).
   */
  runCancellable<T>(signal: AbortSignal | undefined, call: (cancel?: Int32Array) => Promise<T>): Promise<T> {
    const p = withCancel([signal, this.disposing.signal], call).catch((e: unknown) => {
      throw this.disposing.signal.aborted && (e instanceof AbortError || e instanceof DisposedError) ? new DisposedError("the model") : e;
    });
    this.inflight.add(p);
    const done = () => this.inflight.delete(p);
    p.then(done, done);
    return p;
  }

  /**
   * Cancels every running prefill and refuses new calls; the returned promise settles once the
   * cancelled calls have returned (each stops at its next pass or token).
   */
  cancelAll(): Promise<unknown> {
    this.disposing.abort();
    return Promise.allSettled([...this.inflight]);
  }

  /** A new native sequence of the full context, counted as live. */
  openSequence(): NativeSequence {
    try {
      const s = this.nativeModel().createSequence(this.maxContext);
      this.live.add(s);
      return s;
    } catch (e) {
      throw fromNative(e);
    }
  }

  /** Counts a native sequence made elsewhere (a fork) as live. */
  adopt(s: NativeSequence): void {
    this.live.add(s);
  }

  /** Frees a live native sequence. */
  closeSequence(s: NativeSequence): void {
    this.live.delete(s);
    this.admission.rejectWaiting(s, new DisposedError("the sequence"));
    s.dispose();
    if (this.native) this.admission.pump();  // its pages may let a waiting request in
  }

  /**
   * generate()'s options resolved against this model's defaults, with the checks that need the
   * model: before any work, so that a request that cannot go on fails at once. `stop`: the
   * stream's own stop signal (GenerationProgress.stopSignal), which ends the generation as the
   * caller's signal does.
   */
  resolveGenerate(options: GenerateOptions | undefined, contextTokens: number, stop?: AbortSignal): ResolvedGenerateOptions {
    const opts = resolveGenerateOptions(options, this.generationDefaults(contextTokens));
    refuseUnusedPrefillOptions(this, options);
    if (stop) opts.signal = opts.signal ? AbortSignal.any([opts.signal, stop]) : stop;
    const outside = opts.logitBias?.tokens.find((t) => t >= this.config.vocabSize);
    if (outside !== undefined) {
      throw new InvalidOptionError("logitBias", `token ${outside} is outside the vocabulary [0, ${this.config.vocabSize})`);
    }
    if (opts.contextShift === "sink-window" && this.config.plan.window.every((w) => w > 0)) {
      throw new InvalidOptionError("contextShift", "every layer of this model attends through a sliding window, which already bounds its memory: generate without contextShift");
    }
    if (options?.sinkTokens !== undefined && opts.contextShift !== "sink-window") {
      throw new InvalidOptionError("sinkTokens", 'applies to contextShift "sink-window" only');
    }
    // A shift keeps the sink (whole pages) and drops at least a page: with no page left to drop,
    // the generation would end at the context as if there were no shift.
    const sink = Math.ceil(opts.sinkTokens / KV_PAGE_TOKENS) * KV_PAGE_TOKENS;
    if (opts.contextShift === "sink-window" && sink + KV_PAGE_TOKENS > this.maxContext) {
      // Named by what the caller gave: the sink it asked for, or the shift with the default sink.
      const leaves = `leaves no page to drop in a context of ${this.maxContext}`;
      if (options?.sinkTokens === undefined)
        throw new InvalidOptionError("contextShift", `"sink-window" keeps a sink of ${sink} tokens (the default, whole pages of ${KV_PAGE_TOKENS}), which ${leaves}`);
      throw new InvalidOptionError("sinkTokens", `keeps ${sink} tokens (whole pages of ${KV_PAGE_TOKENS}), which ${leaves}: at most ${this.maxContext - KV_PAGE_TOKENS}`);
    }
    return opts;
  }

  /** Generation defaults from generation_config.json and the config. */
  generationDefaults(contextTokens = 0): GenerationDefaults {
    const g = this.generationConfig;
    const num = (k: string, d: number) => (typeof g[k] === "number" && Number.isFinite(g[k] as number) ? (g[k] as number) : d);
    // As in transformers: do_sample picks greedy or the configured temperature, and the filters
    // (top_k, top_p, min_p) apply whenever sampling does, also when a caller turns it on.
    const sample = g.do_sample === true;
    // max_new_tokens; else what max_length (which counts the tokens already there) leaves; else 256.
    const maxNewTokens = Number.isInteger(g.max_new_tokens)
      ? (g.max_new_tokens as number)
      : Number.isInteger(g.max_length)
        ? Math.max(0, (g.max_length as number) - contextTokens)
        : 256;
    return {
      maxNewTokens,
      temperature: sample ? num("temperature", 1) : 0,
      topK: num("top_k", 0),
      topP: num("top_p", 1),
      minP: num("min_p", 0),
      repetitionPenalty: num("repetition_penalty", 1),
      // The fastest exact mode: on the CPU, token by token costs one pass of work where the
      // fixed point needs tens (250 tokens of the default model: 0.48 s against 5.7 s, 27
      // passes); on the GPU a pass over the whole prompt is a few large products, far cheaper
      // than as many steps as there are tokens.
      prefill: this.config.useSequential || this.device === "cpu" ? "sequential" : "fixed-point",
      prefillPasses: this.config.forwardPasses + this.config.backwardPasses,
    };
  }

  /**
   * Counts a request as prefilling or generating until the returned function is called: the
   * rows in flight that batchedPrefill() weighs.
   */
  working(): () => void {
    this.inFlight++;
    let done = false;
    return () => {
      if (!done) this.inFlight--;
      done = true;
      // The last request in flight has ended: one still waiting now waits for the caller.
      if (this.inFlight === 0 && !this.disposed) this.admission.warnIfStalledSoon();
    };
  }

  /** Tokens the next native prefill call of a prompt takes: the lone chunk unless other requests are in flight (working()). */
  prefillChunkNow(): number {
    return this.inFlight > 1 ? this.prefillChunk : this.lonePrefillChunk;
  }

  /** Whether batchedPrefill() or mixedPrefill() can say yes to this prefill, given other requests in flight. */
  mayBatchPrefill(prefill: ResolvedPrefill): boolean {
    return this.config.plan.cyclicGroup === null || prefill.auto || prefill.mode === "sequential";
  }

  /**
   * Whether a prompt's next chunk goes into the scheduler's shared steps as rows beside the
   * decode rows (a mixed step: the weights read once for both) instead of a native prefill call
   * between the decode steps. Only for a model without a cyclic group, where one pass over a
   * chunk is exact in every prefill mode, so the mode does not matter; and only while other
   * requests are in flight (working(), the prompt's own included), as batchedPrefill() counts
   * them. A lone prompt keeps its native calls of the lone chunk: nothing waits for it, so it
   * takes the larger calls (fewer launches, larger products).
   */
  mixedPrefill(): boolean {
    return this.config.plan.cyclicGroup === null && this.inFlight > 1;
  }

  /**
   * Whether a prompt's next chunk goes as batched token steps (its tokens one per step, rows of
   * the scheduler's shared step) instead of a native prefill call. Only for a model with a
   * cyclic group (without one a whole chunk is exact in one pass), and only while other
   * requests are in flight (working()), the prompt's own included in the count. Sequential mode
   * is token by token either way, so any other request is enough; the model's default mode
   * switches at the device's measured threshold; fixed-point and iterative, when asked for,
   * never switch.
   *
   * Requests waiting in the admission queue for K/V pages do not count. Batched steps pay off
   * through the rows that share them, and a waiting request adds none until it is admitted;
   * it waits for pages that only a running request's end frees, which a slower mode for this
   * prompt (token steps where the GPU's default would take a few passes) would only delay. Each
   * chunk decides anew, so the chunks after a waiting request's admission see it. And admission
   * is no gap: an admitted request goes on to its prefill's working() within the same turn of
   * the event loop, and that prefill yields a turn before its first chunk decides, so prompts
   * admitted together count each other. A generation's decode rows count from its first step
   * to its last (run() holds working() throughout).
   */
  batchedPrefill(prefill: ResolvedPrefill): boolean {
    if (this.config.plan.cyclicGroup === null || !this.mayBatchPrefill(prefill)) return false;
    const others = this.inFlight - 1;
    if (prefill.mode === "sequential" && others >= 1) return true;
    return prefill.auto && others >= THROUGHPUT_PREFILL_MIN_OTHERS[this.device];
  }

  /** Tokens run through a prefill so far. */
  get prefilledTokens(): number {
    return this.prefilled;
  }

  /** Counts tokens run through a prefill. */
  countPrefilled(n: number): void {
    this.prefilled += n;
  }

  /** Frees every live sequence, then the native model. Calls after this throw DisposedError. */
  dispose(): void {
    if (!this.native) return;
    for (const s of this.live) s.dispose();
    this.live.clear();
    this.native.dispose();
    this.native = null;
  }
}
