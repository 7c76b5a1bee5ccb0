/**
 * Reading a checkpoint's tensors as f32 or as raw bytes, and writing a safetensors file: what
 * `lckv condense` needs to rewrite a few weights of a model and copy the rest.
 */
import * as fs from "node:fs";
import type { TensorInfo } from "../safetensors";

/** A tensor's bytes as its file stores them. */
export function readRaw(t: TensorInfo): Buffer {
  const buf = Buffer.alloc(t.nbytes);
  const fd = fs.openSync(t.file, "r");
  try {
    let done = 0;
    while (done < t.nbytes) {
      const n = fs.readSync(fd, buf, done, t.nbytes - done, t.offset + done);
      if (n <= 0) throw new Error(`${t.file}: short read of tensor '${t.name}'`);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return buf;
}

/** A tensor of F32, F16 or BF16 values, widened to f32 (exact). */
export function readF32(t: TensorInfo): Float32Array {
  const raw = readRaw(t);
  const n = t.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  if (t.dtype === "F32") {
    for (let i = 0; i < n; i++) out[i] = raw.readFloatLE(4 * i);
  } else if (t.dtype === "BF16") {
    const u = new Uint32Array(out.buffer);
    for (let i = 0; i < n; i++) u[i] = raw.readUInt16LE(2 * i) << 16;
  } else if (t.dtype === "F16") {
    for (let i = 0; i < n; i++) out[i] = f16ToF32(raw.readUInt16LE(2 * i));
  } else {
    throw new Error(`tensor '${t.name}': dtype ${t.dtype} is not a floating-point weight type`);
  }
  return out;
}

function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

/** One tensor to write: its name, dtype, shape and little-endian bytes. */
export interface OutTensor {
  name: string;
  dtype: string;
  shape: number[];
  data: Buffer;
}

export function f32Tensor(name: string, shape: number[], values: Float32Array): OutTensor {
  return { name, dtype: "F32", shape, data: Buffer.from(values.buffer, values.byteOffset, values.byteLength) };
}

/** Writes a safetensors file: u64 header length, the JSON header (padded to 8 bytes), the data. */
export function writeSafetensors(file: string, tensors: OutTensor[], metadata: Record<string, string> = {}): void {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.length] };
    offset += t.data.length;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  const fd = fs.openSync(file, "w");
  try {
    fs.writeSync(fd, len);
    fs.writeSync(fd, json);
    for (const t of tensors) fs.writeSync(fd, t.data);
  } finally {
    fs.closeSync(fd);
  }
}

/** The transpose of a row-major rows x cols matrix. */
export function transpose(m: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(m.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = m[r * cols + c];
  return out;
}
