/**
 * loadModel(): reads a model directory (config, tokenizer, generation defaults, weights), checks
 * the load options, picks the backend, uploads the weights and sizes the K/V pool, and returns
 * the Model. A Hugging Face hub id in place of the directory is downloaded first (hub.ts).
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { KV_PAGE_TOKENS } from "./admission";
import { ModelConfig, parseConfig } from "./config";
import { AbortError, ConfigError, DeviceUnavailableError, fromNative, InvalidOptionError, ModelLoadError } from "./errors";
import { generationTokenIds, parseGenerationConfig } from "./generation-config";
import { DEFAULT_KV_CACHE_DTYPE, isKvCacheDtype, KV_CACHE_DTYPES, KvCacheDtype } from "./kv-cache-dtype";
import { checkDownloadOptions, isHubModelId, resolveModel } from "./hub";
import { Model } from "./model";
import { modelFileExists, readJson } from "./model-files";
import { loadAddon, NativeModel, NativeModelDescription } from "./native";
import { describe, INT32_MAX, nonNegInt, posInt } from "./options";
import { readModelTensors } from "./safetensors";
import { Tokenizer } from "./tokenizer";
import { resolveWeights } from "./weights";

export type Device = "auto" | "cuda" | "cpu";
/** The weights' types loadModel's `dtype` takes (the CLI's --dtype offers the same). */
export const DTYPES = ["auto", "f32", "f16", "bf16"] as const;
export type DType = (typeof DTYPES)[number];

export interface LoadOptions {
  device?: Device;
  /**
   * Weight dtype on the device. Default ("auto"): bf16 on CUDA; on the CPU, which always computes
   * in f32, each weight in the dtype its checkpoint stores (a bf16 or f16 weight takes 2 bytes,
   * and gives the same results as widened to f32). "f32" on the CPU widens 16-bit weights.
   */
  dtype?: DType;
  /**
   * The K/V cache's value type (default "bf16", on both backends): "f32", "bf16", "fp8" (e4m3),
   * "int8" or "int4". fp8 and int8 keep one f16 scale per token and K/V head for K and one for
   * V; int4 scales keys per channel over each 16-token page and values per token, and keeps the
   * page being written in bf16 (native/engine/kv_format.h, docs/cache.md; docs/quality.md has
   * their measured quality; both backends write the same codes and scales). The compact
   * types read a head in 32-bit words: bf16 needs an even head size, fp8 and int8 a multiple of
   * 4, int4 of 8 (a model with an odd head size defaults to f32). On CUDA every type needs a head
   * size of at most 128. A type the model cannot take is refused at load.
   */
  kvCacheDtype?: KvCacheDtype;
  /**
   * Tokens one sequence may hold (default: the model's max_position_embeddings, or what the K/V
   * pool holds of one sequence when that is less, with a notice on stderr). A maxContext the pool
   * cannot hold is refused.
   */
  maxContext?: number;
  /**
   * Bytes of the K/V pool that every sequence shares (default: room for 32 sequences of the full
   * context, at most 80% of free GPU memory or 25% of host memory). Only KV layers are cached,
   * so an LCKV model holds numLayers / kvLayers times the tokens of a standard one.
   */
  kvCacheMemory?: number;
  /** Requests that may wait for K/V pages at once (default 1024); the next fails with LCKV_QUEUE_FULL. */
  maxQueue?: number;
  /** Milliseconds a request may wait for K/V pages (default Infinity: no limit; at most 2^31 - 1); then LCKV_KV_CACHE_FULL. */
  queueTimeout?: number;
  /**
   * Sequences one decode step may run (default 256 on every device: throughput). Up to 16 rows
   * the GPU's matrix products are hand-written GEMVs (one kernel for a single row, a tensor-core
   * one for 2 to 16); larger batches of bf16 weights go through cuBLASLt on bf16 activations
   * (faster per token at high batch). A sequence's logits may differ in the last bits from its
   * logits alone: through the GEMV kernel that a batch of one takes, above 16 rows through
   * cuBLASLt, whose results depend on the batch (a greedy token may change with them where two
   * are that close), and at any batch size through the attention's split of long contexts,
   * which follows the batch size. `maxBatch: 16` keeps the GPU's decode steps on the GEMVs, where
   * a sequence's greedy tokens are tested to be the same alone and in a batch (batch invariance),
   * at the cost of throughput above 16 concurrent sequences. (A step that also carries a chunk
   * of a prompt, a model without a cyclic group's mixed step, has more rows whatever maxBatch.)
   */
  maxBatch?: number;
  /** CPU threads (default: all cores). */
  threads?: number;
  /**
   * Record each decode step as a CUDA graph and replay it (default true). false runs every op
   * as its own launch, like vLLM's enforce_eager: slower, the same tokens. Ignored on the CPU.
   */
  cudaGraphs?: boolean;
  /**
   * Queue each decode step's successor on the GPU before its tokens reach JavaScript (default
   * true), so the GPU does not wait for the host between steps: the next step, fed on the device
   * with the tokens just chosen, is used when the next call continues the same batch, and
   * thrown away otherwise. The same tokens either way. Needs cudaGraphs; rows with a repetition
   * penalty do not run ahead. Ignored on the CPU.
   */
  runAhead?: boolean;
  /** Called with the fraction of weights loaded, from 0 to 1. */
  onProgress?: (fraction: number) => void;
  /** Finished requests kept for prefix reuse (default 8; 0 turns reuse off). */
  prefixCache?: number;
  /**
   * The branch, tag or commit of a model given by hub id (default: the id's "@revision", else
   * "main"). Only for a hub id: with a local directory it is an error.
   */
  revision?: string;
  /**
   * Called as a model given by hub id downloads: bytes of its files held so far, of `total`, and
   * the file being fetched. Not called when the cache already holds the model.
   */
  onDownloadProgress?: (done: number, total: number, file: string) => void;
  /**
   * Stops the load (AbortError, LCKV_ABORTED): a download from the hub, whose fetched bytes stay
   * in the cache and are resumed by the next call, or the upload of the weights.
   */
  signal?: AbortSignal;
}

/**
 * An end or start token the model has no row for is a ConfigError naming its file: an end token
 * no step can sample would never end a reply, a start token would fail only at the first prompt.
 */
function refuseSpecialIdsPastVocabulary(config: ModelConfig, configFile: string, generation: Record<string, unknown>, genFile: string): void {
  const fields: [string, string, number[]][] = [
    [configFile, "eos_token_id", config.eosTokenIds],
    [configFile, "bos_token_id", config.bosTokenId === null ? [] : [config.bosTokenId]],
    [genFile, "eos_token_id", generationTokenIds(generation, "eos_token_id")],
    [genFile, "bos_token_id", generationTokenIds(generation, "bos_token_id")],
  ];
  for (const [file, field, ids] of fields) {
    const past = ids.find((id) => id >= config.vocabSize);
    if (past !== undefined) throw new ConfigError(file, field, `holds ${past}, outside the vocabulary [0, ${config.vocabSize}) of config.json's vocab_size`);
  }
}

/** The model shipped inside the package, used when loadModel() gets no directory. */
export const DEFAULT_MODEL_DIR = path.join(__dirname, "..", "models", "default");

const LOAD_KEYS = new Set(["device", "dtype", "kvCacheDtype", "maxContext", "kvCacheMemory", "threads", "cudaGraphs", "runAhead", "onProgress", "prefixCache", "maxQueue", "queueTimeout", "maxBatch", "revision", "onDownloadProgress", "signal"]);
/** Without kvCacheMemory, the pool holds this many sequences of the full context... */
const DEFAULT_POOL_SEQUENCES = 32;
/** ...but at most this share of free GPU memory (after the weights) or of host memory. */
const DEFAULT_POOL_GPU_SHARE = 0.8;
const DEFAULT_POOL_HOST_SHARE = 0.25;
let cpuNoticeShown = false;
/** Most CPU threads a model may ask for: past this, starting them is what fails. */
const MAX_THREADS = 1024;

/**
 * Loads a model: `dir` is a Hugging Face model directory, or a hub id ("org/name[@revision]")
 * that names no local path, downloaded into the Hugging Face cache unless it holds it already
 * (see resolveModel); without `dir`, the embedded default model.
 */
export async function loadModel(dir?: string, options: LoadOptions = {}): Promise<Model> {
  if (options === null || typeof options !== "object" || Array.isArray(options)) throw new InvalidOptionError("options", `must be an object, got ${describe(options)}`);
  for (const k of Object.keys(options)) {
    if (!LOAD_KEYS.has(k)) throw new InvalidOptionError(k, `is not a loadModel option (known: ${[...LOAD_KEYS].join(", ")})`);
  }
  if (dir !== undefined && typeof dir !== "string") throw new InvalidOptionError("dir", `must be a model directory's path or a hub id (a string), got ${describe(dir)}`);
  // A hub id is resolved after every other option is checked, so that a bad option fails before
  // a download; any other path is checked here, as it always was.
  const hubId = dir !== undefined && !fs.existsSync(dir) && isHubModelId(dir) ? dir : undefined;
  let modelDir = path.resolve(dir ?? DEFAULT_MODEL_DIR);
  if (hubId === undefined) {
    if (!fs.existsSync(modelDir)) throw new ModelLoadError(`model directory ${modelDir} does not exist`, modelDir);
    if (!fs.statSync(modelDir).isDirectory()) {
      throw new ModelLoadError(`${modelDir} is a file, not a model directory (the directory that holds config.json)`, modelDir);
    }
    if (options.revision !== undefined) throw new InvalidOptionError("revision", `applies to a hub id only; ${modelDir} is a local directory`);
  }
  checkDownloadOptions({ revision: options.revision, progress: options.onDownloadProgress, signal: options.signal }, "onDownloadProgress");
  const device = options.device === undefined ? "auto" : options.device;
  if (!["auto", "cuda", "cpu"].includes(device)) throw new InvalidOptionError("device", `must be "auto", "cuda" or "cpu", got ${describe(device)}`);
  const dtype = options.dtype === undefined ? "auto" : options.dtype;
  if (!(DTYPES as readonly string[]).includes(dtype)) throw new InvalidOptionError("dtype", `must be "auto", "f32", "f16" or "bf16", got ${describe(dtype)}`);
  if (options.kvCacheDtype !== undefined && !isKvCacheDtype(options.kvCacheDtype)) throw new InvalidOptionError("kvCacheDtype", `must be one of ${KV_CACHE_DTYPES.map((t) => `"${t}"`).join(", ")}, got ${describe(options.kvCacheDtype)}`);
  if (options.threads !== undefined) posInt("threads", options.threads, MAX_THREADS);
  if (options.cudaGraphs !== undefined && typeof options.cudaGraphs !== "boolean") throw new InvalidOptionError("cudaGraphs", `must be true or false, got ${describe(options.cudaGraphs)}`);
  if (options.runAhead !== undefined && typeof options.runAhead !== "boolean") throw new InvalidOptionError("runAhead", `must be true or false, got ${describe(options.runAhead)}`);
  if (options.kvCacheMemory !== undefined) posInt("kvCacheMemory", options.kvCacheMemory);
  if (options.maxContext !== undefined) posInt("maxContext", options.maxContext);
  if (options.onProgress !== undefined && typeof options.onProgress !== "function") throw new InvalidOptionError("onProgress", "must be a function");
  const prefixCache = options.prefixCache === undefined ? 8 : nonNegInt("prefixCache", options.prefixCache);
  const maxQueue = options.maxQueue === undefined ? 1024 : nonNegInt("maxQueue", options.maxQueue);
  // setTimeout takes at most 2^31 - 1 ms (a larger delay fires at once): no limit is Infinity.
  const queueTimeout = options.queueTimeout === undefined || options.queueTimeout === Infinity ? Infinity : nonNegInt("queueTimeout", options.queueTimeout, INT32_MAX);
  const maxBatch = options.maxBatch === undefined ? undefined : posInt("maxBatch", options.maxBatch, INT32_MAX);

  const addon = loadAddon();
  let backend: "cpu" | "cuda" = "cpu";
  const why = addon.backends.cudaBuilt ? addon.backends.cudaProblem ?? "no usable CUDA device" : "this build of lckv has no CUDA backend";
  if (device === "cuda") {
    if (!addon.backends.cuda) throw new DeviceUnavailableError(`device 'cuda' was asked for, but ${why}`);
    backend = "cuda";
  } else if (device === "auto" && addon.backends.cuda) {
    backend = "cuda";
  } else if (device === "auto" && !cpuNoticeShown && !process.env.LCKV_QUIET) {
    cpuNoticeShown = true;
    process.stderr.write(`lckv: running on the CPU (${why})\n`);
  }
  // More threads than cores is allowed (a container may see fewer cores than it gets), but said.
  const cores = os.availableParallelism();
  if (backend === "cpu" && options.threads !== undefined && options.threads > cores && !process.env.LCKV_QUIET) {
    process.stderr.write(`lckv: threads is ${options.threads}, more than the ${cores} cores this process may use: the extra threads share them\n`);
  }
  // The CPU computes in f32; with "bf16"/"f16" it rounds the weights to that type first, which
  // makes it the exact reference for a GPU that holds its weights in that type. By default it
  // keeps each weight in its checkpoint's dtype ("checkpoint"), widening as it reads: the values
  // of "f32" in the memory of the file.
  const weightDtype = dtype === "auto" ? (backend === "cuda" ? "bf16" : "checkpoint") : dtype;
  if (hubId !== undefined) {
    modelDir = await resolveModel(hubId, { revision: options.revision, onProgress: options.onDownloadProgress, signal: options.signal });
  }
  const checkAbort = () => {
    if (options.signal?.aborted) throw new AbortError("loadModel aborted");
  };
  checkAbort();

  const configFile = path.join(modelDir, "config.json");
  if (!modelFileExists(configFile)) throw new ModelLoadError(`${modelDir}: missing config.json`, configFile);
  const config = parseConfig(readJson(configFile), configFile);
  const tokenizer = Tokenizer.fromDirectory(modelDir);
  const genFile = path.join(modelDir, "generation_config.json");
  const generationConfig = modelFileExists(genFile) ? parseGenerationConfig(readJson(genFile), genFile) : {};
  refuseSpecialIdsPastVocabulary(config, configFile, generationConfig, genFile);
  const tensors = readModelTensors(modelDir);
  const sources = resolveWeights(config, tensors, modelDir);
  noticeUnusedKvProjections(modelDir, tensors.keys(), new Set(sources.map((s) => s.sourceName)));

  let maxContext = options.maxContext ?? config.maxPositionEmbeddings;
  if (maxContext > config.maxPositionEmbeddings) {
    throw new InvalidOptionError("maxContext", `${maxContext} exceeds the model's max_position_embeddings (${config.maxPositionEmbeddings})`);
  }

  // The caller's own error from onProgress goes back to it as thrown, not as a fault of lckv.
  let callerError: { error: unknown } | undefined;
  const progress = (fraction: number) => {
    try {
      options.onProgress?.(fraction);
    } catch (error) {
      callerError = { error };
      throw error;
    }
  };
  let native: NativeModel;
  let kvCacheDtype: KvCacheDtype;
  try {
    native = new addon.NativeModel(describeForNative(config), { backend, threads: options.threads, dtype: weightDtype, cudaGraphs: options.cudaGraphs ?? true, runAhead: options.runAhead ?? true });
  } catch (e) {
    throw fromNative(e);
  }
  try {
    kvCacheDtype = kvCacheDtypeFor(native, options.kvCacheDtype, config, configFile);
    // The page's bytes come from the engine's layout (scales and alignment included).
    const pageBytes = native.kvPageBytes(kvCacheDtype, KV_PAGE_TOKENS);
    const perToken = pageBytes / KV_PAGE_TOKENS;
    if (options.kvCacheMemory !== undefined && options.kvCacheMemory < pageBytes) {
      throw new InvalidOptionError("kvCacheMemory", `${options.kvCacheMemory} bytes hold no K/V page (one page of ${KV_PAGE_TOKENS} tokens needs ${pageBytes} in ${kvCacheDtype})`);
    }
    const total = sources.reduce((a, s) => a + s.nbytes, 0);
    let done = 0;
    progress(0);
    // Batches of ~64 MB keep the progress moving without a call per tensor.
    for (let i = 0; i < sources.length; ) {
      const batch = [];
      let bytes = 0;
      while (i < sources.length && (batch.length === 0 || bytes < 64 << 20)) {
        bytes += sources[i].nbytes;
        batch.push(sources[i++]);
      }
      checkAbort();
      await native.loadTensors(batch);
      done += bytes;
      progress(total > 0 ? done / total : 1);
    }
    // An abort during the last batch (all of a small model's weights) is seen too.
    checkAbort();
    native.finalize();
    let poolBytes = options.kvCacheMemory;
    if (poolBytes === undefined) {
      const mem = native.memoryInfo();
      const cap = backend === "cuda" ? mem.free * DEFAULT_POOL_GPU_SHARE : os.totalmem() * DEFAULT_POOL_HOST_SHARE;
      poolBytes = Math.max(pageBytes, Math.min(DEFAULT_POOL_SEQUENCES * maxContext * perToken, cap));
    }
    const pages = Math.floor(poolBytes / pageBytes);
    if (pages > INT32_MAX) {
      throw new InvalidOptionError("kvCacheMemory", `${poolBytes} bytes are ${pages} K/V pages of ${pageBytes} bytes; the pool holds at most ${INT32_MAX} pages`);
    }
    native.createPool(pages, KV_PAGE_TOKENS, kvCacheDtype);
    // One sequence cannot hold more than the whole pool, unless every layer reads through a
    // sliding window: then it holds its window's pages only, and only a prompt (prefilled at
    // once) must fit in the pool, which admission checks per request.
    // (An int4 cache's sequence also holds its residual's pages.)
    const residualPages = native.poolStats().residualPages;
    const poolTokens = (pages - residualPages) * KV_PAGE_TOKENS;
    if (poolTokens < KV_PAGE_TOKENS) {
      throw new InvalidOptionError("kvCacheMemory", `${poolBytes} bytes are ${pages} K/V pages of ${pageBytes} bytes, and a sequence needs ${residualPages + 1} (a page of tokens${residualPages > 0 ? " and its int4 residual's pages" : ""})`);
    }
    if (!config.plan.window.every((w) => w > 0) && poolTokens < maxContext) {
      // A context asked for is kept or refused, never cut in silence; the model's own is cut to
      // the pool, and said so.
      const pool = `the K/V pool (${poolBytes} bytes${options.kvCacheMemory === undefined ? ", the default" : ""}) holds ${poolTokens} tokens of one sequence`;
      if (options.maxContext !== undefined) throw new InvalidOptionError("maxContext", `${maxContext} tokens do not fit: ${pool}; raise kvCacheMemory (lckv --kv-cache-memory) or ask for at most ${poolTokens}`);
      if (!process.env.LCKV_QUIET) process.stderr.write(`lckv: the context is ${poolTokens} tokens, not the model's ${maxContext}: ${pool} (kvCacheMemory, lckv --kv-cache-memory, sets its size)\n`);
      maxContext = poolTokens;
    }
    checkAbort();
  } catch (e) {
    native.dispose();
    if (callerError && e === callerError.error) throw e;
    throw fromNative(e);
  }
  return Model.create(modelDir, config, native, tokenizer, generationConfig, maxContext, kvCacheDtype, prefixCache, { maxQueue, queueTimeout }, maxBatch);
}

const unusedKvNoticed = new Set<string>();
/**
 * A checkpoint with K/V projections for layers that layer_types makes read another layer's K/V
 * (a standard checkpoint given a condensed pattern) loads, but those weights go unused and the
 * model is not the one trained: said (once a directory), as transformers says of unused weights.
 */
function noticeUnusedKvProjections(dir: string, names: Iterable<string>, used: Set<string>): void {
  if (process.env.LCKV_QUIET || unusedKvNoticed.has(dir)) return;
  const layers = new Set<number>();
  for (const n of names) {
    const m = /(?:^|\.)layers\.(\d+)\.self_attn\.[kv]_proj\./.exec(n);
    if (m && !used.has(n)) layers.add(Number(m[1]));
  }
  if (layers.size === 0) return;
  const list = [...layers].sort((a, b) => a - b).join(", ");
  unusedKvNoticed.add(dir);  // once a directory: a benchmark loads the same model many times
  process.stderr.write(`lckv: ${dir}: the K/V projections of layers ${list} are not used: layer_types makes those layers read another layer's K/V (a checkpoint trained with this layer_types has none)\n`);
}

/**
 * The K/V cache's type: the one asked for, else the default, else f32 (a head size the default
 * cannot take), checked against the model's head size and the backend's kernels now rather than
 * at the first step. A head size no type can run on this backend is config.json's problem
 * (head_dim); one that only some types cannot take is the option's, which is told the types that
 * work.
 */
function kvCacheDtypeFor(native: NativeModel, asked: KvCacheDtype | undefined, config: ModelConfig, configFile: string): KvCacheDtype {
  const problems = new Map(KV_CACHE_DTYPES.map((t) => [t, native.kvTypeProblem(t)]));
  const usable = KV_CACHE_DTYPES.filter((t) => problems.get(t) === null);
  if (usable.length === 0) {
    throw new ConfigError(configFile, "head_dim", `head size ${config.headDim} cannot run on ${native.backend}: ${problems.get("f32")}`);
  }
  const type = asked ?? (usable.includes(DEFAULT_KV_CACHE_DTYPE) ? DEFAULT_KV_CACHE_DTYPE : "f32");
  const problem = problems.get(type);
  if (problem) {
    throw new InvalidOptionError("kvCacheDtype", `"${type}" cannot hold this model's K/V on ${native.backend}: ${problem}; this model takes ${usable.map((t) => `"${t}"`).join(", ")}`);
  }
  return type;
}

function describeForNative(c: ModelConfig): NativeModelDescription {
  return {
    style: c.blockStyle,
    numLayers: c.numLayers,
    hidden: c.hiddenSize,
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    intermediate: c.intermediateSize,
    vocab: c.vocabSize,
    maxPositions: c.blockStyle === "gpt2" ? c.maxPositionEmbeddings : 0,
    normEps: c.normEps,
    tiedEmbeddings: c.tieWordEmbeddings,
    attentionBias: c.attentionBias,
    mlpBias: c.mlpBias,
    ropeInvFreq: c.ropeInvFreq,
    plan: {
      target: c.plan.target,
      strict: c.plan.strict.map((s) => (s ? 1 : 0)),
      window: c.plan.window,
      kvLayers: c.plan.kvLayers,
      cyclicLow: c.plan.cyclicGroup?.low ?? -1,
      cyclicHigh: c.plan.cyclicGroup?.high ?? -1,
    },
  };
}
