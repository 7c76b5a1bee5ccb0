/**
 * Continuous batching of decode steps: every sequence that wants its next token queues here,
 * and each native step runs up to maxBatch of them as one batch (the weights are read once for
 * all of them). Requests that arrive while a step runs join the next one. On the CPU each row is
 * computed exactly as it would be alone. On the GPU the matrix products of up to 16 rows are
 * too, but the attention cuts long contexts into a number of chunks that depends on the batch
 * size, so a row's logits can differ in the last bits; its greedy tokens are tested to be the
 * same alone and in a batch of 16 (test/gpu). Above 16 rows bf16 weights take cuBLASLt, whose
 * results depend on the batch (DEFAULT_MAX_BATCH says what that trades for).
 *
 * Prompts join the same steps, as rows that sample nothing, in one of two ways:
 * - token steps (EngineContext.batchedPrefill, a model with a cyclic layer group): each step
 *   appends the next token of every prompt fed here. One token of a sequence per step: a token
 *   reads the final K/V of the one before, so this is the sequential prefill's arithmetic,
 *   shared with the other rows.
 * - chunks (EngineContext.mixedPrefill, a model without one): a step appends up to `chunkRows`
 *   prompt tokens in all, several of one prompt at consecutive positions, beside the decode rows
 *   (a mixed step, vLLM's chunked prefill). One pass over a chunk is exact there, so the
 *   weights are read once for the chunk and the decode rows, and a running stream waits at
 *   most one chunk for its next token, as it did between the chunks of a native prefill.
 *   While every request in flight is a prompt fed here (none is generating, so none waits for
 *   a token), a step takes up to `loneChunkRows` instead: the chunk a lone prompt's native
 *   prefill takes, larger products for the same prompts. Prompts take turns at the budget: a
 *   prompt cut short goes to the back. An int4 cache's chunk ends at its sequence's page
 *   (chunkPage).
 */
import { AbortError, fromNative } from "./errors";
import { NativeDecodedTokens, NativeModel, NativeSamplingParams, NativeSequence, NativeTokenLogprobs } from "./native";

/** A decode step's token for one sequence, and its log-probabilities when the sampling asked. */
export interface DecodedToken {
  token: number;
  logprobs?: NativeTokenLogprobs;
}

interface DecodeRequest {
  seq: NativeSequence;
  token: number;
  sampling: NativeSamplingParams;
  /** The caller will not ask for the step after this one (its generation ends here). */
  last: boolean;
  resolve: (decoded: DecodedToken) => void;
  reject: (e: unknown) => void;
}

/** A prompt's tokens going into its sequence as rows of the shared steps. */
interface PromptFeed {
  seq: NativeSequence;
  tokens: readonly number[];
  /** Tokens appended so far. */
  done: number;
  /** Several tokens per step (a chunk), else one. */
  chunked: boolean;
  cancel?: Int32Array;
  resolve: () => void;
  reject: (e: unknown) => void;
}

/** A prompt's rows in one step: its next `rows` tokens. */
interface FeedRows {
  feed: PromptFeed;
  rows: number;
}

export interface SchedulerStats {
  /** Native decode steps run. */
  steps: number;
  /** Tokens decoded over all steps. */
  tokens: number;
  /** Prompt tokens appended as rows of these steps (token steps and chunks). */
  promptTokens: number;
  /** The most sequences one step has run so far (decoding and prompts). */
  maxBatch: number;
}

/**
 * Sequences one step runs when loadModel is not given maxBatch, on every device: the default
 * favours throughput. On the GPU a step of up to 16 rows runs its matrix products through the
 * hand-written GEMVs on f32 activations; above 16 rows bf16 weights (the GPU's default) go
 * through cuBLASLt on bf16 activations, whose results depend on the batch, so a sequence's
 * logits can change in the last bits with the batch it runs in, and a greedy token with them
 * where two are that close. `maxBatch: 16` keeps decode steps on the GEMVs, the batch invariance
 * that test/gpu checks (a sequence's greedy tokens the same alone and in a batch; a step that
 * carries a prompt's chunk has more rows whatever maxBatch). What larger steps buy, measured on
 * an H100 80GB HBM3, TinyLlama-shaped models: decode at batch 64 and 2048 tokens of context takes
 * 2.91 ms a step (22k tok/s; 64 sequences of their own, bf16 K/V, 2026-12-07) in steps of 64
 * rows, where 64 streams at maxBatch 16 take 4 steps of 16 rows per token; LCKV w=2 batched
 * token steps of 64 prompts of 2048 tokens ran at 31.2k-31.9k prompt tokens/s at 64 rows a step,
 * against 8.5k tok/s in an earlier measurement at 16 rows a step (2026-12-06). The CPU computes
 * each row as it would alone at any batch size.
 */
export const DEFAULT_MAX_BATCH = 256;

export class DecodeScheduler {
  private queue: DecodeRequest[] = [];
  /** Prompts in turn: those a step ran go to the back. */
  private feeds: PromptFeed[] = [];
  private running = false;
  readonly stats: SchedulerStats = { steps: 0, tokens: 0, promptTokens: 0, maxBatch: 0 };

  /**
   * maxBatch: sequences per step. chunkRows: prompt rows per step in all, for chunked feeds;
   * a step runs at most its decode rows plus this many (EngineContext.prefillChunk says why).
   * chunkPage: the K/V page's tokens where a chunk's rows must lie in one page of their sequence
   * (an int4 cache: EngineContext.chunkPage says why), else 0. loneChunkRows: the budget while
   * no decode row waits and every one of `requestsInFlight()` requests (EngineContext.working())
   * has a prompt here; without those, chunkRows always.
   */
  constructor(
    private readonly native: () => NativeModel,
    private readonly maxBatch = DEFAULT_MAX_BATCH,
    private readonly chunkRows = 64,
    private readonly chunkPage = 0,
    private readonly loneChunkRows = chunkRows,
    private readonly requestsInFlight: () => number = () => Infinity,
  ) {}

  /**
   * Appends `token` to `seq`, and resolves with the token sampled after it. `last`: the caller
   * will not continue the sequence after this step, so the GPU need not run the next one ahead.
   */
  decode(seq: NativeSequence, token: number, sampling: NativeSamplingParams, last = false): Promise<DecodedToken> {
    return new Promise((resolve, reject) => {
      this.queue.push({ seq, token, sampling, last, resolve, reject });
      this.kick();
    });
  }

  /**
   * Appends `tokens` to `seq` as rows of the shared steps that sample nothing, one per step, or
   * with `chunked` (a model without a cyclic layer group only) as many per step as the chunk
   * budget leaves (and, with chunkPage, the sequence's page), and resolves once all are in.
   * Rejects with AbortError once `cancel[0]` is raised (looked at before each step), or with the
   * error of a step that failed for this sequence; the tokens appended before stay in the
   * sequence (the caller rewinds it).
   */
  append(seq: NativeSequence, tokens: readonly number[], cancel?: Int32Array, chunked = false): Promise<void> {
    if (tokens.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.feeds.push({ seq, tokens, done: 0, chunked, cancel, resolve, reject });
      this.kick();
    });
  }

  private kick(): void {
    if (this.running || (this.queue.length === 0 && this.feeds.length === 0)) return;
    this.running = true;
    // Yield once so that requests made in the same turn of the event loop join this step.
    setImmediate(() => {
      void this.step();
    });
  }

  /**
   * The prompts this step runs, in turn: as many as the decode rows leave room for, at least one
   * when any waits. A token-step prompt runs one row; chunked prompts share chunkRows rows,
   * each at most to the end of its sequence's page where chunkPage asks.
   */
  private takeFeeds(): FeedRows[] {
    this.feeds = this.feeds.filter((f) => {
      if (!f.cancel || Atomics.load(f.cancel, 0) === 0) return true;
      f.reject(new AbortError("the prefill was aborted"));
      return false;
    });
    const seats = Math.max(1, this.maxBatch - this.queue.length);
    // A request in flight without a prompt here is generating (its next decode row may be about
    // to queue) or between two chunks: either way the budget stays one chunk, so that a stream
    // waits at most that many prompt rows for its next token.
    const onlyPrompts = this.queue.length === 0 && this.requestsInFlight() <= this.feeds.length;
    let budget = onlyPrompts ? this.loneChunkRows : this.chunkRows;
    const taken: FeedRows[] = [];
    const waiting: PromptFeed[] = [];
    for (const f of this.feeds) {
      const rows = f.chunked ? Math.min(f.tokens.length - f.done, budget, this.pageRowsLeft(f.seq)) : 1;
      if (taken.length >= seats || rows === 0) {
        waiting.push(f);
        continue;
      }
      taken.push({ feed: f, rows });
      if (f.chunked) budget -= rows;
    }
    this.feeds = waiting;
    return taken;
  }

  /** The rows a chunk of `seq` may take before its page ends (chunkPage), unbounded without one. */
  private pageRowsLeft(seq: NativeSequence): number {
    return this.chunkPage > 0 ? this.chunkPage - (seq.length % this.chunkPage) : Infinity;
  }

  /** A prompt's rows went in: the prompt is done, or waits its next turn. */
  private advance({ feed: f, rows }: FeedRows): void {
    this.stats.promptTokens += rows;
    f.done += rows;
    if (f.done === f.tokens.length) f.resolve();
    else this.feeds.push(f);
  }

  private async step(): Promise<void> {
    const feeds = this.takeFeeds();
    const batch = this.queue.splice(0, this.maxBatch - feeds.length);
    try {
      if (batch.length + feeds.length === 0) return;
      let model: NativeModel;
      try {
        model = this.native();
      } catch (e) {
        for (const r of [...batch, ...feeds.map((f) => f.feed)]) r.reject(e);
        return;
      }
      try {
        // The sampled rows first: the engine samples as many rows as it is given settings for.
        const out = await model.decodeBatch(
          [...batch.map((r) => r.seq), ...feeds.map((f) => f.feed.seq)],
          Int32Array.from([...batch.map((r) => r.token), ...feeds.flatMap(feedTokens)]),
          batch.map((r) => r.sampling),
          !batch.some((r) => r.last),
          rowCounts(batch.length, feeds),
        );
        this.stats.steps++;
        this.stats.tokens += batch.length;
        this.stats.maxBatch = Math.max(this.stats.maxBatch, batch.length + feeds.length);
        batch.forEach((r, i) => r.resolve(decoded(out, i)));
        for (const f of feeds) this.advance(f);
      } catch (e) {
        // A batch fails as a whole (nothing changed); run each row alone so that only the one
        // at fault (a disposed or full sequence, say) sees an error.
        if (batch.length + feeds.length === 1) {
          (batch[0] ?? feeds[0].feed).reject(fromNative(e));
        } else {
          for (const r of batch) {
            try {
              const out = await model.decodeBatch([r.seq], Int32Array.of(r.token), [r.sampling], !r.last);
              this.stats.steps++;
              this.stats.tokens++;
              r.resolve(decoded(out, 0));
            } catch (e2) {
              r.reject(fromNative(e2));
            }
          }
          for (const f of feeds) {
            try {
              await model.decodeBatch([f.feed.seq], Int32Array.from(feedTokens(f)), [], false, rowCounts(0, [f]));
              this.stats.steps++;
              this.advance(f);
            } catch (e2) {
              f.feed.reject(fromNative(e2));
            }
          }
        }
      }
    } finally {
      this.running = false;
      this.kick();
    }
  }
}

/** The tokens a prompt's rows append in this step. */
function feedTokens({ feed: f, rows }: FeedRows): readonly number[] {
  return f.tokens.slice(f.done, f.done + rows);
}

/** decodeBatch()'s rows per sequence: one per decode row, then each prompt's; undefined when all are one. */
function rowCounts(decodeRows: number, feeds: readonly FeedRows[]): Int32Array | undefined {
  if (feeds.every((f) => f.rows === 1)) return undefined;
  return Int32Array.from([...new Array<number>(decodeRows).fill(1), ...feeds.map((f) => f.rows)]);
}

function decoded(out: NativeDecodedTokens, row: number): DecodedToken {
  const lp = out.logprobs?.[row];
  return lp ? { token: out[row], logprobs: lp } : { token: out[row] };
}
