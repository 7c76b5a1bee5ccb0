/** Checking of user options: each bad value is an InvalidOptionError naming the option. */
import { InvalidOptionError } from "./errors";
import type { NativeSamplingParams } from "./native";

export type PrefillMode = "fixed-point" | "sequential" | "iterative";
export const PREFILL_MODES: readonly PrefillMode[] = ["fixed-point", "sequential", "iterative"];
/**
 * Passes after which prefill "fixed-point" stops iterating and runs the rest of the prompt
 * token by token (the engine's kFixedPointMaxPasses; a prompt that reports this many passes
 * did not converge).
 */
export const FIXED_POINT_MAX_PASSES = 64;

export interface SamplingOptions {
  /** 0 = greedy (the default unless generation_config.json says otherwise). */
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repetitionPenalty?: number;
  /** Makes sampling reproducible: the same seed, prompt and options give the same tokens. */
  seed?: number;
  /**
   * OpenAI's presence penalty, in [-2, 2] (default 0): subtracted from the logit of every token
   * this request has generated so far (its prompt does not count). Applied after
   * repetitionPenalty, before temperature and the filters, as in OpenAI's API and vLLM.
   */
  presencePenalty?: number;
  /**
   * OpenAI's frequency penalty, in [-2, 2] (default 0): subtracted from a token's logit once per
   * time this request has generated it: logit[t] -= presencePenalty * (count[t] > 0) +
   * frequencyPenalty * count[t], count over the generated tokens.
   */
  frequencyPenalty?: number;
  /**
   * Token id -> bias added to its logit, each in [-100, 100] (at most 300 entries, ids within
   * the vocabulary): 100 all but forces a token, -100 all but bans it. Applied after the
   * penalties.
   */
  logitBias?: Record<number, number>;
  /**
   * Log-probabilities of the generated tokens: an integer 0..20; 0 = each chosen token's only,
   * k = also the k most likely tokens at each step (StreamChunk.logprob / topLogprobs,
   * GenerateResult.logprobs). They are the log-softmax of the processed logits: after
   * repetitionPenalty, presencePenalty, frequencyPenalty and logitBias, before temperature,
   * top-k, top-p and min-p (vLLM's default "raw" log-probabilities of the processed logits), so
   * they do not depend on the temperature and a token the filters would drop still has one.
   */
  logprobs?: number;
}

export interface GenerateOptions extends SamplingOptions {
  maxNewTokens?: number;
  /** Strings that end generation; the text returned stops before them. */
  stop?: string | readonly string[];
  signal?: AbortSignal;
  /**
   * How an LCKV prompt is prefilled (default: "sequential" on the CPU, "fixed-point" on the GPU;
   * both exact). While other requests run, a prompt in "sequential" mode, or in the default
   * mode, may go as batched token steps (rows of the shared decode step): the sequential
   * arithmetic. "fixed-point" and "iterative", when asked for, always run as asked.
   */
  prefill?: PrefillMode;
  /** Passes for prefill "iterative" (default forward_passes + backward_passes of the config). */
  prefillPasses?: number;
  /**
   * Prefill "fixed-point" stops when no K/V value that a layer reads from above moved by more
   * than this times the largest such value in the last pass (default 1e-6: f32 rounding level);
   * 0 iterates until the K/V is identical bit for bit. After 64 passes without converging,
   * the positions past the first 64 run token by token (exact as well). A compact cache (bf16,
   * fp8, int8, int4) stores each value in whole steps of its type, which move far more than 1e-6
   * whenever a rounding flips, so with one the fixed point runs those 64 passes (measured on the
   * shipped model: docs/usage.md, "Prefilling an LCKV prompt"; on the GPU, docs/profiling.md).
   */
  prefillTolerance?: number;
  /** Keep generating past end-of-sequence tokens (for benchmarks and golden tests). */
  ignoreEos?: boolean;
  /**
   * What happens at the context limit: "none" (default) ends generation with finishReason
   * "length"; "sink-window" (StreamingLLM) keeps the first `sinkTokens` tokens and the most
   * recent ones, dropping half of the rest whenever the context fills, so generation can go on
   * indefinitely in constant memory. Works alike for standard and LCKV models; the K/V kept was
   * computed with the dropped tokens in view, so the result approximates a shorter context.
   */
  contextShift?: "none" | "sink-window";
  /** Attention-sink tokens kept at the start by "sink-window" (default 4, rounded up to a whole K/V page). */
  sinkTokens?: number;
}

const GENERATE_KEYS = new Set([
  "maxNewTokens", "temperature", "topK", "topP", "minP", "repetitionPenalty", "seed", "stop", "signal", "prefill", "prefillPasses", "prefillTolerance", "ignoreEos", "contextShift", "sinkTokens",
  "presencePenalty", "frequencyPenalty", "logitBias", "logprobs",
]);

/** OpenAI's limits for presence and frequency penalties, logit bias, and top log-probabilities. */
export const MAX_PENALTY = 2;
export const MAX_LOGIT_BIAS = 100;
export const MAX_LOGIT_BIAS_ENTRIES = 300;
export const MAX_TOP_LOGPROBS = 20;

/** The largest value an option the engine takes as a 32-bit integer may have. */
export const INT32_MAX = 2 ** 31 - 1;
/** The smallest normal f32. */
export const F32_MIN_NORMAL = 2 ** -126;
/** The largest finite f32. */
export const F32_MAX = 3.4028234663852886e38;
/** Passes of the iterative prefill a request may ask for (the reference trains with a handful). */
export const MAX_PREFILL_PASSES = 1024;

/**
 * "must be <kind>, got …", or for an integer past Number.MAX_SAFE_INTEGER (which a double holds
 * only approximately, so it cannot be passed on exactly) the bound it passed.
 */
function notSafeInteger(kind: string, v: unknown, min = -Infinity): string {
  const unsafe = typeof v === "number" && Number.isInteger(v) && !Number.isSafeInteger(v) && v >= min;
  return `must be ${kind}${unsafe ? " of at most 2^53 - 1 in magnitude (Number.MAX_SAFE_INTEGER)" : ""}, got ${describe(v)}`;
}

export function nonNegInt(name: string, v: unknown, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
    throw new InvalidOptionError(name, notSafeInteger("a non-negative integer", v, 0));
  }
  if (v > max) throw new InvalidOptionError(name, `must be at most ${max}, got ${v}`);
  return v;
}

export function posInt(name: string, v: unknown, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 1) {
    throw new InvalidOptionError(name, notSafeInteger("a positive integer", v, 1));
  }
  if (v > max) throw new InvalidOptionError(name, `must be at most ${max}, got ${v}`);
  return v;
}

function finite(name: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isFinite(v)) throw new InvalidOptionError(name, `must be a finite number, got ${describe(v)}`);
  return v;
}

export function describe(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "number" || typeof v === "boolean" || v === null || v === undefined) return String(v);
  if (Array.isArray(v)) return "an array";
  return typeof v;
}

/**
 * A value for an error message: JSON, cut short (a template or a list may be long); a number as
 * itself (JSON writes NaN and Infinity, 1e400 parsed, as null).
 */
export function brief(v: unknown): string {
  if (typeof v === "number") return String(v);
  let s: string | undefined;
  try {
    s = JSON.stringify(v);
  } catch {
    s = undefined; // a BigInt or a cycle
  }
  s ??= typeof v === "bigint" ? `${v}n` : String(v);
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

/** The sampling fields are the ones the engine takes (NativeSamplingParams). */
export interface ResolvedGenerateOptions extends NativeSamplingParams {
  maxNewTokens: number;
  stop: string[];
  signal?: AbortSignal;
  prefill: PrefillMode;
  /** `prefill` is the model's default, not the caller's choice (see resolvePrefill's `auto`). */
  prefillAuto: boolean;
  prefillPasses: number;
  prefillTolerance: number;
  ignoreEos: boolean;
  contextShift: "none" | "sink-window";
  sinkTokens: number;
}

export const DEFAULT_PREFILL_TOLERANCE = 1e-6;

/** A prefill mode, one of PREFILL_MODES. */
export function prefillMode(v: unknown): PrefillMode {
  if (!PREFILL_MODES.includes(v as PrefillMode)) throw new InvalidOptionError("prefill", `must be one of ${PREFILL_MODES.map((m) => `"${m}"`).join(", ")}, got ${describe(v)}`);
  return v as PrefillMode;
}

export function tolerance(v: unknown): number {
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0 || v >= 1) {
    throw new InvalidOptionError("prefillTolerance", `must be a number in [0, 1), got ${describe(v)}`);
  }
  return v;
}

/** The resolved options that generation_config.json and the config give defaults for. */
export type GenerationDefaults = Omit<
  ResolvedGenerateOptions,
  "stop" | "signal" | "seed" | "ignoreEos" | "prefillAuto" | "prefillTolerance" | "contextShift" | "sinkTokens" | "presencePenalty" | "frequencyPenalty" | "penaltyFrom" | "logitBias" | "logprobs"
>;

/** A penalty in [-MAX_PENALTY, MAX_PENALTY]. */
function penalty(name: string, v: unknown): number {
  const x = finite(name, v);
  if (x < -MAX_PENALTY || x > MAX_PENALTY) throw new InvalidOptionError(name, `must be in [-${MAX_PENALTY}, ${MAX_PENALTY}], got ${x}`);
  return x;
}

/**
 * logitBias as the engine takes it; ids are checked against the vocabulary where the model is
 * known (EngineContext.resolveGenerate).
 */
function logitBias(v: unknown): { tokens: Int32Array; values: Float32Array } {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new InvalidOptionError("logitBias", `must be an object of token id -> bias, got ${Array.isArray(v) ? "an array" : describe(v)}`);
  }
  const entries = Object.entries(v as Record<string, unknown>);
  if (entries.length > MAX_LOGIT_BIAS_ENTRIES) throw new InvalidOptionError("logitBias", `may hold at most ${MAX_LOGIT_BIAS_ENTRIES} entries, got ${entries.length}`);
  const tokens = new Int32Array(entries.length);
  const values = new Float32Array(entries.length);
  entries.forEach(([k, b], i) => {
    const id = Number(k);
    if (!/^(0|[1-9][0-9]*)$/.test(k) || id > INT32_MAX) throw new InvalidOptionError("logitBias", `keys must be token ids (non-negative integers), got ${JSON.stringify(k)}`);
    if (typeof b !== "number" || !Number.isFinite(b) || b < -MAX_LOGIT_BIAS || b > MAX_LOGIT_BIAS) {
      throw new InvalidOptionError("logitBias", `the bias of token ${k} must be a number in [-${MAX_LOGIT_BIAS}, ${MAX_LOGIT_BIAS}], got ${describe(b)}`);
    }
    tokens[i] = id;
    values[i] = b;
  });
  return { tokens, values };
}

/** Validates options over defaults (from generation_config.json). */
export function resolveGenerateOptions(opts: GenerateOptions | undefined, defaults: GenerationDefaults): ResolvedGenerateOptions {
  const o = (opts ?? {}) as Record<string, unknown>;
  if (typeof o !== "object" || o === null) throw new InvalidOptionError("options", "must be an object");
  for (const k of Object.keys(o)) {
    if (!GENERATE_KEYS.has(k)) throw new InvalidOptionError(k, `is not a generate option (known: ${[...GENERATE_KEYS].join(", ")})`);
  }
  const r: ResolvedGenerateOptions = {
    ...defaults,
    stop: [],
    seed: 0,
    ignoreEos: false,
    prefillAuto: o.prefill === undefined,
    prefillTolerance: DEFAULT_PREFILL_TOLERANCE,
    contextShift: "none",
    sinkTokens: 4,
  };
  if (o.maxNewTokens !== undefined) r.maxNewTokens = nonNegInt("maxNewTokens", o.maxNewTokens);
  if (o.temperature !== undefined) {
    r.temperature = finite("temperature", o.temperature);
    if (r.temperature < 0) throw new InvalidOptionError("temperature", `must be >= 0, got ${r.temperature}`);
  }
  if (o.topK !== undefined) r.topK = nonNegInt("topK", o.topK, INT32_MAX);
  if (o.topP !== undefined) {
    r.topP = finite("topP", o.topP);
    if (!(r.topP > 0 && r.topP <= 1)) throw new InvalidOptionError("topP", `must be in (0, 1], got ${r.topP}`);
  }
  if (o.minP !== undefined) {
    r.minP = finite("minP", o.minP);
    if (!(r.minP >= 0 && r.minP <= 1)) throw new InvalidOptionError("minP", `must be in [0, 1], got ${r.minP}`);
  }
  if (o.repetitionPenalty !== undefined) {
    r.repetitionPenalty = finite("repetitionPenalty", o.repetitionPenalty);
    if (!(r.repetitionPenalty > 0)) throw new InvalidOptionError("repetitionPenalty", `must be > 0, got ${r.repetitionPenalty}`);
    // The engine applies it in f32: past f32's normal range it would round to 0 or infinity.
    if (!(r.repetitionPenalty >= F32_MIN_NORMAL && r.repetitionPenalty <= 1 / F32_MIN_NORMAL)) {
      throw new InvalidOptionError("repetitionPenalty", `must be within [${F32_MIN_NORMAL}, ${1 / F32_MIN_NORMAL}] (f32's normal range), got ${r.repetitionPenalty}`);
    }
  }
  if (o.seed !== undefined) {
    if (typeof o.seed !== "number" || !Number.isSafeInteger(o.seed)) throw new InvalidOptionError("seed", notSafeInteger("an integer", o.seed));
    r.seed = o.seed;
  } else {
    r.seed = Math.floor(Math.random() * 2 ** 52);
  }
  if (o.stop !== undefined) {
    const s = Array.isArray(o.stop) ? o.stop : [o.stop];
    if (!s.every((x) => typeof x === "string" && x.length > 0)) {
      throw new InvalidOptionError("stop", "must be a non-empty string or an array of non-empty strings");
    }
    r.stop = s as string[];
  }
  if (o.signal !== undefined) {
    if (!(o.signal instanceof AbortSignal)) throw new InvalidOptionError("signal", "must be an AbortSignal");
    r.signal = o.signal;
  }
  if (o.prefill !== undefined) r.prefill = prefillMode(o.prefill);
  if (o.prefillPasses !== undefined) r.prefillPasses = posInt("prefillPasses", o.prefillPasses, MAX_PREFILL_PASSES);
  if (o.prefillTolerance !== undefined) r.prefillTolerance = tolerance(o.prefillTolerance);
  if (o.ignoreEos !== undefined) {
    if (typeof o.ignoreEos !== "boolean") throw new InvalidOptionError("ignoreEos", `must be true or false, got ${describe(o.ignoreEos)}`);
    r.ignoreEos = o.ignoreEos;
  }
  if (o.contextShift !== undefined) {
    if (o.contextShift !== "none" && o.contextShift !== "sink-window") {
      throw new InvalidOptionError("contextShift", `must be "none" or "sink-window", got ${describe(o.contextShift)}`);
    }
    r.contextShift = o.contextShift;
  }
  if (o.sinkTokens !== undefined) r.sinkTokens = nonNegInt("sinkTokens", o.sinkTokens);
  if (o.presencePenalty !== undefined) r.presencePenalty = penalty("presencePenalty", o.presencePenalty);
  if (o.frequencyPenalty !== undefined) r.frequencyPenalty = penalty("frequencyPenalty", o.frequencyPenalty);
  if (o.logitBias !== undefined) r.logitBias = logitBias(o.logitBias);
  if (o.logprobs !== undefined) r.logprobs = nonNegInt("logprobs", o.logprobs, MAX_TOP_LOGPROBS);
  return r;
}
