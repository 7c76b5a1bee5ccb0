/**
 * The CPU backend keeps a 16-bit checkpoint's weights in 16 bits by default (dtype "auto") and
 * widens them as its ops read them: the same logits and tokens, bit for bit, as with the weights
 * widened to f32 at load (dtype "f32"), in half the weight memory.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { DType, loadModel, ModelLoadError } from "../../lib";
import { readSafetensorsHeader } from "../../lib/safetensors";
import { RawTensor, safetensorsBytes, tinyLlamaTensors, writeTinyModel, writeTinyModelWithValue } from "../helpers/tiny-model";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";
const FIXTURES = path.join(__dirname, "..", "fixtures");
const DEFAULT_MODEL = path.join(__dirname, "..", "..", "models", "default");

const tmpDirs: string[] = [];
afterAll(() => {
  for (const d of tmpDirs) fs.rmSync(d, { recursive: true, force: true });
});

/**
 * The GPT-2 fixture with its f32 weights rounded to bf16 (to nearest even, as the engine rounds):
 * 16-bit weights through GPT-2's layout fixes (Conv1D stored transposed, c_attn sliced).
 */
function gpt2AsBf16(): string {
  const src = path.join(FIXTURES, "gpt2");
  const dir = testTempDir("lckv-test-");
  tmpDirs.push(dir);
  for (const f of fs.readdirSync(src)) if (f !== "model.safetensors") fs.copyFileSync(path.join(src, f), path.join(dir, f));
  const file = path.join(src, "model.safetensors");
  const bytes = fs.readFileSync(file);
  const tensors: RawTensor[] = [...readSafetensorsHeader(file).values()].map((t) => {
    expect(t.dtype).toBe("F32");
    const data = new Float32Array(t.nbytes / 4);
    Buffer.from(data.buffer).set(bytes.subarray(t.offset, t.offset + t.nbytes));
    return { name: t.name, shape: t.shape, data, dtype: "BF16" };
  });
  fs.writeFileSync(path.join(dir, "model.safetensors"), safetensorsBytes(tensors));
  return dir;
}

/** A tiny Llama in bf16 whose linears read 44 and 43 inputs, not multiples of 8 or 4. */
function oddWidthBf16(): string {
  const spec = { hidden: 44, heads: 2, kvHeads: 1, intermediate: 43, seed: 3 };
  return writeTinyModel(spec, { tensors: tinyLlamaTensors(spec).map((t) => ({ ...t, dtype: "BF16" as const })) });
}

/** Prefill logits (several rows through each linear), greedy tokens (one row) and weight bytes. */
async function run(dir: string, dtype: DType) {
  const model = await loadModel(dir, { device: "cpu", dtype, kvCacheMemory: 1 << 22 });
  try {
    const V = model.config.vocabSize;
    const ids = Array.from({ length: 9 }, (_, i) => (i * 37 + 5) % V);
    const logits = await model.logits(ids, { prefill: "sequential" });
    const { tokens } = await model.generate(ids, { maxNewTokens: 6, temperature: 0, ignoreEos: true });
    return { logits: Buffer.from(logits.buffer, logits.byteOffset, logits.byteLength), tokens, weightBytes: model.nativeModel().weightBytes };
  } finally {
    await model.dispose();
  }
}

describe.each([
  ["llama-gqa-hd32 (bf16)", () => path.join(FIXTURES, "llama-gqa-hd32")],
  ["llama-sharded-f16 (f16)", () => path.join(FIXTURES, "llama-sharded-f16")],
  ["the default model (bf16, LCKV, tied embeddings)", () => DEFAULT_MODEL],
  ["gpt2 rounded to bf16 (transposed and sliced weights)", gpt2AsBf16],
  ["a bf16 llama of widths 44 and 43 (the dot product's tails)", oddWidthBf16],
])("%s", (_name, makeDir) => {
  let dir: string;
  let kept: Awaited<ReturnType<typeof run>>;
  let widened: Awaited<ReturnType<typeof run>>;
  beforeAll(async () => {
    dir = makeDir();
    kept = await run(dir, "auto");
    widened = await run(dir, "f32");
  });

  test("the weights are kept in 2 bytes each by default, in 4 with dtype f32", () => {
    expect(kept.weightBytes).toBeGreaterThan(0);
    expect(widened.weightBytes).toBe(2 * kept.weightBytes);
  });

  test("logits and greedy tokens are bit for bit those of the weights widened to f32", () => {
    expect(kept.logits.equals(widened.logits)).toBe(true);
    expect(kept.tokens).toEqual(widened.tokens);
  });

  test("dtype f16 or bf16 of a checkpoint in that dtype changes nothing", async () => {
    const stored = storedDtypes(dir);
    expect(stored.size).toBe(1);
    const same = await run(dir, stored.has("F16") ? "f16" : "bf16");
    expect(same.weightBytes).toBe(kept.weightBytes);
    expect(same.logits.equals(kept.logits)).toBe(true);
    expect(same.tokens).toEqual(kept.tokens);
  });
});

/** The dtypes a model directory's safetensors files store. */
function storedDtypes(dir: string): Set<string> {
  const out = new Set<string>();
  for (const f of fs.readdirSync(dir).filter((x) => x.endsWith(".safetensors"))) {
    for (const t of readSafetensorsHeader(path.join(dir, f)).values()) out.add(t.dtype);
  }
  return out;
}

test("an f32 checkpoint rounded to bf16 at load computes what the same weights stored in bf16 do", async () => {
  const rounded = await run(path.join(FIXTURES, "gpt2"), "bf16");
  const stored = await run(gpt2AsBf16(), "auto");
  expect(rounded.weightBytes).toBe(stored.weightBytes);
  expect(rounded.logits.equals(stored.logits)).toBe(true);
  expect(rounded.tokens).toEqual(stored.tokens);
});

test("an f32 checkpoint stays in f32 by default", async () => {
  const dir = path.join(FIXTURES, "llama-mha-hd16");
  expect(storedDtypes(dir)).toEqual(new Set(["F32"]));
  const [auto, f32] = [await run(dir, "auto"), await run(dir, "f32")];
  expect(auto.weightBytes).toBe(f32.weightBytes);
  expect(auto.logits.equals(f32.logits)).toBe(true);
});

test.each([NaN, Infinity, -Infinity])("a bf16 checkpoint holding %p is refused", async (bad) => {
  const dir = writeTinyModelWithValue(bad, "BF16");
  await expect(loadModel(dir, { device: "cpu" })).rejects.toThrow(/up_proj\.weight.*NaN or infinite/);
});

test.each([
  ["NaN", 0x7e00],
  ["Infinity", 0x7c00],
  ["-Infinity", 0xfc00],
])("an f16 checkpoint holding %s is refused", async (_name, bits) => {
  const src = path.join(FIXTURES, "llama-sharded-f16");
  const dir = testTempDir("lckv-test-");
  tmpDirs.push(dir);
  for (const f of fs.readdirSync(src)) fs.copyFileSync(path.join(src, f), path.join(dir, f));
  const shard = fs.readdirSync(dir).find((f) => f.endsWith(".safetensors"))!;
  const file = path.join(dir, shard);
  const q = [...readSafetensorsHeader(file).values()].find((t) => t.name.endsWith("q_proj.weight"))!;
  const bytes = fs.readFileSync(file);
  bytes.writeUInt16LE(bits, q.offset + 6);
  fs.writeFileSync(file, bytes);
  await expect(loadModel(dir, { device: "cpu" })).rejects.toThrow(/q_proj\.weight.*NaN or infinite/);
});

describe("a weight finite in the checkpoint but past what the weight dtype holds", () => {
  test("1e5 with dtype f16 is refused, naming the tensor, the largest f16 and the wider dtypes", async () => {
    const e = await loadModel(writeTinyModelWithValue(1e5), { device: "cpu", dtype: "f16" }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ModelLoadError);
    expect((e as Error).message).toMatch(/up_proj\.weight.*rounds past the largest f16 number \(65504\) to infinity.*dtype "f32" or "bf16"/);
  });

  test("65504, the largest f16, loads with dtype f16 and gives finite logits; 1e5 loads with bf16", async () => {
    for (const [value, dtype] of [[65504, "f16"], [1e5, "bf16"]] as const) {
      const model = await loadModel(writeTinyModelWithValue(value), { device: "cpu", dtype, kvCacheMemory: 1 << 22 });
      try {
        const logits = await model.logits([1, 2, 3]);
        expect(logits.every(Number.isFinite)).toBe(true);
      } finally {
        await model.dispose();
      }
    }
  });

  /** The f32 value with these bits. */
  const f32Bits = (bits: number) => new Float32Array(new Uint32Array([bits]).buffer)[0];

  // Round to nearest even reaches infinity at the largest finite value plus half an ulp, a tie that
  // rounds up: f16 65504 + 16 = 65520 (f32 bits 0x477ff000), bf16 f32 bits 0x7f7f0000 + 0x8000.
  // The value one f32 ulp below each edge rounds down to the largest finite value and loads.
  test.each([
    ["f32 one ulp below 65520 loads with dtype f16", f32Bits(0x477fefff), "F32", "f16", true],
    ["f32 65520 is refused with dtype f16", 65520, "F32", "f16", false],
    ["f32 -65520 is refused with dtype f16 (the magnitude counts)", -65520, "F32", "f16", false],
    ["f32 one ulp below bf16's edge loads with dtype bf16", f32Bits(0x7f7f7fff), "F32", "bf16", true],
    ["f32 at bf16's edge is refused with dtype bf16", f32Bits(0x7f7f8000), "F32", "bf16", false],
    ["a bf16 checkpoint's 65280 loads with dtype f16", 65280, "BF16", "f16", true],
    ["a bf16 checkpoint's 65536 is refused with dtype f16", 65536, "BF16", "f16", false],
  ] as const)("at the rounding edge: %s", async (_name, value, stored, dtype, loads) => {
    const load = loadModel(writeTinyModelWithValue(value, stored), { device: "cpu", dtype, kvCacheMemory: 1 << 22 });
    if (!loads) {
      await expect(load).rejects.toThrow(/up_proj\.weight.*rounds past the largest/);
      return;
    }
    // Only the load is asserted (its weights kept in 2 bytes a value): a weight near 3.4e38
    // overflows the forward pass's f32 products.
    const model = await load;
    const f32 = await loadModel(writeTinyModelWithValue(0), { device: "cpu", dtype: "f32", kvCacheMemory: 1 << 22 });
    try {
      expect(2 * model.nativeModel().weightBytes).toBe(f32.nativeModel().weightBytes);
    } finally {
      await Promise.all([model.dispose(), f32.dispose()]);
    }
  });

  test("3.4e38, past the largest bf16, is refused with dtype bf16 and loads in f32", async () => {
    const dir = writeTinyModelWithValue(3.4e38);
    await expect(loadModel(dir, { device: "cpu", dtype: "bf16" })).rejects.toThrow(/rounds past the largest bf16 number.*dtype "f32"$/);
    const model = await loadModel(dir, { device: "cpu", dtype: "f32", kvCacheMemory: 1 << 22 });
    await model.dispose();
  });
});
