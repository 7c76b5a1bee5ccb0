/**
 * Continuous batching of decode steps: every sequence that wants its next token queues here,
 * and each native step runs all queued sequences as one batch (the weights are read once for
 * all of them). Requests that arrive while a step runs join the next one. On the CPU each row is
 * computed exactly as it would be alone. On the GPU the matrix products of up to 16 rows are
 * too, but the attention cuts long contexts into a number of chunks that depends on the batch
 * size, so a row's logits can differ in the last bits; its greedy tokens are tested to be the
 * same alone and in a batch of 16 (test/gpu).
 *
 * Prompts join the same steps (batched token steps, EngineContext.batchedPrefill): each step
 * also appends the next token of every prompt fed here, as a row that samples nothing. One
 * token of a sequence per step: with a cyclic layer group a token reads the final K/V of the
 * one before, so this is the sequential prefill's arithmetic, shared with the other rows.
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

/** A prompt's tokens going into its sequence one per step. */
interface PromptFeed {
  seq: NativeSequence;
  tokens: readonly number[];
  /** Tokens appended so far. */
  done: number;
  cancel?: Int32Array;
  resolve: () => void;
  reject: (e: unknown) => void;
}

export interface SchedulerStats {
  /** Native decode steps run. */
  steps: number;
  /** Tokens decoded over all steps. */
  tokens: number;
  /** Prompt tokens appended as rows of these steps (batched token steps). */
  promptTokens: number;
  /** The largest batch so far (decode and prompt rows). */
  maxBatch: number;
}

export class DecodeScheduler {
  private queue: DecodeRequest[] = [];
  /** Prompts in turn: those a step ran go to the back. */
  private feeds: PromptFeed[] = [];
  private running = false;
  readonly stats: SchedulerStats = { steps: 0, tokens: 0, promptTokens: 0, maxBatch: 0 };

  constructor(
    private readonly native: () => NativeModel,
    private readonly maxBatch = 256,
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
   * Appends `tokens` to `seq`, one per step as a row of the shared step that samples nothing,
   * and resolves once all are in. Rejects with AbortError once `cancel[0]` is raised (looked at
   * before each step), or with the error of a step that failed for this sequence; the tokens
   * appended before stay in the sequence (the caller rewinds it).
   */
  append(seq: NativeSequence, tokens: readonly number[], cancel?: Int32Array): Promise<void> {
    if (tokens.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.feeds.push({ seq, tokens, done: 0, cancel, resolve, reject });
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

  /** The prompts this step runs: at least one when any waits, else the room decode rows leave. */
  private takeFeeds(): PromptFeed[] {
    this.feeds = this.feeds.filter((f) => {
      if (!f.cancel || Atomics.load(f.cancel, 0) === 0) return true;
      f.reject(new AbortError("the prefill was aborted"));
      return false;
    });
    if (this.feeds.length === 0) return [];
    return this.feeds.splice(0, Math.max(1, this.maxBatch - this.queue.length));
  }

  /** A prompt's token went in: the prompt is done, or waits its next turn. */
  private advance(f: PromptFeed): void {
    this.stats.promptTokens++;
    if (++f.done === f.tokens.length) f.resolve();
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
        for (const r of [...batch, ...feeds]) r.reject(e);
        return;
      }
      try {
        // The sampled rows first: the engine samples as many rows as it is given settings for.
        const out = await model.decodeBatch(
          [...batch.map((r) => r.seq), ...feeds.map((f) => f.seq)],
          Int32Array.from([...batch.map((r) => r.token), ...feeds.map((f) => f.tokens[f.done])]),
          batch.map((r) => r.sampling),
          !batch.some((r) => r.last),
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
          (batch[0] ?? feeds[0]).reject(fromNative(e));
        } else {
          for (const r of batch) {
            try {
              const out = await model.decodeBatch([r.seq], Int32Array.of(r.token), [r.sampling]);
              this.stats.steps++;
              this.stats.tokens++;
              r.resolve(decoded(out, 0));
            } catch (e2) {
              r.reject(fromNative(e2));
            }
          }
          for (const f of feeds) {
            try {
              await model.decodeBatch([f.seq], Int32Array.of(f.tokens[f.done]), []);
              this.stats.steps++;
              this.advance(f);
            } catch (e2) {
              f.reject(fromNative(e2));
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

function decoded(out: NativeDecodedTokens, row: number): DecodedToken {
  const lp = out.logprobs?.[row];
  return lp ? { token: out[row], logprobs: lp } : { token: out[row] };
}
