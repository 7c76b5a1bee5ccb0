/**
 * Perplexity over a token stream, in non-overlapping windows: the rule scripts/ uses on the
 * PyTorch side, so both implementations score exactly the same predictions.
 * Window w covers ids[w*n, (w+1)*n); inside it, tokens 1..len-1 are predicted from their
 * prefix in the window; a final window shorter than 2 tokens is dropped.
 */
import { InvalidInputError, InvalidOptionError } from "./errors";
import { refuseTokenIdsOutsideVocabulary } from "./engine-context";
import { Model } from "./model";
import { describe, PrefillMode } from "./options";

export interface PerplexityResult {
  perplexity: number;
  /** Mean negative log-likelihood in nats per predicted token. */
  meanNll: number;
  predictedTokens: number;
  windows: number;
  /** Prefill passes per window (for LCKV fixed-point: how many it needed). */
  passes: number[];
}

export interface PerplexityOptions {
  /** Tokens per window (default: the model's context). */
  window?: number;
  prefill?: PrefillMode;
  prefillPasses?: number;
  prefillTolerance?: number;
  /** Called after each window with the windows done and their total. */
  onWindow?: (done: number, total: number) => void;
}

const PERPLEXITY_KEYS = new Set(["window", "prefill", "prefillPasses", "prefillTolerance", "onWindow"]);

/**
 * Perplexity of `ids` (token ids: text is tokenized first, model.tokenizer.encode, so that the
 * caller decides whether special tokens are added).
 */
export async function evaluatePerplexity(model: Model, ids: readonly number[], options: PerplexityOptions = {}): Promise<PerplexityResult> {
  if (!(model instanceof Model)) throw new InvalidOptionError("model", `must be a Model from loadModel(), got ${describe(model)}`);
  if (options === null || typeof options !== "object" || Array.isArray(options)) throw new InvalidOptionError("options", `must be an object, got ${describe(options)}`);
  for (const k of Object.keys(options)) {
    if (!PERPLEXITY_KEYS.has(k)) throw new InvalidOptionError(k, `is not a perplexity option (known: ${[...PERPLEXITY_KEYS].join(", ")})`);
  }
  if (options.onWindow !== undefined && typeof options.onWindow !== "function") throw new InvalidOptionError("onWindow", `must be a function, got ${describe(options.onWindow)}`);
  // A string would be read a character at a time, each character an index into the logits.
  if (!Array.isArray(ids) && !(ArrayBuffer.isView(ids) && !(ids instanceof DataView))) {
    throw new InvalidInputError(`perplexity takes an array of token ids (tokenize text first: model.tokenizer.encode(text)), got ${describe(ids)}`);
  }
  const V = model.config.vocabSize;
  refuseTokenIdsOutsideVocabulary(ids, V, "perplexity input");
  const n = options.window ?? model.maxContext;
  if (!Number.isSafeInteger(n) || n < 2 || n > model.maxContext) {
    throw new InvalidOptionError("window", `must be an integer in [2, ${model.maxContext}], got ${describe(n)}`);
  }
  if (ids.length < 2) throw new InvalidInputError(`perplexity needs at least 2 tokens, got ${ids.length}`);
  let nll = 0;
  let count = 0;
  const passes: number[] = [];
  const total = Math.ceil(ids.length / n);
  for (let w = 0; w * n < ids.length; w++) {
    const win = ids.slice(w * n, (w + 1) * n);
    if (win.length < 2) break;
    const r = await model.forward(win, { prefill: options.prefill, prefillPasses: options.prefillPasses, prefillTolerance: options.prefillTolerance });
    passes.push(r.passes);
    for (let t = 0; t + 1 < win.length; t++) {
      const row = r.logits.subarray(t * V, (t + 1) * V);
      let mx = -Infinity;
      for (let j = 0; j < V; j++) mx = Math.max(mx, row[j]);
      let s = 0;
      for (let j = 0; j < V; j++) s += Math.exp(row[j] - mx);
      nll += mx + Math.log(s) - row[win[t + 1]];
      count++;
    }
    options.onWindow?.(w + 1, total);
  }
  const meanNll = count > 0 ? nll / count : NaN;
  return { perplexity: Math.exp(meanNll), meanNll, predictedTokens: count, windows: passes.length, passes };
}
