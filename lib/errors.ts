import type { EngineErrorCode, ErrorCode } from "./error-codes";

/**
 * Typed errors. Every error lckv throws is an LckvError with a stable `code`; the subclasses say
 * what kind of thing went wrong and carry the file, field or option it concerns.
 */
export class LckvError extends Error {
  /** One of ERROR_CODES (lib/error-codes.json lists each with its meaning). */
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A model directory, file or tensor is missing or malformed. */
export class ModelLoadError extends LckvError {
  readonly file?: string;
  constructor(message: string, file?: string, code: ErrorCode = "LCKV_MODEL_LOAD", options?: { cause?: unknown }) {
    super(code, message, options);
    this.file = file;
  }
}

/** A safetensors file whose header or data does not hold together. */
export class SafetensorsError extends ModelLoadError {
  readonly tensor?: string;
  constructor(file: string, message: string, tensor?: string) {
    super(`${file}: ${tensor ? `tensor '${tensor}': ` : ""}${message}`, file, "LCKV_SAFETENSORS");
    this.tensor = tensor;
  }
}

/** config.json (or another JSON config) has a missing, mistyped or inconsistent field. */
export class ConfigError extends ModelLoadError {
  readonly field: string;
  constructor(file: string, field: string, message: string) {
    super(`${file}: field '${field}': ${message}`, file, "LCKV_CONFIG");
    this.field = field;
  }
}

/** The model's architecture is not one lckv runs. */
export class UnsupportedArchitectureError extends ModelLoadError {
  readonly architecture: string;
  constructor(file: string, architecture: string, supported: readonly string[]) {
    super(
      `${file}: architecture '${architecture}' is not supported; lckv runs: ${supported.join(", ")}`,
      file,
      "LCKV_UNSUPPORTED_ARCHITECTURE",
    );
    this.architecture = architecture;
  }
}

/**
 * A model named by its Hugging Face hub id ("org/name") could not be had. `model` is the id,
 * `file` the file concerned (if any), and `code` says what went wrong:
 * - LCKV_MODEL_NOT_FOUND: the hub has no such model or revision (or it is private or gated and
 *   no token was given), or the model lacks a file lckv needs,
 * - LCKV_MODEL_NOT_CACHED: HF_HUB_OFFLINE is set and the cache does not hold the model,
 * - LCKV_DOWNLOAD_SIZE_MISMATCH: a file's downloaded size is not the size the hub reported,
 * - LCKV_DOWNLOAD_FAILED: the hub could not be reached, or failed to serve a file,
 * - LCKV_IO: the cache could not be written (a path in it is a file, not writable, or full).
 */
export class ModelHubError extends ModelLoadError {
  readonly model: string;
  constructor(
    model: string,
    message: string,
    code: "LCKV_MODEL_NOT_FOUND" | "LCKV_MODEL_NOT_CACHED" | "LCKV_DOWNLOAD_SIZE_MISMATCH" | "LCKV_DOWNLOAD_FAILED" | "LCKV_IO",
    file?: string,
    cause?: unknown,
  ) {
    super(message, file, code, cause === undefined ? undefined : { cause });
    this.model = model;
  }
}

/** An option passed to lckv is invalid. */
export class InvalidOptionError extends LckvError {
  readonly option: string;
  /** What is wrong with the value, without the option's name (for an interface that names it otherwise). */
  readonly detail: string;
  constructor(option: string, message: string) {
    super("LCKV_INVALID_OPTION", `option '${option}': ${message}`);
    this.option = option;
    this.detail = message;
  }
}

/** Input (text or token ids) that the model cannot take. */
export class InvalidInputError extends LckvError {
  constructor(message: string, code: ErrorCode = "LCKV_INVALID_INPUT") {
    super(code, message);
  }
}

/** A token id outside [0, vocabSize). */
export class TokenOutOfRangeError extends InvalidInputError {
  constructor(message: string) {
    super(message, "LCKV_TOKEN_OUT_OF_RANGE");
  }
}

/** More tokens than the context holds. */
export class ContextOverflowError extends InvalidInputError {
  /**
   * @param inputTokens where one input alone did not fit: its tokens, or (atLeast) how many a
   *   prefix of it already had (a text far past the context is not tokenized whole).
   */
  constructor(
    message: string,
    readonly inputTokens?: { count: number; atLeast: boolean },
  ) {
    super(message, "LCKV_CONTEXT_OVERFLOW");
  }
}

/** The model or sequence was used after dispose(). */
export class DisposedError extends LckvError {
  constructor(what: string) {
    super("LCKV_DISPOSED", `${what} has been disposed`);
  }
}

/** The requested device (or its backend) is not available in this process. */
export class DeviceUnavailableError extends LckvError {
  constructor(message: string) {
    super("LCKV_DEVICE_UNAVAILABLE", message);
  }
}

/** Memory ran out (host or device). The process and other models keep working. */
export class OutOfMemoryError extends LckvError {
  constructor(message: string) {
    super("LCKV_OUT_OF_MEMORY", message);
  }
}

/**
 * The K/V cache cannot hold what was asked. `code` says which case:
 * - LCKV_KV_CACHE_FULL: not now (other sequences hold the pages; waiting would have helped, or
 *   the wait for pages timed out),
 * - LCKV_REQUEST_TOO_LARGE: never, even with the whole pool to itself,
 * - LCKV_QUEUE_FULL: the queue of requests waiting for pages is at its bound (loadModel's `maxQueue`).
 */
export class KvCacheFullError extends LckvError {
  constructor(message: string, code: "LCKV_KV_CACHE_FULL" | "LCKV_REQUEST_TOO_LARGE" | "LCKV_QUEUE_FULL" = "LCKV_KV_CACHE_FULL") {
    super(code, message);
  }
}

/** A prefill stopped by its AbortSignal; the sequence is as it was before the call. */
export class AbortError extends LckvError {
  constructor(message: string) {
    super("LCKV_ABORTED", message);
  }
}

/** A sequence was used while a call on it was still running: await that call first. */
export class BusyError extends LckvError {
  constructor(message: string) {
    super("LCKV_BUSY", message);
  }
}

/** A CUDA or cuBLAS call failed, or the CUDA backend met a state it cannot go on from. */
export class CudaError extends LckvError {
  constructor(message: string) {
    super("LCKV_CUDA", message);
  }
}

/** A fault in lckv rather than in its input: an error that came with no code of its own. */
export class InternalError extends LckvError {
  constructor(message: string, cause?: unknown) {
    super("LCKV_INTERNAL", message, { cause });
  }
}

/** The native addon could not be loaded. */
export class AddonLoadError extends LckvError {
  constructor(message: string, cause?: unknown) {
    super("LCKV_ADDON_LOAD", message, { cause });
  }
}

// The typed error of each code the engine raises. Its type is the table's list of engine codes
// (error-codes.ts, from error-codes.json), so a code added there does not compile until it has
// its error here.
const fromEngine: { readonly [C in EngineErrorCode]: (message: string, native: unknown) => LckvError } = {
  // A request the engine refused (a rewind into K/V a window released, say): its message says what.
  LCKV_INVALID_ARGUMENT: (msg) => new InvalidInputError(msg, "LCKV_INVALID_ARGUMENT"),
  LCKV_WEIGHTS: (msg) => new ModelLoadError(msg, undefined, "LCKV_WEIGHTS"),
  LCKV_IO: (msg) => new ModelLoadError(msg, undefined, "LCKV_IO"),
  LCKV_OUT_OF_MEMORY: (msg) => new OutOfMemoryError(msg),
  LCKV_CONTEXT_OVERFLOW: (msg) => new ContextOverflowError(msg),
  LCKV_TOKEN_OUT_OF_RANGE: (msg) => new TokenOutOfRangeError(msg),
  LCKV_DISPOSED: (msg) => new DisposedError(msg.replace(/ has been disposed$/, "")),
  LCKV_BUSY: (msg) => new BusyError(msg),
  LCKV_KV_CACHE_FULL: (msg) => new KvCacheFullError(msg),
  LCKV_ABORTED: (msg) => new AbortError(msg),
  LCKV_CUDA: (msg) => new CudaError(msg),
  LCKV_DEVICE_UNAVAILABLE: (msg) => new DeviceUnavailableError(msg),
  LCKV_INTERNAL: (msg, native) => new InternalError(msg, native),
};

/**
 * Maps an error thrown by the native addon (which carries `code`) to a typed error.
 * @internal
 */
export function fromNative(e: unknown): LckvError {
  if (e instanceof LckvError) return e;
  const err = e as { code?: string; message?: string };
  const msg = err?.message ?? String(e);
  // An error without a code did not come from the engine's own checks: a fault in lckv.
  const code = err?.code ?? "LCKV_INTERNAL";
  if (Object.hasOwn(fromEngine, code)) return fromEngine[code as EngineErrorCode](msg, e);
  // A code the engine's table does not know (none should exist): a fault in lckv, said with it.
  return new InternalError(`${msg} (code ${code})`, e);
}
