/**
 * Typed errors. Every error lckv throws is an LckvError with a stable `code`; the subclasses say
 * what kind of thing went wrong and carry the file, field or option it concerns.
 */
export class LckvError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A model directory, file or tensor is missing or malformed. */
export class ModelLoadError extends LckvError {
  readonly file?: string;
  constructor(message: string, file?: string, code = "LCKV_MODEL_LOAD", options?: { cause?: unknown }) {
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

/** An option passed to lckv is invalid. */
export class InvalidOptionError extends LckvError {
  readonly option: string;
  constructor(option: string, message: string) {
    super("LCKV_INVALID_OPTION", `option '${option}': ${message}`);
    this.option = option;
  }
}

/** Input (text or token ids) that the model cannot take. */
export class InvalidInputError extends LckvError {
  constructor(message: string, code = "LCKV_INVALID_INPUT") {
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
  constructor(message: string) {
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

/** The native addon could not be loaded. */
export class AddonLoadError extends LckvError {
  constructor(message: string, cause?: unknown) {
    super("LCKV_ADDON_LOAD", message, { cause });
  }
}

/** Maps an error thrown by the native addon (which carries `code`) to a typed error. */
export function fromNative(e: unknown): LckvError {
  if (e instanceof LckvError) return e;
  const err = e as { code?: string; message?: string };
  const msg = err?.message ?? String(e);
  switch (err?.code) {
    case "LCKV_TOKEN_OUT_OF_RANGE":
      return new TokenOutOfRangeError(msg);
    case "LCKV_CONTEXT_OVERFLOW":
      return new ContextOverflowError(msg);
    case "LCKV_OUT_OF_MEMORY":
      return new OutOfMemoryError(msg);
    case "LCKV_DISPOSED":
      return new DisposedError(msg.replace(/ has been disposed$/, ""));
    case "LCKV_WEIGHTS":
    case "LCKV_IO":
      return new ModelLoadError(msg, undefined, err.code);
    case "LCKV_DEVICE_UNAVAILABLE":
      return new DeviceUnavailableError(msg);
    case "LCKV_KV_CACHE_FULL":
      return new KvCacheFullError(msg);
    case "LCKV_ABORTED":
      return new AbortError(msg);
    case "LCKV_INVALID_ARGUMENT":
      // A request the engine refused (a rewind into K/V a window released, say): its message says what.
      return new InvalidInputError(msg, err.code);
    default:
      return new LckvError(err?.code ?? "LCKV_INTERNAL", msg, { cause: e });
  }
}
