/**
 * generation_config.json: the model's generation defaults. Only the fields lckv reads are
 * checked; unknown keys are kept, since Hugging Face files carry many (max_length, num_beams, ...).
 * A field that is null counts as absent, as it does in config.json and in transformers.
 */
import { ConfigError } from "./errors";
import { brief, F32_MIN_NORMAL, INT32_MAX } from "./options";

/** A token-id field of a checked generation_config.json (one id or a list) as a list; absent or null is none. */
export function generationTokenIds(g: Record<string, unknown>, key: "eos_token_id" | "bos_token_id"): number[] {
  const v = g[key];
  return v === undefined || v === null ? [] : ((Array.isArray(v) ? v : [v]) as number[]);
}

/** Validates a parsed generation_config.json (the caller passes {} when there is none) and returns it. */
export function parseGenerationConfig(raw: unknown, file: string): Record<string, unknown> {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new ConfigError(file, "(root)", `must be a JSON object, got ${Array.isArray(raw) ? "an array" : brief(raw)}`);
  }
  const g = raw as Record<string, unknown>;
  const present = (k: string) => g[k] !== undefined && g[k] !== null;
  const number = (k: string): number | undefined => {
    if (!present(k)) return undefined;
    const v = g[k];
    // JSON has no NaN or Infinity, but a caller may hand over an object it built itself.
    if (typeof v !== "number" || !Number.isFinite(v)) throw new ConfigError(file, k, `must be a finite number, got ${brief(v)}`);
    return v;
  };
  const integer = (k: string, min: number, max: number): void => {
    const v = number(k);
    if (v === undefined) return;
    if (!Number.isInteger(v) || v < min || v > max) {
      throw new ConfigError(file, k, `must be an integer in [${min}, ${max}], got ${brief(v)}`);
    }
  };

  if (present("do_sample") && typeof g.do_sample !== "boolean") {
    throw new ConfigError(file, "do_sample", `must be true or false, got ${brief(g.do_sample)}`);
  }
  // Capped at int32: the engine takes these as int32, and no context holds more tokens anyway.
  integer("max_new_tokens", 1, INT32_MAX);
  integer("max_length", 1, INT32_MAX);
  integer("top_k", 0, INT32_MAX);
  const temperature = number("temperature");
  if (temperature !== undefined && temperature < 0) {
    throw new ConfigError(file, "temperature", `must be >= 0, got ${temperature}`);
  }
  const topP = number("top_p");
  // top_p = 0 would keep no token at all; 1 turns nucleus sampling off.
  if (topP !== undefined && !(topP > 0 && topP <= 1)) {
    throw new ConfigError(file, "top_p", `must be in (0, 1], got ${topP}`);
  }
  const minP = number("min_p");
  if (minP !== undefined && !(minP >= 0 && minP <= 1)) {
    throw new ConfigError(file, "min_p", `must be in [0, 1], got ${minP}`);
  }
  const penalty = number("repetition_penalty");
  // The penalty divides (or multiplies) logits: 0 or less would flip or erase them.
  if (penalty !== undefined && !(penalty > 0)) {
    throw new ConfigError(file, "repetition_penalty", `must be > 0, got ${penalty}`);
  }
  // Applied in f32: past its normal range it would round to 0 or infinity.
  if (penalty !== undefined && !(penalty >= F32_MIN_NORMAL && penalty <= 1 / F32_MIN_NORMAL)) {
    throw new ConfigError(file, "repetition_penalty", `must be within f32's normal range, got ${penalty}`);
  }
  // pad_token_id is never read here, and older Llama files set it to -1: any integer passes.
  for (const k of ["eos_token_id", "bos_token_id", "pad_token_id"]) {
    if (!present(k)) continue;
    const v = g[k];
    const ids = Array.isArray(v) ? v : [v];
    const min = k === "pad_token_id" ? -Infinity : 0;
    if (!ids.every((x) => typeof x === "number" && Number.isSafeInteger(x) && x >= min)) {
      throw new ConfigError(file, k, `must be a token id (a non-negative integer) or a list of token ids, got ${brief(v)}`);
    }
  }
  return { ...g };
}
