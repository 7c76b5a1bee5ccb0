/**
 * The options of a prefill (append(), forward(), logits()): checked, resolved against the
 * model's defaults, and handed to the engine, with the cancel flag an AbortSignal raises and
 * how far from exact the K/V of each prefill mode may be.
 */
import { fromNative, InvalidOptionError } from "./errors";
import { DEFAULT_PREFILL_TOLERANCE, describe, MAX_PREFILL_PASSES, posInt, PREFILL_MODES, PrefillMode, tolerance } from "./options";
import type { PrefillOptions } from "./types";

/** Where a prefill's defaults come from: generation_config.json and the config (see Model.generationDefaults). */
export interface PrefillDefaults {
  generationDefaults(): { prefill: PrefillMode; prefillPasses: number };
}

/**
 * The mark of K/V the iterative scheme computed in `passes` passes: an approximation with no
 * bound, yet kept for reuse. 1 + 1/passes lies above every fixed-point tolerance (those are below
 * 1) and falls as the passes rise, so such K/V serves only requests that prefill iteratively
 * themselves (whose result already depends on how their prompt is cut) in at most as many
 * passes: none gets K/V iterated less than it asked for. Infinity marks K/V that serves none (a
 * context shift, a lossy rewind).
 */
export function iterativeKvTolerance(passes: number): number {
  return 1 + 1 / passes;
}

/**
 * How far from the sequential computation a prefill mode's K/V may be: sequential is exact,
 * fixed-point within its tolerance, the iterative scheme iterativeKvTolerance(passes). The
 * prefix cache reads it as what a request accepts, a sequence as what its prefills made.
 */
export function prefillKvTolerance(mode: string, tolerance: number, passes: number): number {
  return mode === "sequential" ? 0 : mode === "iterative" ? iterativeKvTolerance(passes) : tolerance;
}

const PREFILL_KEYS = new Set(["prefill", "prefillPasses", "prefillTolerance", "signal"]);

/**
 * The options object of append(), forward() and logits(): an object of known keys, none of them
 * one that the mode in force would ignore (refuseUnusedPrefillOptions).
 */
export function checkPrefillOptions(options: unknown, defaults: PrefillDefaults): PrefillOptions {
  if (options === null || typeof options !== "object" || Array.isArray(options)) throw new InvalidOptionError("options", `must be an object, got ${describe(options)}`);
  for (const k of Object.keys(options)) {
    if (!PREFILL_KEYS.has(k)) throw new InvalidOptionError(k, `is not a prefill option (known: ${[...PREFILL_KEYS].join(", ")})`);
  }
  refuseUnusedPrefillOptions(defaults, options as PrefillOptions);
  return options as PrefillOptions;
}

/**
 * Refuses a prefill option that the mode in force would ignore: passes steer "iterative" only,
 * a tolerance "fixed-point" only (the mode is the caller's, or the model's default). `given`:
 * the caller's options, before any defaults fill them in. `defaults` null: no model yet (the
 * command line's flags, createServer's options), so only a mode given there is in force.
 */
export function refuseUnusedPrefillOptions(defaults: PrefillDefaults | null, given: { prefill?: unknown; prefillPasses?: unknown; prefillTolerance?: unknown } | undefined): void {
  if (!given) return;
  const mode = (given.prefill ?? defaults?.generationDefaults().prefill) as PrefillMode | undefined;
  // No mode in force yet (no model), or a mode that is none (resolvePrefill names it).
  if (mode === undefined || !PREFILL_MODES.includes(mode)) return;
  if (given.prefillPasses !== undefined && mode !== "iterative") throw new InvalidOptionError("prefillPasses", `applies to prefill "iterative" only, and the prefill is ${mode}`);
  if (given.prefillTolerance !== undefined && mode !== "fixed-point") throw new InvalidOptionError("prefillTolerance", `applies to prefill "fixed-point" only, and the prefill is ${mode}`);
}

/**
 * A prefill's options resolved. `auto`: the caller left the mode to the model (no `prefill`, or
 * generate()'s resolved options with `prefillAuto`), so the engine may run the prompt as batched
 * token steps instead, which are exact (EngineContext.batchedPrefill).
 */
export function resolvePrefill(defaults: PrefillDefaults, options: PrefillOptions & { prefillAuto?: boolean }) {
  const mode = options.prefill ?? defaults.generationDefaults().prefill;
  if (!PREFILL_MODES.includes(mode)) throw new InvalidOptionError("prefill", `must be one of ${PREFILL_MODES.join(", ")}, got ${describe(mode)}`);
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) throw new InvalidOptionError("signal", "must be an AbortSignal");
  return {
    mode,
    auto: options.prefill === undefined || options.prefillAuto === true,
    signal: options.signal,
    passes: options.prefillPasses === undefined ? defaults.generationDefaults().prefillPasses : posInt("prefillPasses", options.prefillPasses, MAX_PREFILL_PASSES),
    tolerance: options.prefillTolerance === undefined ? DEFAULT_PREFILL_TOLERANCE : tolerance(options.prefillTolerance),
  };
}

/** A prefill's options resolved: the mode (and whether the caller chose it), its passes and tolerance, and the signal. */
export type ResolvedPrefill = ReturnType<typeof resolvePrefill>;

/** The native side of a resolved prefill (the signal travels as a cancel flag instead). */
export function nativePrefill(p: ResolvedPrefill) {
  return { mode: p.mode, passes: p.passes, tolerance: p.tolerance };
}

/**
 * Runs a native call with a cancel flag that any of `signals` raises: the engine checks it
 * between passes and tokens. The flag lives in shared memory, read by the engine's worker thread.
 */
export async function withCancel<T>(signals: readonly (AbortSignal | undefined)[], call: (cancel?: Int32Array) => Promise<T>): Promise<T> {
  const live = signals.filter((s): s is AbortSignal => s !== undefined);
  if (live.length === 0) return call();
  const cancel = new Int32Array(new SharedArrayBuffer(4));
  const raise = () => Atomics.store(cancel, 0, 1);
  for (const s of live) {
    if (s.aborted) raise();
    else s.addEventListener("abort", raise, { once: true });
  }
  try {
    return await call(cancel);
  } catch (e) {
    throw fromNative(e);
  } finally {
    for (const s of live) s.removeEventListener("abort", raise);
  }
}
