/**
 * config.json -> ModelConfig: the dimensions, the block style and the KV plan of a model.
 * Every field is checked here, so a bad config fails with the file and field named.
 */
import { ConfigError, UnsupportedArchitectureError } from "./errors";
import { brief, F32_MAX, INT32_MAX } from "./options";
import { buildPlan, KvPlan, MAX_LAYERS, parseLayerTypes } from "./plan";

export type BlockStyle = "llama" | "gpt2";

export const SUPPORTED_ARCHITECTURES = [
  "LlamaForCausalLM (model_type llama)",
  "MistralForCausalLM (model_type mistral)",
  "LCKVLlamaForCausalLM (model_type lckv-llama)",
  "GPT2LMHeadModel (model_type gpt2)",
] as const;

export interface ModelConfig {
  /** Hugging Face architecture name, e.g. "LlamaForCausalLM". */
  architecture: string;
  /** config.json's model_type: "llama", "mistral", "lckv-llama" or "gpt2". */
  modelType: string;
  blockStyle: BlockStyle;
  numLayers: number;
  hiddenSize: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  intermediateSize: number;
  vocabSize: number;
  maxPositionEmbeddings: number;
  normEps: number;
  tieWordEmbeddings: boolean;
  attentionBias: boolean;
  mlpBias: boolean;
  /** For each layer, the layer whose K/V it reads. */
  layerTypes: number[];
  /** Layers that compute and cache K/V. */
  kvLayers: number[];
  /** Sliding window (positions, counting the query's own) of each layer; 0 = full. */
  slidingWindows: number[];
  forceNodiag: boolean;
  /** LCKV iterative prefill passes: m (forward_passes) and b (backward_passes). */
  forwardPasses: number;
  backwardPasses: number;
  useSequential: boolean;
  ropeTheta: number;
  ropeScaling: Record<string, unknown> | null;
  bosTokenId: number | null;
  eosTokenIds: number[];
  plan: KvPlan;
  /** RoPE inverse frequencies (headDim/2), after scaling; empty for learned positions. */
  ropeInvFreq: number[];
}

type Json = Record<string, unknown>;

/**
 * Widths (hidden size, head dim, heads). Real models stay below 2**16; the bound keeps what is
 * allocated per unit here (the RoPE table has head_dim/2 entries) small.
 */
const MAX_DIM = 2 ** 20;
/** LCKV prefill passes (forward_passes, backward_passes): each is a full pass over the prompt. */
const MAX_PASSES = 1024;

class Fields {
  /** `prefix` names a nested object in errors, e.g. "rope_scaling." */
  constructor(readonly file: string, readonly o: Json, readonly prefix = "") {}
  has(k: string): boolean {
    return this.o[k] !== undefined && this.o[k] !== null;
  }
  /** What an absent field stands for: its default, or an error when it has none. */
  private absent<T>(k: string, def: T | undefined): T {
    if (def !== undefined) return def;
    throw this.error(k, "is missing");
  }
  error(k: string, message: string): ConfigError {
    return new ConfigError(this.file, this.prefix + k, message);
  }
  /** An integer in [min, max]; max defaults to int32, which every integer passed to the native side must fit. */
  int(k: string, opts: { def?: number; min?: number; max?: number } = {}): number {
    const v = this.o[k];
    if (v === undefined || v === null) return this.absent(k, opts.def);
    if (typeof v !== "number" || !Number.isInteger(v)) throw this.error(k, `must be an integer, got ${brief(v)}`);
    const min = opts.min ?? 1;
    if (v < min) throw this.error(k, `must be >= ${min}, got ${v}`);
    const max = opts.max ?? INT32_MAX;
    if (v > max) throw this.error(k, `must be <= ${max}, got ${v}`);
    return v;
  }
  /** A finite number, >= `min` or > `above` when given (a 0 or negative eps, theta or factor turns the logits into NaN). */
  num(k: string, def?: number, opts: { min?: number; above?: number; f32?: boolean } = {}): number {
    const v = this.o[k];
    if (v === undefined || v === null) return this.absent(k, def);
    if (typeof v !== "number" || !Number.isFinite(v)) throw this.error(k, `must be a finite number, got ${brief(v)}`);
    if (opts.min !== undefined && !(v >= opts.min)) throw this.error(k, `must be >= ${opts.min}, got ${v}`);
    if (opts.above !== undefined && !(v > opts.above)) throw this.error(k, `must be > ${opts.above}, got ${v}`);
    // A value the engine takes as an f32 (a norm's epsilon) must fit one: past it, it is infinite.
    if (opts.f32 && !Number.isFinite(Math.fround(v))) throw this.error(k, `must fit an f32 (at most ${F32_MAX}), got ${v}`);
    return v;
  }
  bool(k: string, def: boolean): boolean {
    const v = this.o[k];
    if (v === undefined || v === null) return def;
    if (typeof v !== "boolean") throw this.error(k, `must be true or false, got ${brief(v)}`);
    return v;
  }
  str(k: string, def?: string): string {
    const v = this.o[k];
    if (v === undefined || v === null) return this.absent(k, def);
    if (typeof v !== "string") throw this.error(k, `must be a string, got ${brief(v)}`);
    return v;
  }
  tokenIds(k: string): number[] {
    const v = this.o[k];
    if (v === undefined || v === null) return [];
    const arr = Array.isArray(v) ? v : [v];
    for (const x of arr) {
      if (typeof x !== "number" || !Number.isInteger(x) || x < 0 || x > INT32_MAX) throw this.error(k, "must be a token id or a list of token ids");
    }
    return arr as number[];
  }
}

const ARCH_BY_MODEL_TYPE: Record<string, string> = {
  llama: "LlamaForCausalLM",
  mistral: "MistralForCausalLM",
  "lckv-llama": "LCKVLlamaForCausalLM",
  gpt2: "GPT2LMHeadModel",
};

export function parseConfig(raw: unknown, file: string): ModelConfig {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new ConfigError(file, "(root)", "must be a JSON object");
  }
  const f = new Fields(file, raw as Json);
  const archs = (raw as Json).architectures;
  const archName = Array.isArray(archs) && typeof archs[0] === "string" ? (archs[0] as string) : undefined;
  const modelType = f.has("model_type") ? f.str("model_type") : undefined;
  const known = Object.entries(ARCH_BY_MODEL_TYPE).find(([mt, a]) => mt === modelType || (!modelType && a === archName));
  if (!known) {
    throw new UnsupportedArchitectureError(file, archName ?? modelType ?? "(none given)", SUPPORTED_ARCHITECTURES);
  }
  const [mt, arch] = known;
  return mt === "gpt2" ? parseGpt2(f, archName ?? arch) : parseLlama(f, mt, archName ?? arch);
}

// The KV plan's fields, the same for every architecture.
function planFields(f: Fields, plan: KvPlan, forceNodiag: boolean) {
  return {
    layerTypes: plan.target,
    kvLayers: plan.kvLayers,
    slidingWindows: plan.window,
    forceNodiag,
    forwardPasses: f.int("forward_passes", { def: 7, max: MAX_PASSES }),
    backwardPasses: f.int("backward_passes", { def: 2, min: 0, max: MAX_PASSES }),
    useSequential: f.bool("use_sequential", false),
  };
}

function tokenFields(f: Fields) {
  return {
    bosTokenId: f.has("bos_token_id") ? f.int("bos_token_id", { min: 0 }) : null,
    eosTokenIds: f.tokenIds("eos_token_id"),
  };
}

function parseLlama(f: Fields, modelType: string, architecture: string): ModelConfig {
  const numLayers = f.int("num_hidden_layers", { max: MAX_LAYERS });
  const hiddenSize = f.int("hidden_size", { max: MAX_DIM });
  const numHeads = f.int("num_attention_heads", { max: MAX_DIM });
  const numKvHeads = f.int("num_key_value_heads", { def: numHeads });
  if (numHeads % numKvHeads !== 0) {
    throw new ConfigError(f.file, "num_key_value_heads", `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  }
  const headDim = f.has("head_dim") ? f.int("head_dim", { max: MAX_DIM }) : hiddenSize / numHeads;
  if (!Number.isInteger(headDim)) {
    throw new ConfigError(f.file, "num_attention_heads", `(${numHeads}) must divide hidden_size (${hiddenSize}) when head_dim is absent`);
  }
  if (headDim % 2 !== 0) throw new ConfigError(f.file, "head_dim", `must be even for rotary embeddings, got ${headDim}`);
  const act = f.str("hidden_act", "silu");
  if (act !== "silu") throw new ConfigError(f.file, "hidden_act", `must be "silu" for this architecture, got "${act}"`);

  // transformers >= 5 writes rope_parameters; older configs write rope_theta and rope_scaling.
  const rp = (f.o.rope_parameters ?? null) as Json | null;
  if (rp !== null && (typeof rp !== "object" || Array.isArray(rp))) throw new ConfigError(f.file, "rope_parameters", "must be an object");
  const thetaFrom = rp && rp.rope_theta !== undefined ? new Fields(f.file, rp, "rope_parameters.") : f;
  const ropeTheta = thetaFrom.num("rope_theta", 10000, { above: 0 });
  let ropeScaling = (f.o.rope_scaling ?? null) as Json | null;
  let scalingField = "rope_scaling";
  if (rp && (rp.rope_type ?? rp.type ?? "default") !== "default") [ropeScaling, scalingField] = [rp, "rope_parameters"];
  if (ropeScaling !== null && (typeof ropeScaling !== "object" || Array.isArray(ropeScaling))) {
    throw new ConfigError(f.file, "rope_scaling", "must be an object or null");
  }
  const ropeInvFreq = ropeInverseFrequencies(headDim, ropeTheta, ropeScaling, f.file, {
    theta: `${thetaFrom.prefix}rope_theta`,
    scaling: scalingField,
  });

  const isLckv = modelType === "lckv-llama";
  const maxPos = f.int("max_position_embeddings", { def: 2048 });
  let slidingWindow = 0;
  const spec = parseLayerTypes(f.o.layer_types, numLayers, f.file);
  if (isLckv || spec.sliding.some((s) => s)) {
    slidingWindow = f.int("sliding_window", { def: 4096 });
  }
  if (modelType === "mistral" && f.has("sliding_window")) {
    // Mistral applies its window to every layer.
    slidingWindow = f.int("sliding_window");
    spec.sliding = spec.sliding.map(() => true);
  }
  const forceNodiag = f.bool("force_nodiag", false);
  const plan = buildPlan(spec, { forceNodiag, slidingWindow });
  return {
    architecture,
    modelType,
    blockStyle: "llama",
    numLayers,
    hiddenSize,
    numHeads,
    numKvHeads,
    headDim,
    intermediateSize: f.int("intermediate_size"),
    vocabSize: f.int("vocab_size"),
    maxPositionEmbeddings: maxPos,
    normEps: f.num("rms_norm_eps", 1e-6, { min: 0, f32: true }),
    tieWordEmbeddings: f.bool("tie_word_embeddings", false),
    attentionBias: f.bool("attention_bias", false),
    mlpBias: f.bool("mlp_bias", false),
    ...planFields(f, plan, forceNodiag),
    ropeTheta,
    ropeScaling,
    ...tokenFields(f),
    plan,
    ropeInvFreq,
  };
}

function parseGpt2(f: Fields, architecture: string): ModelConfig {
  const numLayers = f.int("n_layer", { max: MAX_LAYERS });
  const hiddenSize = f.int("n_embd", { max: MAX_DIM });
  const numHeads = f.int("n_head", { max: MAX_DIM });
  const headDim = hiddenSize / numHeads;
  if (!Number.isInteger(headDim)) throw new ConfigError(f.file, "n_head", `(${numHeads}) must divide n_embd (${hiddenSize})`);
  const act = f.str("activation_function", "gelu_new");
  if (!["gelu_new", "gelu_pytorch_tanh", "gelu_fast"].includes(act)) {
    throw new ConfigError(f.file, "activation_function", `must be a tanh GELU ("gelu_new"), got "${act}"`);
  }
  if (f.bool("scale_attn_by_inverse_layer_idx", false)) {
    throw new ConfigError(f.file, "scale_attn_by_inverse_layer_idx", "is not supported (must be false)");
  }
  if (!f.bool("scale_attn_weights", true)) throw new ConfigError(f.file, "scale_attn_weights", "is not supported (must be true)");
  // transformers ties GPT-2's LM head to wte only when this is true (its default).
  if (!f.bool("tie_word_embeddings", true)) throw new ConfigError(f.file, "tie_word_embeddings", "is not supported for GPT-2 (must be true: the LM head is wte)");
  const spec = parseLayerTypes(f.o.layer_types, numLayers, f.file);
  const slidingWindow = spec.sliding.some((s) => s) ? f.int("sliding_window") : 0;
  const forceNodiag = f.bool("force_nodiag", false);
  const plan = buildPlan(spec, { forceNodiag, slidingWindow });
  const nInner = f.has("n_inner") ? f.int("n_inner") : 4 * hiddenSize;
  return {
    architecture,
    modelType: "gpt2",
    blockStyle: "gpt2",
    numLayers,
    hiddenSize,
    numHeads,
    numKvHeads: numHeads,
    headDim,
    intermediateSize: nInner,
    vocabSize: f.int("vocab_size"),
    maxPositionEmbeddings: f.int("n_positions", { def: 1024 }),
    normEps: f.num("layer_norm_epsilon", 1e-5, { min: 0, f32: true }),
    // The engine's GPT-2 reads its LM head from wte: an untied checkpoint is refused (above).
    tieWordEmbeddings: true,
    attentionBias: true,
    mlpBias: true,
    ...planFields(f, plan, forceNodiag),
    ropeTheta: 0,
    ropeScaling: null,
    ...tokenFields(f),
    plan,
    ropeInvFreq: [],
  };
}

/**
 * RoPE inverse frequencies as Hugging Face computes them (f32), with "linear" and "llama3" scaling.
 */
export function ropeInverseFrequencies(
  headDim: number,
  theta: number,
  scaling: Json | null,
  file: string,
  fields = { theta: "rope_theta", scaling: "rope_scaling" },
): number[] {
  const f32 = Math.fround;
  const half = headDim / 2;
  const inv: number[] = [];
  for (let j = 0; j < half; j++) inv.push(f32(1 / f32(Math.pow(theta, f32((2 * j) / headDim)))));
  // A positive theta can still leave f32's range (1e-300 gives infinite frequencies, then NaN).
  if (!inv.every((x) => Number.isFinite(x))) throw new ConfigError(file, fields.theta, `(${theta}) gives rotary frequencies outside f32's range`);
  if (!scaling) return inv;
  const field = fields.scaling;
  const sf = new Fields(file, scaling, `${field}.`);
  const type = (scaling.rope_type ?? scaling.type ?? "default") as string;
  if (type === "default") return inv;
  if (type === "linear") {
    const factor = sf.num("factor", undefined, { above: 0 });
    return finite(inv.map((x) => f32(x / factor)), sf);
  }
  if (type === "llama3") {
    const factor = sf.num("factor", undefined, { above: 0 });
    const low = sf.num("low_freq_factor", undefined, { above: 0 });
    const high = sf.num("high_freq_factor", undefined, { above: 0 });
    // The smoothing between the two wavelengths divides by high - low.
    if (!(high > low)) throw sf.error("high_freq_factor", `(${high}) must be greater than low_freq_factor (${low})`);
    const oldCtx = sf.num("original_max_position_embeddings", undefined, { above: 0 });
    const lowWavelen = oldCtx / low;
    const highWavelen = oldCtx / high;
    return finite(inv.map((x) => {
      const wavelen = (2 * Math.PI) / x;
      let y = wavelen > lowWavelen ? x / factor : x;
      const medium = !(wavelen < highWavelen) && !(wavelen > lowWavelen);
      if (medium) {
        const smooth = (oldCtx / wavelen - low) / (high - low);
        y = (1 - smooth) * (y / factor) + smooth * y;
      }
      return f32(y);
    }), sf);
  }
  throw new ConfigError(file, field, `type '${type}' is not supported (supported: default, linear, llama3)`);
}

/** Scaled frequencies must stay finite too (a factor of 1e-300 makes them infinite). */
function finite(inv: number[], sf: Fields): number[] {
  if (!inv.every((x) => Number.isFinite(x))) throw sf.error("factor", "gives rotary frequencies outside f32's range");
  return inv;
}
