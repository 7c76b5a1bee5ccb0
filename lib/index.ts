/**
 * lckv: run language models with layer-condensed KV caches from TypeScript.
 *
 *     import { loadModel } from "lckv";
 *     await using model = await loadModel();          // the embedded default model
 *     const r = await model.generate("Once upon a time", { maxNewTokens: 32 });
 */
export { loadModel, DEFAULT_MODEL_DIR } from "./load-model";
export type { LoadOptions, Device, DType } from "./load-model";
export { KV_CACHE_DTYPES, DEFAULT_KV_CACHE_DTYPE } from "./kv-cache-dtype";
export type { KvCacheDtype } from "./kv-cache-dtype";
export { resolveModel, isHubModelId } from "./hub";
export type { ResolveModelOptions } from "./hub";
export { Model, KV_PAGE_TOKENS, MAX_COMPLETIONS } from "./model";
export type { CacheStats } from "./model";
export type { KvPoolStats } from "./native";
export type { GenerateResult, StreamChunk, ForwardResult, PrefillOptions, TokenLogprob, TopLogprob, GenerationTimings } from "./types";
export type { GenerationStream } from "./generation-stream";
export { ChatSession } from "./chat-session";
export type { ChatSessionOptions } from "./chat-session";
export { createServer } from "./server/server";
export type { ServerOptions } from "./server/server";
export type { GenerateOptions, SamplingOptions, PrefillMode } from "./options";
export { FIXED_POINT_MAX_PASSES } from "./options";
export type { ModelConfig, BlockStyle } from "./config";
export { SUPPORTED_ARCHITECTURES } from "./config";
export type { KvPlan, LayerTypesSpec } from "./plan";
export { parseLayerTypes, buildPlan, formatLayerTypes } from "./plan";
export { Sequence } from "./sequence";
export type { SchedulerStats } from "./scheduler";
export type { PrefixCacheStats } from "./prefix-cache";
export { Tokenizer } from "./tokenizer";
export { evaluatePerplexity } from "./eval";
export type { PerplexityOptions, PerplexityResult } from "./eval";
export type { ChatMessage } from "./tokenizer";
export {
  LckvError,
  ModelLoadError,
  SafetensorsError,
  ConfigError,
  UnsupportedArchitectureError,
  ModelHubError,
  InvalidOptionError,
  InvalidInputError,
  TokenOutOfRangeError,
  ContextOverflowError,
  DisposedError,
  DeviceUnavailableError,
  OutOfMemoryError,
  KvCacheFullError,
  AbortError,
  BusyError,
  CudaError,
  InternalError,
  AddonLoadError,
} from "./errors";
export { ERROR_CODES } from "./error-codes";
export type { ErrorCode } from "./error-codes";
