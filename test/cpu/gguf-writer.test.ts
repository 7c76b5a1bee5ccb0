/**
 * scripts/bench/gguf-writer.js and make-gguf.js (the GGUF files node-llama-cpp runs beside lckv),
 * read back by a reader written here from the GGUF spec alone — header, typed metadata, tensor
 * infos, alignment, data — so that the writer is checked against the spec, not against itself.
 * (node-llama-cpp is not a dependency of the project; scripts/bench/llama-peer/check-gguf.mjs
 * checks the same files against its own reader where prepare.sh installed it.)
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { testTempDir } from "../helpers/temp-dir";

/* eslint-disable @typescript-eslint/no-var-requires */
const { writeGguf, gguf, tensorBytes } = require("../../scripts/bench/gguf-writer.js");
const { llamaGguf, llamaVocab } = require("../../scripts/bench/make-gguf.js");
const { Xorshift32, randomBf16, randomF16, randomQ8_0, randomQ4_0 } = require("../../scripts/bench/random-weights.js");

// ---- a GGUF reader from the spec ----------------------------------------------------------------

const TYPE_NAMES = ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"];
const GGML = { 0: { name: "F32", block: 1, bytes: 4 }, 1: { name: "F16", block: 1, bytes: 2 }, 2: { name: "Q4_0", block: 32, bytes: 18 }, 8: { name: "Q8_0", block: 32, bytes: 34 }, 30: { name: "BF16", block: 1, bytes: 2 } } as Record<number, { name: string; block: number; bytes: number }>;

interface ReadTensor { name: string; dims: number[]; type: string; offset: number; data: Buffer }

function readGguf(file: string) {
  const buf = fs.readFileSync(file);
  let p = 0;
  const u32 = () => { const v = buf.readUInt32LE(p); p += 4; return v; };
  const u64 = () => { const v = Number(buf.readBigUInt64LE(p)); p += 8; return v; };
  const str = () => { const n = u64(); const s = buf.toString("utf8", p, p + n); p += n; return s; };
  const scalar = (t: string): unknown => {
    switch (t) {
      case "u8": return buf.readUInt8(p++);
      case "i8": return buf.readInt8(p++);
      case "u16": { const v = buf.readUInt16LE(p); p += 2; return v; }
      case "i16": { const v = buf.readInt16LE(p); p += 2; return v; }
      case "u32": return u32();
      case "i32": { const v = buf.readInt32LE(p); p += 4; return v; }
      case "f32": { const v = buf.readFloatLE(p); p += 4; return v; }
      case "bool": { const v = buf.readUInt8(p++); if (v > 1) throw new Error(`bool byte ${v}`); return v === 1; }
      case "string": return str();
      case "u64": return u64();
      case "i64": { const v = Number(buf.readBigInt64LE(p)); p += 8; return v; }
      case "f64": { const v = buf.readDoubleLE(p); p += 8; return v; }
      default: throw new Error(`value type ${t}`);
    }
  };
  if (buf.toString("ascii", 0, 4) !== "GGUF") throw new Error("no GGUF magic");
  p = 4;
  const version = u32();
  const tensorCount = u64();
  const kvCount = u64();
  const metadata = new Map<string, { type: string; elementType?: string; value: unknown }>();
  for (let i = 0; i < kvCount; i++) {
    const key = str();
    const type = TYPE_NAMES[u32()];
    if (type === "array") {
      const elementType = TYPE_NAMES[u32()];
      const n = u64();
      const value = Array.from({ length: n }, () => scalar(elementType));
      metadata.set(key, { type, elementType, value });
    } else {
      metadata.set(key, { type, value: scalar(type) });
    }
  }
  const infos = Array.from({ length: tensorCount }, () => {
    const name = str();
    const nd = u32();
    const dims = Array.from({ length: nd }, () => u64());
    const type = u32();
    const offset = u64();
    return { name, dims, type, offset };
  });
  const alignment = (metadata.get("general.alignment")?.value as number | undefined) ?? 32;
  const dataStart = Math.ceil(p / alignment) * alignment;
  expect(buf.subarray(p, dataStart).every((b) => b === 0)).toBe(true);
  const tensors: ReadTensor[] = infos.map((t) => {
    const g = GGML[t.type];
    if (!g) throw new Error(`ggml type ${t.type}`);
    const n = (t.dims[0] / g.block) * g.bytes * t.dims.slice(1).reduce((a, b) => a * b, 1);
    expect(t.offset % alignment).toBe(0);
    const start = dataStart + t.offset;
    if (start + n > buf.length) throw new Error(`${t.name} runs past the end of the file`);
    return { name: t.name, dims: t.dims, type: g.name, offset: t.offset, data: buf.subarray(start, start + n) };
  });
  // Tensors do not overlap, in the order of their infos.
  for (let i = 1; i < tensors.length; i++) expect(tensors[i].offset).toBeGreaterThanOrEqual(tensors[i - 1].offset + tensors[i - 1].data.length);
  return { version, metadata, tensors, alignment, dataStart, size: buf.length };
}

const halfToFloat = (h: number) => {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
};

// ---- tests ------------------------------------------------------------------------------------------

let dir: string;
beforeAll(() => (dir = testTempDir("lckv-gguf-")));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

test("every metadata value type and every tensor type round-trips through the spec's layout", () => {
  const file = path.join(dir, "all.gguf");
  const metadata = [
    ["general.architecture", gguf.string("llama")],
    ["t.u8", gguf.u8(250)], ["t.i8", gguf.i8(-7)], ["t.u16", gguf.u16(65000)], ["t.i16", gguf.i16(-30000)],
    ["t.u32", gguf.u32(4000000000)], ["t.i32", gguf.i32(-2000000000)], ["t.f32", gguf.f32(0.1)], ["t.bool", gguf.bool(true)],
    ["t.string", gguf.string("héllo ▁world")], ["t.u64", gguf.u64(2 ** 40 + 3)], ["t.i64", gguf.i64(-(2 ** 40))], ["t.f64", gguf.f64(Math.PI)],
    ["t.strings", gguf.array("string", ["<unk>", "", "▁a"])], ["t.floats", gguf.array("f32", [0, -1.5, 3])], ["t.ints", gguf.array("i32", [1, -2, 3])],
  ];
  const rng = new Xorshift32(5);
  const data: Record<string, Buffer> = {};
  const tensor = (name: string, dims: number[], type: string, make: (rows: number) => Buffer) => ({
    name, dims, type,
    write: (rows: number) => { const b = make(rows); data[name] = Buffer.concat([data[name] ?? Buffer.alloc(0), b]); return b; },
  });
  const asBuf = (a: Uint16Array | Uint32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  const tensors = [
    tensor("norm", [7], "F32", () => asBuf(new Uint32Array(7).fill(0x3f800000))), // 28 bytes: the next offset must be padded
    tensor("f16", [64, 3], "F16", (r) => asBuf(randomF16(rng, r * 64))),
    tensor("bf16", [32, 2], "BF16", (r) => asBuf(randomBf16(rng, r * 32))),
    tensor("q8", [64, 5], "Q8_0", (r) => randomQ8_0(rng, (r * 64) / 32)),
    tensor("q4", [96, 3], "Q4_0", (r) => randomQ4_0(rng, (r * 96) / 32)),
  ];
  const written = writeGguf(file, { metadata, tensors });
  const g = readGguf(file);
  expect(g.version).toBe(3);
  expect(g.alignment).toBe(32);
  expect(g.dataStart).toBe(written.dataStart);
  expect([...g.metadata.keys()]).toEqual(metadata.map(([k]) => k));
  for (const [k, v] of metadata as [string, { type: string; value: unknown; elementType?: string }][]) {
    const got = g.metadata.get(k)!;
    expect(got.type).toBe(v.type);
    if (v.type === "f32") expect(got.value).toBeCloseTo(v.value as number, 6);
    else if (v.type === "array" && v.elementType === "f32") expect(got.value).toEqual(v.value);
    else expect(got.value).toEqual(v.value);
  }
  expect(g.tensors.map((t) => [t.name, t.type, t.dims.join("x")])).toEqual([["norm", "F32", "7"], ["f16", "F16", "64x3"], ["bf16", "BF16", "32x2"], ["q8", "Q8_0", "64x5"], ["q4", "Q4_0", "96x3"]]);
  expect(g.tensors[1].offset).toBe(32); // 28 bytes of "norm", padded to the alignment
  for (const t of g.tensors) expect(t.data.equals(data[t.name])).toBe(true);
  expect(g.size % 32).toBe(0);
});

test("general.alignment sets the alignment of the data and of every tensor", () => {
  const file = path.join(dir, "align.gguf");
  const make = (n: number) => () => Buffer.alloc(n, 1);
  writeGguf(file, { metadata: [["general.alignment", gguf.u32(256)]], tensors: [{ name: "a", dims: [3], type: "F32", write: make(12) }, { name: "b", dims: [5], type: "F32", write: make(20) }] });
  const g = readGguf(file);
  expect(g.alignment).toBe(256);
  expect(g.dataStart % 256).toBe(0);
  expect(g.tensors.map((t) => t.offset)).toEqual([0, 256]);
});

test("tensor sizes follow ggml's blocks, and a row that is not a whole number of blocks is refused", () => {
  expect(tensorBytes("F16", [4096, 11008])).toBe(4096 * 11008 * 2);
  expect(tensorBytes("Q8_0", [4096, 10])).toBe((4096 / 32) * 34 * 10);
  expect(tensorBytes("Q4_0", [11008, 4096])).toBe((11008 / 32) * 18 * 4096);
  expect(() => tensorBytes("Q4_0", [48, 2])).toThrow(/multiple of 32/);
  expect(() => tensorBytes("Q5_K", [256])).toThrow(/unknown tensor type Q5_K/);
  expect(() => writeGguf(path.join(dir, "bad.gguf"), { metadata: [["x", 5]], tensors: [] })).toThrow(/metadata 'x'/);
  const short = { name: "s", dims: [32, 2], type: "F16", write: () => Buffer.alloc(10) };
  expect(() => writeGguf(path.join(dir, "short.gguf"), { metadata: [], tensors: [short] })).toThrow(/tensor s produced 10 bytes for 2 rows, expected 128/);
});

test("random weights: magnitudes of trained weights, never zero, infinite or NaN; quant blocks in their ranges", () => {
  const rng = new Xorshift32(1);
  for (const h of randomF16(rng, 4097)) {
    const v = Math.abs(halfToFloat(h));
    expect(v).toBeGreaterThanOrEqual(2 ** -7);
    expect(v).toBeLessThan(2 ** -5);
  }
  const q8 = randomQ8_0(rng, 200);
  const q4 = randomQ4_0(rng, 200);
  expect(q8.length).toBe(200 * 34);
  expect(q4.length).toBe(200 * 18);
  for (let b = 0; b < 200; b++) {
    const d8 = halfToFloat(q8.readUInt16LE(b * 34)), d4 = halfToFloat(q4.readUInt16LE(b * 18));
    expect(d8).toBeGreaterThanOrEqual(2 ** -11);
    expect(d8).toBeLessThan(2 ** -10);
    expect(d4).toBeGreaterThanOrEqual(2 ** -10);
    expect(d4).toBeLessThan(2 ** -9);
    for (let j = 0; j < 32; j++) expect(q8.readInt8(b * 34 + 2 + j)).toBeGreaterThanOrEqual(-127);
  }
  // The bf16 stream is the one the bench's safetensors models have always had (seed 1).
  const first = randomBf16(new Xorshift32(1), 3);
  let x = 1;
  const expected = [0, 1, 2].map(() => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return (x & 0x81ff) | 0x3c00; });
  expect([...first]).toEqual(expected);
});

test("make-gguf.js: a Llama model as llama.cpp names and lays it out, with a SentencePiece vocabulary", () => {
  const shape = { layers: 2, hidden: 64, heads: 4, kvHeads: 2, intermediate: 96, vocab: 300, maxPositions: 4096, normEps: 1e-5, ropeTheta: 10000 };
  for (const [type, ggml, fileType] of [["f16", "F16", 1], ["q8_0", "Q8_0", 7], ["q4_0", "Q4_0", 2]] as const) {
    const file = path.join(dir, `llama-${type}.gguf`);
    writeGguf(file, llamaGguf(shape, type));
    const g = readGguf(file);
    const m = (k: string) => g.metadata.get(k)?.value;
    expect(m("general.architecture")).toBe("llama");
    expect(m("general.file_type")).toBe(fileType);
    expect([m("llama.block_count"), m("llama.embedding_length"), m("llama.feed_forward_length"), m("llama.attention.head_count"), m("llama.attention.head_count_kv"), m("llama.rope.dimension_count"), m("llama.context_length")]).toEqual([2, 64, 96, 4, 2, 16, 4096]);
    expect(m("tokenizer.ggml.model")).toBe("llama");
    expect((m("tokenizer.ggml.tokens") as string[]).length).toBe(300);
    const byName = new Map(g.tensors.map((t) => [t.name, t]));
    expect(g.tensors).toHaveLength(3 + 2 * 9);
    expect(byName.get("token_embd.weight")!.dims).toEqual([64, 300]);
    expect(byName.get("output.weight")!.dims).toEqual([64, 300]);
    expect(byName.get("blk.1.attn_q.weight")!.dims).toEqual([64, 64]);
    expect(byName.get("blk.1.attn_k.weight")!.dims).toEqual([64, 32]); // 2 K/V heads of 16
    expect(byName.get("blk.0.attn_output.weight")!.dims).toEqual([64, 64]);
    expect(byName.get("blk.0.ffn_gate.weight")!.dims).toEqual([64, 96]);
    expect(byName.get("blk.0.ffn_down.weight")!.dims).toEqual([96, 64]);
    for (const t of g.tensors) expect(t.type).toBe(t.dims.length === 1 ? "F32" : ggml);
    for (const t of g.tensors.filter((x) => x.name.endsWith("norm.weight"))) expect([...new Float32Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.length))]).toEqual(Array(64).fill(1));
  }
  const v = llamaVocab(300);
  expect(v.tokens.slice(0, 5)).toEqual(["<unk>", "<s>", "</s>", "<0x00>", "<0x01>"]);
  expect(v.tokens[3 + 10]).toBe("<0x0A>"); // llama.cpp looks up the newline byte token by this name
  expect(v.types.slice(0, 4)).toEqual([2, 3, 3, 6]);
  expect(new Set(v.tokens).size).toBe(300);
  expect(() => llamaVocab(200)).toThrow(/at least 259/);
  expect(() => llamaGguf(shape, "q5_k")).toThrow(/--type must be one of f16, q8_0, q4_0/);
});
