/**
 * The result and option types that Model and Sequence share: what a generation returns and
 * streams, what a prefill takes, and what forward() returns. A module of its own so that
 * neither of the two needs the other for its types.
 */
import type { PrefillMode } from "./options";

export interface GenerateResult {
  text: string;
  tokens: number[];
  finishReason: "stop" | "length" | "abort";
  usage: { promptTokens: number; completionTokens: number };
  /** Passes the prefill ran over the cyclic layer group (1 when the model has none). */
  prefillPasses: number;
}

export interface StreamChunk {
  /** Text that this token completed (may be empty while a character or stop string is pending). */
  text: string;
  /**
   * The generated token id; null only in a last chunk that carries text held back while it could
   * have begun a stop string, released when generation ended otherwise (it belongs to no one token).
   */
  token: number | null;
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
