/**
 * Safetensors headers: read, and check against the file before any byte of data is trusted.
 * Format: u64 little-endian header length N, N bytes of JSON, then the data section, which
 * tensor offsets index into.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { LckvError, ModelLoadError, SafetensorsError } from "./errors";
import { modelFileExists, readJson } from "./model-files";

export type SafetensorsDtype = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "U16" | "U32" | "U64";

const DTYPE_BYTES: Record<string, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1, F8_E4M3: 1, F8_E5M2: 1, U16: 2, U32: 4, U64: 8,
};

export interface TensorInfo {
  name: string;
  file: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute byte offset of the data in the file. */
  offset: number;
  nbytes: number;
}

const MAX_HEADER = 100 * 1024 * 1024;

// fatal: invalid UTF-8 would otherwise decode to U+FFFD and surface later as a "missing tensor".
// ignoreBOM: keep a BOM in the text, so JSON.parse rejects it as before (the format has none).
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

export function readSafetensorsHeader(file: string): Map<string, TensorInfo> {
  let fd: number;
  try {
    fd = fs.openSync(file, "r");
  } catch (e) {
    throw new ModelLoadError(`cannot open weights file ${file}: ${(e as Error).message}`, file, "LCKV_MODEL_LOAD", { cause: e });
  }
  try {
    const st = fs.fstatSync(fd);
    // A directory opens fine on Linux and only fails (EISDIR) at the first read.
    if (!st.isFile()) throw new SafetensorsError(file, "is not a regular file");
    const size = st.size;
    if (size < 8) throw new SafetensorsError(file, `file is ${size} bytes, too short for a safetensors header`);
    const lenBuf = Buffer.alloc(8);
    readFully(fd, lenBuf, 0, file);
    const n = lenBuf.readBigUInt64LE(0);
    if (n > BigInt(size - 8)) throw new SafetensorsError(file, `header length ${n} runs past the end of the file (${size} bytes)`);
    if (n > BigInt(MAX_HEADER)) throw new SafetensorsError(file, `header length ${n} exceeds the ${MAX_HEADER}-byte limit`);
    const hlen = Number(n);
    const hbuf = Buffer.alloc(hlen);
    readFully(fd, hbuf, 8, file);
    let text: string;
    try {
      text = utf8.decode(hbuf);
    } catch {
      throw new SafetensorsError(file, "header is not valid UTF-8");
    }
    let header: unknown;
    try {
      header = JSON.parse(text);
    } catch (e) {
      throw new SafetensorsError(file, `header is not valid JSON (${(e as Error).message})`);
    }
    if (typeof header !== "object" || header === null || Array.isArray(header)) {
      throw new SafetensorsError(file, "header must be a JSON object");
    }
    const dataStart = 8 + hlen;
    const dataSize = size - dataStart;
    const out = new Map<string, TensorInfo>();
    for (const [name, v] of Object.entries(header as Record<string, unknown>)) {
      if (name === "__metadata__") continue;
      if (typeof v !== "object" || v === null) throw new SafetensorsError(file, "entry must be an object", name);
      const e = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
      if (typeof e.dtype !== "string" || !(e.dtype in DTYPE_BYTES)) {
        throw new SafetensorsError(file, `unknown dtype ${JSON.stringify(e.dtype)} (known: ${Object.keys(DTYPE_BYTES).join(", ")})`, name);
      }
      if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
        throw new SafetensorsError(file, `shape must be a list of non-negative integers, got ${JSON.stringify(e.shape)}`, name);
      }
      const off = e.data_offsets;
      if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && d >= 0) || off[0] > off[1]) {
        throw new SafetensorsError(file, `data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(off)}`, name);
      }
      if (off[1] > dataSize) {
        throw new SafetensorsError(file, `data_offsets [${off[0]}, ${off[1]}] lie past the end of the data section (${dataSize} bytes)`, name);
      }
      const count = (e.shape as number[]).reduce((a, b) => a * b, 1);
      const want = count * DTYPE_BYTES[e.dtype];
      if (want !== off[1] - off[0]) {
        throw new SafetensorsError(file, `shape ${JSON.stringify(e.shape)} of ${e.dtype} needs ${want} bytes but data_offsets span ${off[1] - off[0]}`, name);
      }
      out.set(name, { name, file, dtype: e.dtype as SafetensorsDtype, shape: e.shape as number[], offset: dataStart + off[0], nbytes: off[1] - off[0] });
    }
    // Tensors must not share bytes.
    const sorted = [...out.values()].filter((t) => t.nbytes > 0).sort((a, b) => a.offset - b.offset);
    for (let i = 1; i < sorted.length; i++) {
      const a = sorted[i - 1];
      const b = sorted[i];
      if (b.offset < a.offset + a.nbytes) {
        throw new SafetensorsError(file, `overlaps tensor '${a.name}'`, b.name);
      }
    }
    return out;
  } catch (e) {
    if (e instanceof LckvError) throw e;
    throw new ModelLoadError(`cannot read weights file ${file}: ${(e as Error).message}`, file, "LCKV_MODEL_LOAD", { cause: e });
  } finally {
    fs.closeSync(fd);
  }
}

/** Reads buf.length bytes at `pos`; a file that shrank under us is a short read, not garbage. */
function readFully(fd: number, buf: Buffer, pos: number, file: string): void {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, pos + done);
    if (n === 0) throw new SafetensorsError(file, `file ended after ${pos + done} bytes while reading the header`);
    done += n;
  }
}

/** A weight_map shard must name a file in the model directory itself, never a path out of it. */
function isShardName(shard: unknown): shard is string {
  return typeof shard === "string" && shard !== "" && shard !== "." && shard !== ".." && !/[/\\\0]/.test(shard);
}

/**
 * All tensors of a model directory: model.safetensors, or else the shards listed by
 * model.safetensors.index.json. The single file comes first, as transformers (and the hub
 * download, hub.ts) take it: a directory holding both has its merged file beside a stale index.
 */
export function readModelTensors(dir: string): Map<string, TensorInfo> {
  const index = path.join(dir, "model.safetensors.index.json");
  const single = path.join(dir, "model.safetensors");
  if (modelFileExists(single)) return readSafetensorsHeader(single);
  if (modelFileExists(index)) {
    const parsed = readJson(index);
    const map = (parsed as { weight_map?: unknown })?.weight_map;
    if (typeof map !== "object" || map === null || Array.isArray(map)) {
      throw new ModelLoadError(`${index}: field 'weight_map' must be an object of tensor name -> shard file`, index);
    }
    const shards = new Map<string, Map<string, TensorInfo>>();
    const out = new Map<string, TensorInfo>();
    for (const [name, shard] of Object.entries(map as Record<string, unknown>)) {
      if (!isShardName(shard)) {
        throw new ModelLoadError(`${index}: weight_map['${name}'] must be a file name in the model directory, got ${JSON.stringify(shard)}`, index);
      }
      if (!shards.has(shard)) {
        const shardPath = path.join(dir, shard);
        if (!modelFileExists(shardPath)) throw new ModelLoadError(`${index}: shard '${shard}' (for '${name}') does not exist`, shardPath);
        shards.set(shard, readSafetensorsHeader(shardPath));
      }
      const info = shards.get(shard)!.get(name);
      if (!info) throw new ModelLoadError(`${index}: tensor '${name}' is listed in '${shard}' but that file does not hold it`, index);
      out.set(name, info);
    }
    return out;
  }
  throw new ModelLoadError(`${dir}: no model.safetensors or model.safetensors.index.json`, dir);
}
