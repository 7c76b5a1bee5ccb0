/** Loads the native addon (a prebuild, or the local cmake-js build) and types its surface. */
import * as path from "node:path";
import { AddonLoadError } from "./errors";
import type { KvCacheDtype } from "./kv-cache-dtype";

export interface NativeSamplingParams {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
  seed: number;
  /** OpenAI's penalties (0 = off), over the sequence's tokens from index penaltyFrom on. */
  presencePenalty?: number;
  frequencyPenalty?: number;
  penaltyFrom?: number;
  /** Added to the logits of these token ids. */
  logitBias?: { tokens: Int32Array; values: Float32Array };
  /** -1 or absent: none; 0: the chosen token's log-probability; k: also the k most likely. */
  logprobs?: number;
}

/** A choice's log-probabilities (natural log), the top tokens most likely first. */
export interface NativeTokenLogprobs {
  logprob: number;
  topTokens: Int32Array;
  topLogprobs: Float64Array;
}

/** decodeBatch()'s tokens, one per sampled row; `logprobs` only when some row asked (null for the rows that did not). */
export interface NativeDecodedTokens extends Int32Array {
  logprobs?: (NativeTokenLogprobs | null)[];
}

export interface NativeAppendOptions {
  mode: "fixed-point" | "sequential" | "iterative";
  passes?: number;
  tolerance?: number;
  logits: "none" | "last" | "all";
  sample?: NativeSamplingParams;
  /** Element 0 set non-zero (from this thread, while the call runs) stops the prefill: LCKV_ABORTED. */
  cancel?: Int32Array;
}

export interface NativeAppendResult {
  passes: number;
  length: number;
  logits?: Float32Array;
  token?: number;
  /** The sampled token's, when the sampling asked for logprobs. */
  logprobs?: NativeTokenLogprobs;
}

export interface NativeSequence {
  append(tokens: Int32Array, opts: NativeAppendOptions): Promise<NativeAppendResult>;
  truncate(n: number): void;
  /**
   * The largest m <= n to which truncate(m) rewinds with the K/V exact: n, unless an int4 cache
   * would read the rows of m's page back from their codes (a rewind into a quantized page).
   */
  exactRewind(n: number): number;
  /**
   * An int4 sequence that ends mid-page keeps a copy of its residual (the page's rows in bf16),
   * so that truncate() back to its length stays exact after later writes quantized the page:
   * a prompt of several chunks that fails part way rewinds exactly. No-op for other types.
   */
  checkpointResidual(): void;
  dropResidualCheckpoint(): void;
  fork(): NativeSequence;
  dispose(): void;
  /**
   * Promises the pages needed to grow to totalTokens plus extraPages (a context shift's copies;
   * nothing to grow and none extra drops the promise); throws LCKV_KV_CACHE_FULL. decodeFrom:
   * past that many tokens the growth is decoding, so a model whose every layer is windowed
   * promises only the pages its window holds there, refilled as the window releases pages.
   */
  reserve(totalTokens: number, extraPages?: number, decodeFrom?: number): void;
  /** Context shift: drops tokens [sink, sink + drop) (whole pages); resolves with the new length. */
  shift(sink: number, drop: number): Promise<number>;
  /** The pages reserve() with these arguments would promise. */
  pagesToReserve(totalTokens: number, extraPages?: number, decodeFrom?: number): number;
  /** Pages shift(sink, drop) would take beyond those it frees (copies of shared pages it rewrites). */
  pagesToShift(sink: number, drop: number): number;
  /** K then V of KV slot `slot` at positions [start, start + n), decoded from the cache's type (2 n kvDim floats). */
  readKv(slot: number, start: number, n: number): Float32Array;
  /** Marks the sequence's pages as held for prefix reuse (for the pool's "cached" count). */
  setCached(cached: boolean): void;
  readonly reservedPages: number;
  readonly length: number;
  /** Bytes of the pages this sequence holds (shared pages count in every holder). */
  readonly kvBytes: number;
}

/** The K/V pool's pages, as model.cacheStats() reports them. */
export interface KvPoolStats {
  /** Positions per page. */
  pageTokens: number;
  pageBytes: number;
  pagesTotal: number;
  /** Pages held by at least one sequence (including the prefix cache's). */
  pagesUsed: number;
  pagesFree: number;
  /** Pages held only by finished requests kept for prefix reuse (evicted first when short). */
  pagesCached: number;
  /** Pages promised to running requests and not yet written. */
  pagesReserved: number;
  /** Pages each sequence's residual takes (the bf16 page being written of an int4 cache); 0 for other types. */
  residualPages: number;
}

export interface NativePoolStats extends KvPoolStats {
  /** Page references beyond the first (pages shared by forks). */
  sharedRefs: number;
}

export interface NativeModelDescription {
  style: "llama" | "gpt2";
  numLayers: number;
  hidden: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  intermediate: number;
  vocab: number;
  maxPositions: number;
  normEps: number;
  tiedEmbeddings: boolean;
  attentionBias: boolean;
  mlpBias: boolean;
  ropeInvFreq: number[];
  plan: { target: number[]; strict: number[]; window: number[]; kvLayers: number[]; cyclicLow: number; cyclicHigh: number };
}

export interface NativeModel {
  loadTensors(list: object[]): Promise<void>;
  /**
   * One step of every sequence: row r appends tokens[r] and, for r < sampling.length, samples its
   * next token (one result per sampling entry); later rows only append (a prompt's tokens).
   * runAhead (default true): false when the next call will not continue this batch. rows (absent:
   * one each): each sequence's number of tokens, consecutive in `tokens`; more than one only for
   * an unsampled sequence of a model without a cyclic layer group (a prompt's chunk in a mixed step).
   */
  decodeBatch(seqs: NativeSequence[], tokens: Int32Array, sampling: NativeSamplingParams[], runAhead?: boolean, rows?: Int32Array): Promise<NativeDecodedTokens>;
  finalize(): void;
  createSequence(maxContext: number): NativeSequence;
  /** kvType: the cache's value type (default "f32"). */
  createPool(pages: number, pageTokens: number, kvType?: KvCacheDtype): void;
  /** Bytes of one K/V page of this model in `kvType` (scales and alignment included). */
  kvPageBytes(kvType: KvCacheDtype, pageTokens: number): number;
  /** Why this model cannot keep its K/V in `kvType` on its backend (its head size), or null when it can. */
  kvTypeProblem(kvType: KvCacheDtype): string | null;
  poolStats(): NativePoolStats;
  /** "" when every page's reference count matches the live page tables, else the first mismatch. */
  auditPool(): string;
  /**
   * Free and total device memory in bytes (0, 0 on the CPU), the decode-step graphs the backend
   * keeps, how often it replayed them and how many it recorded in all, and the decode steps run
   * ahead that a call used or threw away.
   */
  memoryInfo(): { free: number; total: number; stepGraphs: number; stepGraphReplays: number; stepGraphRecordings: number; runAheadSteps: number; runAheadDiscarded: number };
  dispose(): void;
  readonly weightBytes: number;
  readonly backend: string;
}

export interface NativeAddon {
  /** dtype: "f32", "f16", "bf16", or "checkpoint" (the CPU only: each weight in its checkpoint's dtype). */
  NativeModel: new (desc: NativeModelDescription, opts: { backend: string; threads?: number; dtype?: string; cudaGraphs?: boolean; runAhead?: boolean }) => NativeModel;
  /** cuda: built and a device is usable; cudaBuilt: compiled in; cudaProblem: why it is unusable. */
  backends: { cpu: boolean; cuda: boolean; cudaBuilt: boolean; cudaProblem?: string };
  version: string;
  /**
   * Every backend op against the CPU backend on fresh random inputs (tests only). `ops`: the op
   * names to check (absent or empty: all); a name also selects the ops named "<name> <part>"
   * ("linears" selects "linears q"), and a name that selects nothing is refused. Each case passes
   * when relErr <= its `tolerance`.
   */
  checkBackendOps(opts: { backend: "cpu" | "cuda"; dtype: "f32" | "f16" | "bf16"; seed: number; ops?: string[] }): {
    op: string;
    shape: string;
    relErr: number;
    tolerance: number;
    allWritten: boolean;
  }[];
  /**
   * The attention of one decode step alone (benchmarks): `sequences` queries, each at the last of
   * `context` tokens of its own K/V pages. ms: mean per call after a warm-up; bytes: what a call
   * must move (K and V of every visible key, the queries and the output).
   */
  benchAttention(opts: {
    backend: "cpu" | "cuda";
    sequences: number;
    context: number;
    numHeads: number;
    numKvHeads: number;
    headDim: number;
    iterations?: number;
    /** The cache's value type (default "f32"). */
    kvCacheDtype?: KvCacheDtype;
    /** Rows of each sequence at its last positions, causal (default 1, a decode step; more: a prompt's chunk). */
    queries?: number;
    /** The weights' type (default "f32"): with "bf16" a call of more than 16 rows writes a bf16 output, as the engine's does. */
    dtype?: "f32" | "bf16";
  }): { ms: number; bytes: number; flops: number };
  /**
   * Tests only: CPU backends of models loaded from then on queue their token choices as a GPU
   * does, so that decodeBatch's run-ahead page bookkeeping (early pages) runs on the CPU.
   */
  setCpuQueuedSampling(on: boolean): void;
}

let addon: NativeAddon | undefined;

export function loadAddon(): NativeAddon {
  if (addon) return addon;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const gypBuild = require("node-gyp-build") as (dir: string) => NativeAddon;
    addon = gypBuild(path.join(__dirname, ".."));
  } catch (e) {
    // The addon is built by lckv's install script, which an install can skip: npm with
    // --ignore-scripts, and pnpm 10, which runs a dependency's build only once it is approved.
    throw new AddonLoadError(
      `the lckv native addon could not be loaded (${(e as Error).message.replace(/\s+/g, " ").trim()}). It is built when lckv is installed, unless the ` +
        "install skipped install scripts (npm --ignore-scripts; pnpm 10 until 'pnpm approve-builds' allows lckv's). " +
        "Build it with 'npm rebuild lckv --build-from-source' (needs CMake 3.18 or newer, a C++17 compiler, and for the " +
        "GPU backend the CUDA toolkit with cuBLASLt)",
      e,
    );
  }
  return addon!;
}
