/**
 * The KV plan: for each layer, whose K/V its queries read, whether the diagonal is masked, and
 * its sliding window. Built once from `layer_types`; nothing downstream branches on "is this
 * LCKV": a standard model is simply the plan where every layer reads its own K/V.
 */
import { ConfigError, InvalidOptionError } from "./errors";
import { brief, describe } from "./options";

export interface KvPlan {
  /** target[i]: the layer whose K/V layer i's queries attend to. */
  target: number[];
  /** strict[i]: queries at position p see keys < p only (and position 0 outputs zero). */
  strict: boolean[];
  /** window[i]: keys j with p - j < window are visible (0 = unlimited). */
  window: number[];
  /** Sorted layers that compute and cache K/V (the set of targets). */
  kvLayers: number[];
  /** The layers whose target lies above them, with their targets: [low, high], or null. */
  cyclicGroup: { low: number; high: number } | null;
}

/**
 * The most layers a model may have. Plans allocate per layer in JS; real models have a few
 * hundred at most, and a config claiming 1e9 would exhaust the heap before anything else failed.
 */
export const MAX_LAYERS = 4096;

export interface LayerTypesSpec {
  target: number[];
  sliding: boolean[];
}

/**
 * Parses `layer_types` in any of its forms:
 * - the LCKV string "0_20_20s_..._21" (index of the target layer; suffix `s` = sliding window),
 * - an array of integers (targets),
 * - Hugging Face's array of "full_attention" / "sliding_attention" (every layer reads itself),
 * - undefined/null: the standard plan.
 */
export function parseLayerTypes(raw: unknown, numLayers: number, file: string): LayerTypesSpec {
  const field = "layer_types";
  // parseConfig bounds num_hidden_layers first; this guards direct callers of the exported API.
  if (!Number.isSafeInteger(numLayers) || numLayers < 1 || numLayers > MAX_LAYERS) {
    throw new ConfigError(file, "num_hidden_layers", `must be an integer in [1, ${MAX_LAYERS}], got ${numLayers}`);
  }
  if (raw === undefined || raw === null) {
    return { target: range(numLayers), sliding: new Array(numLayers).fill(false) };
  }
  let entries: { target: number; sliding: boolean }[];
  if (typeof raw === "string") {
    const parts = raw.split("_");
    entries = parts.map((p, i) => {
      const m = /^(\d+)(s?)$/.exec(p.trim());
      if (!m) throw new ConfigError(file, field, `entry ${i} ('${p}') is not a layer index with an optional 's' suffix`);
      return { target: Number(m[1]), sliding: m[2] === "s" };
    });
  } else if (Array.isArray(raw) && raw.every((x) => typeof x === "number")) {
    entries = (raw as number[]).map((t, i) => {
      if (!Number.isInteger(t)) throw new ConfigError(file, field, `entry ${i} (${t}) is not an integer`);
      return { target: t, sliding: false };
    });
  } else if (Array.isArray(raw) && raw.every((x) => typeof x === "string")) {
    entries = (raw as string[]).map((t, i) => {
      if (t === "full_attention") return { target: i, sliding: false };
      if (t === "sliding_attention") return { target: i, sliding: true };
      throw new ConfigError(file, field, `entry ${i} ('${t}') must be "full_attention" or "sliding_attention"`);
    });
  } else {
    throw new ConfigError(file, field, "must be an underscore-separated string of layer indices or an array");
  }
  if (entries.length !== numLayers) {
    throw new ConfigError(file, field, `has ${entries.length} entries but the model has ${numLayers} layers`);
  }
  entries.forEach((e, i) => {
    if (e.target < 0 || e.target >= numLayers) {
      throw new ConfigError(file, field, `entry ${i} targets layer ${e.target}, outside [0, ${numLayers - 1}]`);
    }
  });
  entries.forEach((e, i) => {
    if (entries[e.target].target !== e.target) {
      throw new ConfigError(
        file,
        field,
        `layer ${i} targets layer ${e.target}, which does not compute its own K/V (it targets ${entries[e.target].target})`,
      );
    }
  });
  return { target: entries.map((e) => e.target), sliding: entries.map((e) => e.sliding) };
}

/**
 * Refuses, by name, an argument of the exported plan functions that lacks the arrays they read
 * (what parseLayerTypes or buildPlan returns): `arrays` must each be an array of the same length.
 */
function checkArrays(name: string, v: unknown, arrays: string[]): void {
  const shape = `must be ${name === "plan" ? "a plan (buildPlan's result)" : "parseLayerTypes' result"}, with the arrays ${arrays.join(" and ")}`;
  if (v === null || typeof v !== "object") throw new InvalidOptionError(name, `${shape}, got ${describe(v)}`);
  const o = v as Record<string, unknown>;
  for (const a of arrays) {
    if (!Array.isArray(o[a]) || (o[a] as unknown[]).length !== (o[arrays[0]] as unknown[]).length) {
      throw new InvalidOptionError(name, `${shape} of one length; its ${a} is ${Array.isArray(o[a]) ? `${(o[a] as unknown[]).length} long` : describe(o[a])}`);
    }
  }
}

export function buildPlan(spec: LayerTypesSpec, opts: { forceNodiag: boolean; slidingWindow: number }): KvPlan {
  checkArrays("spec", spec, ["target", "sliding"]);
  if (opts === null || typeof opts !== "object") throw new InvalidOptionError("opts", `must be { forceNodiag, slidingWindow }, got ${describe(opts)}`);
  const n = spec.target.length;
  // A sliding layer with no window would read as a full one (and lose its 's' in formatLayerTypes).
  if (spec.sliding.some((s) => s) && !(Number.isInteger(opts.slidingWindow) && opts.slidingWindow >= 1)) {
    throw new InvalidOptionError("slidingWindow", `must be an integer >= 1 when a layer slides, got ${brief(opts.slidingWindow)}`);
  }
  const strict = spec.target.map((t, i) => opts.forceNodiag || t > i);
  const window = spec.sliding.map((s) => (s ? opts.slidingWindow : 0));
  const kvLayers = [...new Set(spec.target)].sort((a, b) => a - b);
  let low = -1;
  let high = -1;
  for (let i = 0; i < n; i++) {
    if (spec.target[i] > i) {
      if (low < 0) low = i;
      high = Math.max(high, spec.target[i]);
    }
  }
  return {
    target: [...spec.target],
    strict,
    window,
    kvLayers,
    cyclicGroup: low >= 0 ? { low, high } : null,
  };
}

export function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

/** The underscore form of a plan's targets, with `s` on sliding layers. */
export function formatLayerTypes(plan: KvPlan): string {
  checkArrays("plan", plan, ["target", "window"]);
  return plan.target.map((t, i) => `${t}${plan.window[i] > 0 ? "s" : ""}`).join("_");
}
