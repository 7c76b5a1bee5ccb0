/**
 * The result and option types that Model and Sequence share: what a generation returns and
 * streams, what a prefill takes, and what forward() returns. A module of its own so that
 * neither of the two needs the other for its types.
 */
import type { PrefillMode } from "./options";

/** One of the most likely tokens at a step, with its log-probability. */
export interface TopLogprob {
  token: number;
  logprob: number;
}

/**
 * A generated token's log-probability (natural log), and with `logprobs: k > 0` the k most
 * likely tokens at its step, most likely first. See GenerateOptions.logprobs for the
 * distribution they are taken from.
 */
export interface TokenLogprob {
  token: number;
  logprob: number;
  /** Present (possibly empty, for `logprobs: 0`) whenever log-probabilities were asked for. */
  topLogprobs?: TopLogprob[];
}

/** How long a generation took, measured from the call that began it (queueing and prefill included). */
export interface GenerationTimings {
  /** Until the first token was sampled (the whole time when none was). */
  timeToFirstTokenMs: number;
  totalMs: number;
  /** (completionTokens - 1) over the time after the first token; 0 with fewer than 2 tokens. */
  tokensPerSecond: number;
}

export interface GenerateResult {
  text: string;
  tokens: number[];
  finishReason: "stop" | "length" | "abort";
  /**
   * completionTokens: the tokens generated, an end-of-sequence token that ended the generation
   * included (as OpenAI and vLLM count it): `tokens.length`, plus 1 when one did.
   * promptTokens: the request's prompt (model.generate(), stream(), chat(); a chat session's
   * turn counts the conversation so far). A sequence's own generate() has no prompt of its own:
   * what it continues was appended before, so it counts 0.
   */
  usage: { promptTokens: number; completionTokens: number };
  /** Passes the prefill ran over the cyclic layer group (1 when the model has none). */
  prefillPasses: number;
  timings: GenerationTimings;
  /** One entry per token of `tokens`, when the options asked for `logprobs`. */
  logprobs?: TokenLogprob[];
}

export interface StreamChunk {
  /** Text that this token completed (may be empty while a character or stop string is pending). */
  text: string;
  /**
   * The generated token id; null only in a last chunk that carries text held back while it could
   * have begun a stop string, released when generation ended otherwise (it belongs to no one token).
   */
  token: number | null;
  /** The token's log-probability, when the options asked for `logprobs` (absent when token is null). */
  logprob?: number;
  /** The most likely tokens at this step, when the options asked for `logprobs` (empty for 0). */
  topLogprobs?: TopLogprob[];
}

export interface PrefillOptions {
  prefill?: PrefillMode;
  prefillPasses?: number;
  prefillTolerance?: number;
  /**
   * Stops the prefill (between passes of the cyclic group and between tokens): the call rejects
   * with AbortError (LCKV_ABORTED) and the sequence is as it was before it.
   */
  signal?: AbortSignal;
}

export interface ForwardResult {
  logits: Float32Array;
  passes: number;
}
