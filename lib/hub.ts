/**
 * resolveModel(): a model named by its Hugging Face hub id ("org/name", or "org/name@revision")
 * becomes a local directory that loadModel() reads, downloaded through @huggingface/hub.
 *
 * The cache has huggingface_hub's layout and honours its variables (HF_HUB_CACHE, HF_HOME,
 * HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE), so that a model downloaded from Python is found here and
 * one downloaded here is found from Python:
 *   <cache>/models--org--name/blobs/<etag>             the files' bytes, named by the hub's etag
 *   <cache>/models--org--name/snapshots/<commit>/<f>   relative symlinks into blobs/
 *   <cache>/models--org--name/refs/<revision>          the commit a branch or tag resolved to
 *   <cache>/models--org--name/.no_exist/<commit>/<f>   optional files the commit does not have
 * A revision whose snapshot holds every file is served from the cache without asking the hub.
 * A blob is written as <etag>.incomplete, continued from its size after an interruption, and
 * renamed to its final name only once its size is the size the hub reported. One call at a time
 * writes a blob, in this process or another (a lock file under <cache>/.locks/, as huggingface_hub
 * keeps its own); links and refs are written under names of their own and renamed into place.
 */
import * as fs from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { Readable } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
// Loaded on the first hub id only: a local directory never pays for requiring the library.
import type { ListFileEntry } from "@huggingface/hub";
type HubLibrary = typeof import("@huggingface/hub");
import { AbortError, InvalidOptionError, LckvError, ModelHubError } from "./errors";
import { describe } from "./options";

export interface ResolveModelOptions {
  /** Branch, tag or commit (default: the id's "@revision", else "main"). */
  revision?: string;
  /** Called as bytes arrive: bytes of the model's files held so far, of `total`, and the file being fetched. */
  onProgress?: (done: number, total: number, file: string) => void;
  /** Stops the download (AbortError, LCKV_ABORTED); what was fetched stays and is resumed next time. */
  signal?: AbortSignal;
}

/** "org/name" with an optional "@revision"; a leading "." or "/" makes a string a path instead. */
const HUB_ID = /^([A-Za-z0-9][\w.-]*\/[A-Za-z0-9][\w.-]*)(?:@(.+))?$/;
const COMMIT = /^[0-9a-f]{40}$/;
const DEFAULT_ENDPOINT = "https://huggingface.co";
const REQUIRED_FILES = ["config.json", "tokenizer.json"];
const OPTIONAL_FILES = ["generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"];
const WEIGHTS = "model.safetensors";
const WEIGHTS_INDEX = "model.safetensors.index.json";

/** Whether `s` has the form of a hub id (it may still name a local path: resolveModel checks the disk first). */
export function isHubModelId(s: string): boolean {
  return HUB_ID.test(s);
}

/** Where the hub is and how to reach it, from huggingface_hub's variables, read at each call. */
interface HubSettings {
  endpoint: string;
  cacheDir: string;
  token?: string;
  offline: boolean;
  /** Seconds to wait for a response's headers (HF_HUB_ETAG_TIMEOUT), and for the next bytes of its body (HF_HUB_DOWNLOAD_TIMEOUT). */
  headerTimeout: number;
  bodyTimeout: number;
}

/** huggingface_hub's default for both timeouts, in seconds. */
const DEFAULT_TIMEOUT_S = 10;

function timeoutSetting(name: string): number {
  const v = process.env[name];
  if (v === undefined || v.trim() === "") return DEFAULT_TIMEOUT_S;
  const s = Number(v);
  if (!Number.isFinite(s) || s <= 0) throw new InvalidOptionError(name, `must be a number of seconds above 0, got '${v}'`);
  return s;
}

function hubSettings(hf: HubLibrary): HubSettings {
  const env = process.env;
  const hfHome = env.HF_HOME ?? path.join(env.XDG_CACHE_HOME ?? path.join(os.homedir(), ".cache"), "huggingface");
  // The token `huggingface-cli login` stores, as huggingface_hub reads it when HF_TOKEN is unset.
  let token = env.HF_TOKEN || env.HUGGING_FACE_HUB_TOKEN || undefined;
  if (!token) {
    try {
      token = fs.readFileSync(env.HF_TOKEN_PATH ?? path.join(hfHome, "token"), "utf8").trim() || undefined;
    } catch {
      // no stored token: anonymous access
    }
  }
  const endpoint = (env.HF_ENDPOINT || DEFAULT_ENDPOINT).replace(/\/+$/, "");
  let protocol: string | undefined;
  try {
    protocol = new URL(endpoint).protocol;
  } catch {
    // not a URL: said below
  }
  if (protocol !== "http:" && protocol !== "https:") {
    throw new InvalidOptionError("HF_ENDPOINT", `must be the hub's http(s) URL, such as ${DEFAULT_ENDPOINT}, got '${env.HF_ENDPOINT}'`);
  }
  return {
    endpoint,
    // getHFHubCachePath reads HF_HUB_CACHE, then HF_HOME, then XDG_CACHE_HOME: huggingface_hub's order.
    cacheDir: hf.getHFHubCachePath(),
    token,
    offline: ["1", "ON", "YES", "TRUE"].includes((env.HF_HUB_OFFLINE ?? "").toUpperCase()),
    headerTimeout: timeoutSetting("HF_HUB_ETAG_TIMEOUT"),
    bodyTimeout: timeoutSetting("HF_HUB_DOWNLOAD_TIMEOUT"),
  };
}

/**
 * Checks the download options' types before anything is fetched. `progressName` is the progress
 * callback's name where the caller takes it (loadModel's onDownloadProgress is resolveModel's onProgress).
 * @internal
 */
export function checkDownloadOptions(o: { revision?: unknown; progress?: unknown; signal?: unknown }, progressName: string): void {
  if (o.revision !== undefined && (typeof o.revision !== "string" || o.revision === "")) {
    throw new InvalidOptionError("revision", `must be a branch, tag or commit (a non-empty string), got ${describe(o.revision)}`);
  }
  if (o.progress !== undefined && typeof o.progress !== "function") throw new InvalidOptionError(progressName, "must be a function");
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new InvalidOptionError("signal", `must be an AbortSignal, got ${describe(o.signal)}`);
}

// A mistyped local path has a hub id's form too (models/mine): an error about the id, before
// any file of it was found, says that no such directory was found either.
const NOT_LOCAL = "; nor is it a local directory";

/**
 * Returns a local directory for `idOrDir`: an existing path, or anything that is not a hub id, is
 * returned as it is (loadModel reports a missing directory); a hub id is resolved to its snapshot
 * directory in the cache, downloaded first unless the cache holds it.
 */
export async function resolveModel(idOrDir: string, options: ResolveModelOptions = {}): Promise<string> {
  if (typeof idOrDir !== "string") throw new InvalidOptionError("model", "must be a directory or a hub id (a string)");
  if (options === null || typeof options !== "object") throw new InvalidOptionError("options", "must be an object");
  checkDownloadOptions({ revision: options.revision, progress: options.onProgress, signal: options.signal }, "onProgress");
  const m = fs.existsSync(idOrDir) ? null : HUB_ID.exec(idOrDir);
  if (!m) {
    if (options.revision !== undefined) throw new InvalidOptionError("revision", `applies to a hub id only; '${idOrDir}' is a local path`);
    return idOrDir;
  }
  const id = m[1];
  if (m[2] !== undefined && options.revision !== undefined && m[2] !== options.revision) {
    throw new InvalidOptionError("revision", `'${options.revision}' differs from the revision in '${idOrDir}'`);
  }
  const revision = options.revision ?? m[2] ?? "main";
  if (!revision || revision.split("/").some((part) => part === "" || part === "." || part === "..")) {
    throw new InvalidOptionError("revision", `'${revision}' is not a branch, tag or commit`);
  }
  const hf = await import("@huggingface/hub");
  const hub = hubSettings(hf);
  const repoDir = path.join(hub.cacheDir, `models--${id.replace("/", "--")}`);
  if (hub.offline) {
    const snapshot = cachedSnapshot(repoDir, revision, false);
    if (snapshot) return snapshot;
    throw new ModelHubError(id, `model '${id}' (revision '${revision}') is not in the cache ${hub.cacheDir}, and HF_HUB_OFFLINE is set${NOT_LOCAL}`, "LCKV_MODEL_NOT_CACHED");
  }
  const snapshot = cachedSnapshot(repoDir, revision, true);
  if (snapshot) return snapshot;
  try {
    return await new Download(hf, id, revision, hub, repoDir, options).run();
  } catch (e) {
    // As huggingface_hub does: when the hub cannot be reached, a complete cached snapshot serves.
    const fallback = e instanceof ModelHubError && e.code === "LCKV_DOWNLOAD_FAILED" ? cachedSnapshot(repoDir, revision, false) : undefined;
    if (fallback) return fallback;
    throw e;
  }
}

/**
 * The snapshot directory of `revision` if the cache holds the model's files: config.json, the
 * tokenizer and every weights file. `strict` also asks that each optional file be either there
 * or recorded in .no_exist/ (a snapshot written by another tool may lack them); offline, what is
 * there has to do.
 */
function cachedSnapshot(repoDir: string, revision: string, strict: boolean): string | undefined {
  let commit = revision;
  if (!COMMIT.test(revision)) {
    try {
      commit = fs.readFileSync(path.join(repoDir, "refs", revision), "utf8").trim();
    } catch {
      return undefined;
    }
    if (!COMMIT.test(commit)) return undefined;
  }
  const snapshot = path.join(repoDir, "snapshots", commit);
  // existsSync follows the symlink: a link whose blob is gone counts as missing.
  const has = (f: string) => fs.existsSync(path.join(snapshot, f));
  if (!REQUIRED_FILES.every(has)) return undefined;
  if (strict && !OPTIONAL_FILES.every((f) => has(f) || fs.existsSync(path.join(repoDir, ".no_exist", commit, f)))) return undefined;
  if (has(WEIGHTS)) return snapshot;
  if (!has(WEIGHTS_INDEX)) return undefined;
  const shards = shardNames(path.join(snapshot, WEIGHTS_INDEX));
  return shards && shards.every(has) ? snapshot : undefined;
}

/** The shard files a safetensors index names, or undefined if it is not a usable index. */
function shardNames(indexFile: string): string[] | undefined {
  try {
    const map = JSON.parse(fs.readFileSync(indexFile, "utf8")).weight_map as Record<string, unknown>;
    const shards = [...new Set(Object.values(map))];
    return shards.length > 0 && shards.every((s) => typeof s === "string" && isSafeRelative(s)) ? (shards as string[]) : undefined;
  } catch {
    return undefined;
  }
}

/** A relative path that stays inside the directory it is joined to (names come from the hub). */
function isSafeRelative(p: string): boolean {
  return p.length > 0 && !path.isAbsolute(p) && !p.split(/[\\/]/).some((part) => part === ".." || part === "");
}

async function sizeOf(file: string): Promise<number | undefined> {
  try {
    return (await fsp.stat(file)).size;
  } catch {
    return undefined;
  }
}

/** One download of one revision: resolves the commit, lists the files, fetches what the cache lacks. */
class Download {
  private readonly fetch: typeof fetch;
  private commit = "";
  private done = 0;
  private total = 0;

  constructor(
    private readonly hf: HubLibrary,
    private readonly id: string,
    private readonly revision: string,
    private readonly hub: HubSettings,
    private readonly repoDir: string,
    private readonly options: ResolveModelOptions,
  ) {
    this.fetch = hubFetch(hub, options.signal);
  }

  private get common() {
    return { repo: { type: "model" as const, name: this.id }, hubUrl: this.hub.endpoint, fetch: this.fetch };
  }

  async run(): Promise<string> {
    try {
      return await this.fetchAll();
    } catch (e) {
      throw this.failure(e);
    }
  }

  private async fetchAll(): Promise<string> {
    const { id, revision } = this;
    const entries = new Map<string, ListFileEntry>();
    try {
      this.commit = COMMIT.test(revision) ? revision : (await this.hf.modelInfo({ ...this.common, name: id, revision, additionalFields: ["sha"] })).sha ?? "";
      if (!COMMIT.test(this.commit)) throw new ModelHubError(id, `the hub at ${this.hub.endpoint} gave no commit for '${id}' at revision '${revision}'`, "LCKV_DOWNLOAD_FAILED");
      for await (const e of this.hf.listFiles({ ...this.common, revision: this.commit })) if (e.type === "file") entries.set(e.path, e);
    } catch (e) {
      throw this.failure(e);
    }
    const entry = (file: string) => {
      const e = entries.get(file);
      if (!e) throw new ModelHubError(id, `model '${id}' at revision '${revision}' (commit ${this.commit}) has no ${file}`, "LCKV_MODEL_NOT_FOUND", file);
      return e;
    };
    const files = [...REQUIRED_FILES, ...OPTIONAL_FILES.filter((f) => entries.has(f))].map(entry);
    if (entries.has(WEIGHTS)) {
      files.push(entry(WEIGHTS));
    } else if (entries.has(WEIGHTS_INDEX)) {
      // The index names the shards: fetch it first (it is small and not counted in the progress).
      const index = await this.fetchFile(entry(WEIGHTS_INDEX));
      const shards = shardNames(index);
      if (!shards) throw new ModelHubError(id, `${WEIGHTS_INDEX} of '${id}' names no shards (or a shard outside the model)`, "LCKV_MODEL_NOT_FOUND", WEIGHTS_INDEX);
      files.push(...shards.map(entry));
      this.done = 0;
    } else {
      throw new ModelHubError(id, `model '${id}' at revision '${revision}' has neither ${WEIGHTS} nor ${WEIGHTS_INDEX}`, "LCKV_MODEL_NOT_FOUND", WEIGHTS);
    }
    this.total = files.reduce((sum, f) => sum + fileSize(f), 0);
    for (const f of files) await this.fetchFile(f);
    // Optional files the commit lacks are recorded as huggingface_hub does, so that the next call
    // knows the snapshot is complete without asking the hub.
    for (const f of OPTIONAL_FILES.filter((f) => !entries.has(f))) {
      await fsp.mkdir(path.join(this.repoDir, ".no_exist", this.commit), { recursive: true });
      await fsp.writeFile(path.join(this.repoDir, ".no_exist", this.commit, f), "");
    }
    if (revision !== this.commit) {
      const ref = path.join(this.repoDir, "refs", revision);
      await fsp.mkdir(path.dirname(ref), { recursive: true });
      const tmp = uniqueName(ref);
      await fsp.writeFile(tmp, this.commit);
      await fsp.rename(tmp, ref);
    }
    return path.join(this.repoDir, "snapshots", this.commit);
  }

  /** Makes snapshots/<commit>/<file> point at its blob, downloading the blob if the cache lacks it. */
  private async fetchFile(entry: ListFileEntry): Promise<string> {
    const { id } = this;
    const file = entry.path;
    if (!isSafeRelative(file)) throw new ModelHubError(id, `the hub listed a file outside the model: '${file}'`, "LCKV_DOWNLOAD_FAILED", file);
    if (this.options.signal?.aborted) throw this.failure(this.options.signal.reason, file);
    const size = fileSize(entry);
    // huggingface_hub names a blob by the hub's etag: the sha256 of an LFS file, else its git blob id.
    const etag = entry.lfs?.oid ?? entry.oid;
    if (!etag || !/^[\w-]+$/.test(etag)) throw new ModelHubError(id, `the hub listed ${file} without a usable id`, "LCKV_DOWNLOAD_FAILED", file);
    const blob = path.join(this.repoDir, "blobs", etag);
    const link = path.join(this.repoDir, "snapshots", this.commit, file);
    if ((await sizeOf(blob)) !== size) {
      // Another call may be writing this blob: wait for it, then look again.
      const lock = path.join(this.hub.cacheDir, ".locks", path.basename(this.repoDir), `${etag}.lckv.lock`);
      const release = await lockFile(lock, this.options.signal).catch((e: unknown) => {
        throw this.failure(e, file);
      });
      try {
        const held = await sizeOf(blob);
        if (held !== size) {
          if (held !== undefined) await fsp.rm(blob, { force: true }); // not what the hub has: fetch again
          await fsp.mkdir(path.dirname(blob), { recursive: true });
          await this.downloadBlob(file, size, blob);
        } else {
          this.progress(size, file);
        }
      } finally {
        await release();
      }
    } else {
      this.progress(size, file);
    }
    await fsp.mkdir(path.dirname(link), { recursive: true });
    // Made under a name of its own and renamed over the link: a call beside this one making the
    // same link never finds it half made or gone.
    const tmp = uniqueName(link);
    try {
      await fsp.symlink(path.relative(path.dirname(link), blob), tmp);
    } catch {
      // No symlinks here (Windows without developer mode): a copy, as huggingface_hub falls back to.
      await fsp.copyFile(blob, tmp);
    }
    await fsp.rename(tmp, link);
    return link;
  }

  /** Fetches `file` into <blob>.incomplete, continuing what an earlier call left, then moves it into place. */
  private async downloadBlob(file: string, listedSize: number, blob: string): Promise<void> {
    const { id } = this;
    const incomplete = `${blob}.incomplete`;
    try {
      const info = await this.hf.fileDownloadInfo({ ...this.common, path: file, revision: this.commit });
      if (!info) throw new ModelHubError(id, `model '${id}' (commit ${this.commit}) has no ${file}`, "LCKV_MODEL_NOT_FOUND", file);
      if (info.size !== listedSize) {
        throw new ModelHubError(id, `${file} of '${id}': the hub lists ${listedSize} bytes but serves ${info.size}`, "LCKV_DOWNLOAD_SIZE_MISMATCH", file);
      }
      let have = (await sizeOf(incomplete)) ?? 0;
      if (have > info.size) {
        await fsp.rm(incomplete);
        have = 0;
      }
      this.progress(have, file);
      if (have < info.size) {
        const whole = await this.hf.downloadFile({ ...this.common, path: file, revision: this.commit, downloadInfo: info });
        if (!whole) throw new ModelHubError(id, `model '${id}' (commit ${this.commit}) has no ${file}`, "LCKV_MODEL_NOT_FOUND", file);
        // The library's blobs read a slice with a Range request (bytes=have-): the resume.
        const part = have > 0 ? whole.slice(have) : whole;
        const out = await fsp.open(incomplete, "a");
        try {
          // Each chunk is written as it arrives, so that a dropped connection leaves all it brought.
          for await (const chunk of Readable.fromWeb(part.stream() as import("node:stream/web").ReadableStream<Uint8Array>)) {
            await out.write(chunk as Uint8Array);
            this.progress((chunk as Uint8Array).byteLength, file);
          }
        } finally {
          await out.close();
        }
      }
    } catch (e) {
      throw this.failure(e, file);
    }
    const got = (await sizeOf(incomplete)) ?? 0;
    if (got !== listedSize) {
      // Too many bytes cannot be resumed from; too few can (the next call continues).
      if (got > listedSize) await fsp.rm(incomplete, { force: true });
      throw new ModelHubError(id, `${file} of '${id}': downloaded ${got} bytes, the hub reported ${listedSize}`, "LCKV_DOWNLOAD_SIZE_MISMATCH", file);
    }
    await fsp.rename(incomplete, blob);
  }

  private progress(bytes: number, file: string): void {
    this.done += bytes;
    if (this.total > 0) this.options.onProgress?.(this.done, this.total, file);
  }

  /** A typed error for what went wrong talking to the hub. */
  private failure(e: unknown, file?: string): LckvError {
    const { id, revision } = this;
    if (this.options.signal?.aborted) return new AbortError(`download of '${id}' aborted${file ? ` during ${file}` : ""}`);
    if (e instanceof LckvError) return e;
    const errno = e as NodeJS.ErrnoException;
    // (Not `instanceof Error`: node's own errors may come from another realm, as under jest.)
    if (typeof errno?.syscall === "string" && typeof errno.path === "string") {
      // The cache's file system, not the hub: no retry fetches past it.
      return new ModelHubError(id, `cannot write the Hugging Face cache ${this.hub.cacheDir} (HF_HUB_CACHE, else HF_HOME/hub): ${errno.message}`, "LCKV_IO", file, e);
    }
    if (e instanceof this.hf.HubApiError && [401, 403, 404].includes(e.statusCode)) {
      const what = file ? `${file} of '${id}'` : `model '${id}' (revision '${revision}')`;
      const hint = this.hub.token ? "" : "; if it is private or gated, set HF_TOKEN";
      const local = file ? "" : NOT_LOCAL;
      return new ModelHubError(id, `the hub at ${this.hub.endpoint} has no ${what} (HTTP ${e.statusCode})${hint}${local}`, "LCKV_MODEL_NOT_FOUND", file, e);
    }
    const why = e instanceof Error ? e.message : String(e);
    const resume = file ? "; what arrived is kept, and the next call resumes from it" : NOT_LOCAL;
    return new ModelHubError(id, `could not download ${file ?? "the file list"} of '${id}' from ${this.hub.endpoint}: ${why}${resume}`, "LCKV_DOWNLOAD_FAILED", file, e);
  }
}

/** A name beside `file` that no other call, in this process or another, writes. */
function uniqueName(file: string): string {
  return `${file}.${process.pid}-${Math.random().toString(36).slice(2)}.tmp`;
}

/** Lock files this process holds, removed if it exits holding them (Ctrl-C in the command line). */
const heldLocks = new Set<string>();
let exitHook = false;
/** How often a held lock's mtime is renewed, and how old one from another host may grow before it is taken for abandoned. */
const LOCK_RENEW_MS = 10_000;
const LOCK_STALE_MS = 60_000;

/**
 * Takes `lock`, a file created exclusively and holding its owner's pid and host, waiting while
 * another call holds it; returns what releases it. A lock whose owner is gone (a process of this
 * host that no longer runs, or one of another host, on a shared cache, that stopped renewing it)
 * is taken over.
 */
async function lockFile(lock: string, signal?: AbortSignal): Promise<() => Promise<void>> {
  await fsp.mkdir(path.dirname(lock), { recursive: true });
  const me = JSON.stringify({ pid: process.pid, host: os.hostname() });
  for (;;) {
    signal?.throwIfAborted();
    try {
      await fsp.writeFile(lock, me, { flag: "wx" });
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    if (await lockAbandoned(lock)) await fsp.rm(lock, { force: true });
    else await sleep(50 + Math.random() * 100, undefined, { signal });
  }
  heldLocks.add(lock);
  if (!exitHook) {
    exitHook = true;
    process.on("exit", () => {
      for (const l of heldLocks) fs.rmSync(l, { force: true });
    });
  }
  const renew = setInterval(() => {
    const now = new Date();
    fs.utimes(lock, now, now, () => {});
  }, LOCK_RENEW_MS).unref();
  return async () => {
    clearInterval(renew);
    heldLocks.delete(lock);
    await fsp.rm(lock, { force: true });
  };
}

async function lockAbandoned(lock: string): Promise<boolean> {
  let text: string, mtime: number;
  try {
    [text, mtime] = await Promise.all([fsp.readFile(lock, "utf8"), fsp.stat(lock).then((s) => s.mtimeMs)]);
  } catch {
    return false; // released meanwhile: the next try takes it
  }
  let owner: { pid?: unknown; host?: unknown } = {};
  try {
    owner = JSON.parse(text);
  } catch {
    // being written, or not one of ours: only its age tells
  }
  if (typeof owner.pid === "number" && owner.host === os.hostname()) {
    try {
      process.kill(owner.pid, 0);
      return false;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === "ESRCH";
    }
  }
  return Date.now() - mtime > LOCK_STALE_MS;
}

/** A file's size: an LFS file's own size, not its pointer's. */
function fileSize(e: ListFileEntry): number {
  return e.lfs?.size ?? e.size;
}

/**
 * The fetch the library is given: it adds the signal, and the token as an Authorization header
 * for the hub's own origin only (never for the CDN or storage URLs the hub sends files from).
 * The token goes through here rather than the library's accessToken, which refuses tokens that
 * do not start with "hf_", as private hubs and mirrors may issue.
 * A hub that stops answering fails the request, as in huggingface_hub: no headers within
 * HF_HUB_ETAG_TIMEOUT seconds, or no bytes of the body within HF_HUB_DOWNLOAD_TIMEOUT seconds of
 * the last (the bytes that came are kept, and the next call resumes from them).
 */
function hubFetch(hub: HubSettings, signal?: AbortSignal): typeof fetch {
  const origin = new URL(hub.endpoint).origin;
  return async (input, init = {}) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const headers = new Headers(init.headers);
    if (hub.token && url.origin === origin && !headers.has("authorization")) headers.set("authorization", `Bearer ${hub.token}`);
    const stalled = new AbortController();
    const signals = [init.signal, signal, stalled.signal].filter((s): s is AbortSignal => !!s);
    const stallAfter = (seconds: number, name: string, what: string) =>
      setTimeout(() => stalled.abort(new Error(`the hub sent ${what} in ${seconds} s (${name})`)), seconds * 1000);
    let timer = stallAfter(hub.headerTimeout, "HF_HUB_ETAG_TIMEOUT", "no answer");
    let res: Response;
    try {
      res = await fetch(input, { ...init, headers, signal: AbortSignal.any(signals) });
    } finally {
      clearTimeout(timer);
    }
    if (!res.body) return res;
    const reader = res.body.getReader();
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        timer = stallAfter(hub.bodyTimeout, "HF_HUB_DOWNLOAD_TIMEOUT", "no more bytes");
        try {
          const { done, value } = await reader.read();
          if (done) controller.close();
          else controller.enqueue(value);
        } finally {
          clearTimeout(timer);
        }
      },
      cancel(reason) {
        return reader.cancel(reason);
      },
    });
    const wrapped = new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers });
    // The library reads where a redirect led (the file's URL, for the resume's Range request).
    Object.defineProperties(wrapped, { url: { value: res.url }, redirected: { value: res.redirected } });
    return wrapped;
  };
}
