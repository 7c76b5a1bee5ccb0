/**
 * A GGUF writer (version 3, little-endian), enough for the random models that node-llama-cpp
 * runs beside lckv: typed metadata, 1-D and 2-D tensors of F32, F16, BF16, Q8_0 and Q4_0, each
 * tensor's data written as it is produced, so that a 7B file never sits in memory.
 *
 * Layout (GGUF spec, ggml's docs/gguf.md):
 *   "GGUF" | u32 version | u64 tensor count | u64 metadata count
 *   metadata: string key | u32 value type | value   (arrays: u32 element type | u64 count | elements)
 *   tensor infos: string name | u32 dims | u64 ne[dims] (ne[0] the contiguous one) | u32 ggml type | u64 offset
 *   zero padding to the alignment, then the data of each tensor at its offset (offsets are
 *   relative to the start of the data and multiples of the alignment).
 * Strings are u64 length + UTF-8 bytes, no terminator.
 */
const fs = require("node:fs");

const VALUE = { u8: 0, i8: 1, u16: 2, i16: 3, u32: 4, i32: 5, f32: 6, bool: 7, string: 8, array: 9, u64: 10, i64: 11, f64: 12 };

/** ggml tensor types: id, weights per block and bytes per block. */
const GGML_TYPES = {
  F32: { id: 0, blockElements: 1, blockBytes: 4 },
  F16: { id: 1, blockElements: 1, blockBytes: 2 },
  Q4_0: { id: 2, blockElements: 32, blockBytes: 18 },
  Q8_0: { id: 8, blockElements: 32, blockBytes: 34 },
  BF16: { id: 30, blockElements: 1, blockBytes: 2 },
};

const DEFAULT_ALIGNMENT = 32;

/** A metadata value with its GGUF type: gguf.u32(4096), gguf.array("string", [...]). */
const gguf = {
  u8: (v) => ({ type: "u8", value: v }),
  i8: (v) => ({ type: "i8", value: v }),
  u16: (v) => ({ type: "u16", value: v }),
  i16: (v) => ({ type: "i16", value: v }),
  u32: (v) => ({ type: "u32", value: v }),
  i32: (v) => ({ type: "i32", value: v }),
  f32: (v) => ({ type: "f32", value: v }),
  bool: (v) => ({ type: "bool", value: v }),
  string: (v) => ({ type: "string", value: v }),
  u64: (v) => ({ type: "u64", value: v }),
  i64: (v) => ({ type: "i64", value: v }),
  f64: (v) => ({ type: "f64", value: v }),
  array: (elementType, values) => ({ type: "array", elementType, value: values }),
};

/** Appends little-endian fields to a growing list of buffers. */
class ByteSink {
  constructor() {
    this.parts = [];
    this.length = 0;
  }
  push(buf) {
    this.parts.push(buf);
    this.length += buf.length;
  }
  fixed(size, write) {
    const b = Buffer.allocUnsafe(size);
    write(b);
    this.push(b);
  }
  u32(v) {
    this.fixed(4, (b) => b.writeUInt32LE(v));
  }
  u64(v) {
    this.fixed(8, (b) => b.writeBigUInt64LE(BigInt(v)));
  }
  string(s) {
    const bytes = Buffer.from(s, "utf8");
    this.u64(bytes.length);
    this.push(bytes);
  }
  scalar(type, v) {
    switch (type) {
      case "u8": return this.fixed(1, (b) => b.writeUInt8(v));
      case "i8": return this.fixed(1, (b) => b.writeInt8(v));
      case "u16": return this.fixed(2, (b) => b.writeUInt16LE(v));
      case "i16": return this.fixed(2, (b) => b.writeInt16LE(v));
      case "u32": return this.u32(v);
      case "i32": return this.fixed(4, (b) => b.writeInt32LE(v));
      case "f32": return this.fixed(4, (b) => b.writeFloatLE(v));
      case "bool": return this.fixed(1, (b) => b.writeUInt8(v ? 1 : 0));
      case "string": return this.string(v);
      case "u64": return this.u64(v);
      case "i64": return this.fixed(8, (b) => b.writeBigInt64LE(BigInt(v)));
      case "f64": return this.fixed(8, (b) => b.writeDoubleLE(v));
      default: throw new Error(`GGUF metadata: unknown value type ${type}`);
    }
  }
  value(key, v) {
    if (!v || !(v.type in VALUE)) throw new Error(`GGUF metadata '${key}': give its value as gguf.<type>(value), got ${JSON.stringify(v)}`);
    this.u32(VALUE[v.type]);
    if (v.type !== "array") return this.scalar(v.type, v.value);
    if (!(v.elementType in VALUE) || v.elementType === "array") throw new Error(`GGUF metadata '${key}': unknown array element type ${v.elementType}`);
    this.u32(VALUE[v.elementType]);
    this.u64(v.value.length);
    for (const e of v.value) this.scalar(v.elementType, e);
  }
}

/** Bytes of a tensor of `dims` (ne[0] first) in `type`; ne[0] must be a whole number of blocks. */
function tensorBytes(type, dims) {
  const t = GGML_TYPES[type];
  if (!t) throw new Error(`GGUF: unknown tensor type ${type} (known: ${Object.keys(GGML_TYPES).join(", ")})`);
  if (dims[0] % t.blockElements !== 0) throw new Error(`GGUF: a ${type} tensor needs ne[0] to be a multiple of ${t.blockElements}, got ${dims[0]}`);
  const rows = dims.slice(1).reduce((a, b) => a * b, 1);
  return (dims[0] / t.blockElements) * t.blockBytes * rows;
}

const align = (n, a) => Math.ceil(n / a) * a;

/**
 * Writes a GGUF file. `metadata`: [key, gguf.<type>(value)] pairs, in order. `tensors`: { name,
 * dims (ne[0] first), type, write(rows) } where write(rows) returns the encoded bytes of the next
 * `rows` rows (rows of ne[0] weights); the writer asks for chunks of about 64 MiB. Returns the
 * layout written: the data section's start and each tensor's offset and size.
 */
function writeGguf(file, { metadata, tensors }) {
  const alignmentEntry = metadata.find(([k]) => k === "general.alignment");
  const alignment = alignmentEntry ? alignmentEntry[1].value : DEFAULT_ALIGNMENT;
  const head = new ByteSink();
  head.push(Buffer.from("GGUF", "ascii"));
  head.u32(3);
  head.u64(tensors.length);
  head.u64(metadata.length);
  for (const [key, v] of metadata) {
    head.string(key);
    head.value(key, v);
  }
  const layout = [];
  let offset = 0;
  for (const t of tensors) {
    const nbytes = tensorBytes(t.type, t.dims);
    head.string(t.name);
    head.u32(t.dims.length);
    for (const d of t.dims) head.u64(d);
    head.u32(GGML_TYPES[t.type].id);
    head.u64(offset);
    layout.push({ name: t.name, type: t.type, dims: t.dims, offset, nbytes });
    offset = align(offset + nbytes, alignment);
  }
  const dataStart = align(head.length, alignment);
  head.push(Buffer.alloc(dataStart - head.length));
  const fd = fs.openSync(file, "w");
  try {
    for (const p of head.parts) fs.writeSync(fd, p);
    let at = 0;
    for (let i = 0; i < tensors.length; i++) {
      const t = tensors[i], l = layout[i];
      if (l.offset > at) fs.writeSync(fd, Buffer.alloc(l.offset - at));
      const rows = t.dims.slice(1).reduce((a, b) => a * b, 1);
      const rowBytes = l.nbytes / rows;
      const chunkRows = Math.max(1, Math.floor((64 << 20) / rowBytes));
      let written = 0;
      for (let r = 0; r < rows; r += chunkRows) {
        const n = Math.min(chunkRows, rows - r);
        const bytes = t.write(n);
        const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        if (buf.length !== n * rowBytes) throw new Error(`GGUF: tensor ${t.name} produced ${buf.length} bytes for ${n} rows, expected ${n * rowBytes}`);
        fs.writeSync(fd, buf);
        written += buf.length;
      }
      at = l.offset + written;
    }
    const end = align(at, alignment);
    if (end > at) fs.writeSync(fd, Buffer.alloc(end - at));
  } finally {
    fs.closeSync(fd);
  }
  return { alignment, dataStart, tensors: layout };
}

module.exports = { writeGguf, gguf, tensorBytes, GGML_TYPES, GGUF_VALUE_TYPES: VALUE, DEFAULT_ALIGNMENT };
