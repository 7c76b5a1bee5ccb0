/**
 * Writes small model directories for tests that need files to corrupt: a safetensors writer
 * and a random Llama/LCKV model. The golden comparisons use test/fixtures instead, which the
 * PyTorch reference produced.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { testTempDir } from "./temp-dir";

export interface RawTensor {
  name: string;
  shape: number[];
  data: Float32Array;
  dtype?: "F32" | "F16" | "BF16";
}

function toBf16(x: number): number {
  const b = Buffer.alloc(4);
  b.writeFloatLE(x);
  const u = b.readUInt32LE();
  return ((u + 0x7fff + ((u >> 16) & 1)) >>> 16) & 0xffff;
}

/** Serialises tensors into safetensors bytes; `mutateHeader` lets a test make the header lie. */
export function safetensorsBytes(tensors: RawTensor[], mutateHeader?: (h: Record<string, any>) => void): Buffer {
  const header: Record<string, any> = {};
  const chunks: Buffer[] = [];
  let off = 0;
  for (const t of tensors) {
    const dtype = t.dtype ?? "F32";
    let buf: Buffer;
    if (dtype === "F32") buf = Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    else {
      buf = Buffer.alloc(t.data.length * 2);
      t.data.forEach((v, i) => buf.writeUInt16LE(toBf16(v), 2 * i));
      if (dtype === "F16") throw new Error("F16 writing not needed by tests");
    }
    header[t.name] = { dtype, shape: t.shape, data_offsets: [off, off + buf.length] };
    chunks.push(buf);
    off += buf.length;
  }
  mutateHeader?.(header);
  let json = Buffer.from(JSON.stringify(header), "utf8");
  const pad = (8 - (json.length % 8)) % 8;
  json = Buffer.concat([json, Buffer.from(" ".repeat(pad))]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, ...chunks]);
}

/** Deterministic pseudo-random numbers (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface TinyLlamaSpec {
  layerTypes?: string;
  numLayers?: number;
  hidden?: number;
  heads?: number;
  kvHeads?: number;
  intermediate?: number;
  vocab?: number;
  maxPositions?: number;
  seed?: number;
  /** Extra config.json fields (or overrides). */
  config?: Record<string, unknown>;
}

export function tinyLlamaConfig(s: TinyLlamaSpec = {}): Record<string, unknown> {
  const L = s.numLayers ?? 4;
  return {
    architectures: [s.layerTypes ? "LCKVLlamaForCausalLM" : "LlamaForCausalLM"],
    model_type: s.layerTypes ? "lckv-llama" : "llama",
    hidden_size: s.hidden ?? 32,
    intermediate_size: s.intermediate ?? 64,
    num_attention_heads: s.heads ?? 4,
    num_key_value_heads: s.kvHeads ?? 2,
    num_hidden_layers: L,
    vocab_size: s.vocab ?? 64,
    max_position_embeddings: s.maxPositions ?? 128,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    tie_word_embeddings: true,
    ...(s.layerTypes ? { layer_types: s.layerTypes, forward_passes: 2, backward_passes: 1 } : {}),
    ...s.config,
  };
}

/** Random weights for a tiny Llama-style model (k/v only on the layers some layer targets). */
export function tinyLlamaTensors(s: TinyLlamaSpec = {}): RawTensor[] {
  const c = tinyLlamaConfig(s) as any;
  const r = rng(s.seed ?? 1);
  const E = c.hidden_size, I = c.intermediate_size, H = c.num_attention_heads, KV = c.num_key_value_heads;
  const hd = E / H;
  const mat = (name: string, rows: number, cols: number, scale = 0.2): RawTensor => ({
    name,
    shape: [rows, cols],
    data: Float32Array.from({ length: rows * cols }, () => (r() * 2 - 1) * scale),
  });
  const vec = (name: string, n: number): RawTensor => ({ name, shape: [n], data: Float32Array.from({ length: n }, () => 0.8 + 0.4 * r()) });
  const targets: number[] = c.layer_types ? String(c.layer_types).split("_").map((x: string) => parseInt(x, 10)) : [...Array(c.num_hidden_layers).keys()];
  const t: RawTensor[] = [mat("model.embed_tokens.weight", c.vocab_size, E, 1), vec("model.norm.weight", E)];
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = `model.layers.${i}.`;
    t.push(vec(p + "input_layernorm.weight", E), vec(p + "post_attention_layernorm.weight", E));
    t.push(mat(p + "self_attn.q_proj.weight", H * hd, E), mat(p + "self_attn.o_proj.weight", E, H * hd));
    if (targets.includes(i)) t.push(mat(p + "self_attn.k_proj.weight", KV * hd, E), mat(p + "self_attn.v_proj.weight", KV * hd, E));
    t.push(mat(p + "mlp.gate_proj.weight", I, E), mat(p + "mlp.up_proj.weight", I, E), mat(p + "mlp.down_proj.weight", E, I));
  }
  return t;
}

const created: string[] = [];
process.on("exit", () => {
  for (const d of created) fs.rmSync(d, { recursive: true, force: true });
});

/** Writes a tiny model directory into a fresh temp dir (removed when the process exits). */
export function writeTinyModel(s: TinyLlamaSpec = {}, opts: { tensors?: RawTensor[]; mutateHeader?: (h: Record<string, any>) => void } = {}): string {
  const dir = testTempDir("lckv-test-");
  created.push(dir);
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(tinyLlamaConfig(s), null, 2));
  fs.writeFileSync(path.join(dir, "model.safetensors"), safetensorsBytes(opts.tensors ?? tinyLlamaTensors(s), opts.mutateHeader));
  return dir;
}

/**
 * The default tiny model with one value of layer 1's up_proj set to `value`, its tensors stored
 * as `dtype` (f32 by default): a weight the load must refuse or take.
 */
export function writeTinyModelWithValue(value: number, dtype: RawTensor["dtype"] = "F32"): string {
  const t = tinyLlamaTensors().map((x) => ({ ...x, dtype }));
  t.find((x) => x.name === "model.layers.1.mlp.up_proj.weight")!.data[5] = value;
  return writeTinyModel({}, { tensors: t });
}

/**
 * The default tiny model with its weights split over two shards (a.safetensors, b.safetensors)
 * and a model.safetensors.index.json mapping each tensor to its shard.
 */
export function writeShardedTinyModel(): string {
  const dir = writeTinyModel();
  fs.unlinkSync(path.join(dir, "model.safetensors"));
  const t = tinyLlamaTensors();
  const half = Math.floor(t.length / 2);
  fs.writeFileSync(path.join(dir, "a.safetensors"), safetensorsBytes(t.slice(0, half)));
  fs.writeFileSync(path.join(dir, "b.safetensors"), safetensorsBytes(t.slice(half)));
  const map: Record<string, string> = {};
  t.forEach((x, i) => (map[x.name] = i < half ? "a.safetensors" : "b.safetensors"));
  fs.writeFileSync(path.join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map: map }));
  return dir;
}
