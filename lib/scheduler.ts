/**
 * Continuous batching of decode steps: every sequence that wants its next token queues here,
 * and each native step runs all queued sequences as one batch (the weights are read once for
 * all of them). Requests that arrive while a step runs join the next one. On the CPU each row is
 * computed exactly as it would be alone. On the GPU the matrix products of up to 16 rows are
 * too, but the attention cuts long contexts into a number of chunks that depends on the batch
 * size, so a row's logits can differ in the last bits; its greedy tokens are tested to be the
 * same alone and in a batch of 16 (test/gpu).
 */
import { fromNative } from "./errors";
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

export interface SchedulerStats {
  /** Native decode steps run. */
  steps: number;
  /** Tokens decoded over all steps. */
  tokens: number;
  /** The largest batch so far. */
  maxBatch: number;
}

export class DecodeScheduler {
  private queue: DecodeRequest[] = [];
  private running = false;
  readonly stats: SchedulerStats = { steps: 0, tokens: 0, maxBatch: 0 };

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

  private kick(): void {
    if (this.running || this.queue.length === 0) return;
    this.running = true;
    // Yield once so that requests made in the same turn of the event loop join this step.
    setImmediate(() => {
      void this.step();
    });
  }

  private async step(): Promise<void> {
    const batch = this.queue.splice(0, this.maxBatch);
    try {
      let model: NativeModel;
      try {
        model = this.native();
      } catch (e) {
        for (const r of batch) r.reject(e);
        return;
      }
      try {
        const out = await model.decodeBatch(
          batch.map((r) => r.seq),
          Int32Array.from(batch.map((r) => r.token)),
          batch.map((r) => r.sampling),
          !batch.some((r) => r.last),
        );
        this.stats.steps++;
        this.stats.tokens += batch.length;
        this.stats.maxBatch = Math.max(this.stats.maxBatch, batch.length);
        batch.forEach((r, i) => r.resolve(decoded(out, i)));
      } catch (e) {
        // A batch fails as a whole (nothing changed); run each request alone so that only the
        // one at fault (a disposed or full sequence, say) sees an error.
        if (batch.length === 1) {
          batch[0].reject(fromNative(e));
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
