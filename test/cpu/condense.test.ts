/**
 * lckv condense (lib/condense): the least-squares maps, their folding into W_q and W_o, the
 * choice of readers, and the whole command on a model built so that one layer's K/V are an exact
 * linear map of another's: there the folded model must give the source's logits.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { loadModel, type Model } from "../../lib";
import { condenseModel, leastCalibrationTokens, MAPS_FILE } from "../../lib/condense/condense";
import { accumulatePair, chooseReaders, emptyPairStats, fitPair } from "../../lib/condense/fit";
import { foldOutput, foldQuery } from "../../lib/condense/fold";
import { ConfigError, InvalidInputError, InvalidOptionError, UnsupportedArchitectureError } from "../../lib/errors";
import { readF32 } from "../../lib/condense/tensors";
import { readModelTensors } from "../../lib/safetensors";
import { rng, safetensorsBytes, tinyLlamaTensors, writeTinyModel, type RawTensor } from "../helpers/tiny-model";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";
const ROOT = path.join(__dirname, "..", "..");
const calibration = fs.readFileSync(path.join(ROOT, "README.md"), "utf8") + fs.readFileSync(path.join(ROOT, "docs", "architecture.md"), "utf8");

// A complex scalar per frequency pair applied to a head (rotate-half layout): (a z)_f.
function applyA(x: Float64Array | number[], aRe: number[], aIm: number[], hd: number): number[] {
  const half = hd / 2, y = new Array(hd).fill(0);
  for (let f = 0; f < half; f++) {
    y[f] = aRe[f] * x[f] - aIm[f] * x[f + half];
    y[f + half] = aIm[f] * x[f] + aRe[f] * x[f + half];
  }
  return y;
}

/** A chat template as newer Hugging Face repos ship it, in chat_template.jinja. */
const CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";

describe("the maps", () => {
  const hd = 8, half = 4, tokens = 200, r = rng(3);
  const aRe = Array.from({ length: half }, () => r() * 2 - 1), aIm = Array.from({ length: half }, () => r() * 2 - 1);
  const B = Float64Array.from({ length: hd * hd }, () => r() - 0.5);
  const ki = new Float32Array(tokens * hd), vi = new Float32Array(tokens * hd), kj = new Float32Array(tokens * hd), vj = new Float32Array(tokens * hd);
  for (let t = 0; t < tokens; t++) {
    for (let d = 0; d < hd; d++) {
      ki[t * hd + d] = r() * 2 - 1;
      vi[t * hd + d] = r() * 2 - 1;
    }
    const k = applyA(Array.from(ki.subarray(t * hd, t * hd + hd)), aRe, aIm, hd);
    for (let c = 0; c < hd; c++) {
      kj[t * hd + c] = k[c];
      let v = 0;
      for (let q = 0; q < hd; q++) v += vi[t * hd + q] * B[q * hd + c];
      vj[t * hd + c] = v;
    }
  }
  const s = emptyPairStats(hd);
  accumulatePair(s, hd, tokens, hd, 0, ki, kj, vi, vj);

  test("linear recovers an exact complex scalar per frequency pair and an exact B, with residuals near 0", () => {
    const fit = fitPair(s, hd, "linear");
    if (fit.keys.kind !== "rope") throw new Error("a Llama pair fits a rope key map");
    for (let f = 0; f < half; f++) {
      expect(fit.keys.re[f]).toBeCloseTo(aRe[f], 5);
      expect(fit.keys.im[f]).toBeCloseTo(aIm[f], 5);
    }
    for (let e = 0; e < hd * hd; e++) expect(fit.values.m[e]).toBeCloseTo(B[e], 3);
    expect(fit.values.offset).toBeNull();
    expect(fit.kError).toBeLessThan(1e-6);
    expect(fit.vError).toBeLessThan(1e-5);
  });

  test("share is the identity, and its residuals measure how far the layers are apart", () => {
    const fit = fitPair(s, hd, "share");
    if (fit.keys.kind !== "rope") throw new Error("a Llama pair fits a rope key map");
    expect(Array.from(fit.keys.re)).toEqual([1, 1, 1, 1]);
    expect(Array.from(fit.keys.im)).toEqual([0, 0, 0, 0]);
    expect(fit.kError).toBeGreaterThan(0.1);
    const same = emptyPairStats(hd);
    accumulatePair(same, hd, tokens, hd, 0, ki, ki, vi, vi);
    const exact = fitPair(same, hd, "share");
    expect(exact.kError).toBeLessThan(1e-9);
    expect(exact.vError).toBeLessThan(1e-9);
  });

  test("folded into W_q and W_o, the maps give the same scores and outputs as reading the mapped K/V", () => {
    const fit = fitPair(s, hd, "linear");
    const shape = { hidden: 5, numHeads: 2, numKvHeads: 1, headDim: hd };
    const wq = Float32Array.from({ length: 2 * hd * 5 }, () => r() - 0.5);
    const wo = Float32Array.from({ length: 5 * 2 * hd }, () => r() - 0.5);
    const x = Array.from({ length: 5 }, () => r() - 0.5);
    const k = Array.from({ length: hd }, () => r() - 0.5);
    const o = Array.from({ length: 2 * hd }, () => r() - 0.5);  // both heads' outputs over V_i
    const qOf = (w: Float32Array, h: number) => Array.from({ length: hd }, (_, d) => x.reduce((acc, xv, c) => acc + w[(h * hd + d) * 5 + c] * xv, 0));
    const wq2 = foldQuery(wq, shape, [fit]);
    if (fit.keys.kind !== "rope") throw new Error("a Llama pair fits a rope key map");
    const mapped = applyA(k, Array.from(fit.keys.re), Array.from(fit.keys.im), hd);
    for (let h = 0; h < 2; h++) {
      const direct = qOf(wq, h).reduce((a, q, d) => a + q * mapped[d], 0);
      const folded = qOf(wq2, h).reduce((a, q, d) => a + q * k[d], 0);
      expect(folded).toBeCloseTo(direct, 5);
    }
    const wo2 = foldOutput(wo, shape, [fit]);
    for (let row = 0; row < 5; row++) {
      let direct = 0, folded = 0;
      for (let h = 0; h < 2; h++)
        for (let c = 0; c < hd; c++) {
          let ob = 0;
          for (let q = 0; q < hd; q++) ob += o[h * hd + q] * fit.values.m[q * hd + c];
          direct += wo[row * 2 * hd + h * hd + c] * ob;
          folded += wo2[row * 2 * hd + h * hd + c] * o[h * hd + c];
        }
      expect(folded).toBeCloseTo(direct, 4);
    }
  });

  test("readers are chosen by least cost; a read layer that becomes a reader takes its readers along; layer 0 keeps its K/V", () => {
    const err: Record<string, number> = { "1:0": 0.5, "2:0": 0.9, "2:1": 0.1, "3:2": 0.05, "3:1": 0.3, "3:0": 0.8 };
    // 3 reads 2 first (0.05). Then 2 reading 1 costs 0.1 plus what moving 3 from 2 to 1 adds
    // (0.3 - 0.05): 0.35, below 1 reading 0 (0.5).
    expect(chooseReaders(4, 2, (j, i) => err[`${j}:${i}`]).map((x) => [x.reader, x.source, x.error])).toEqual([[2, 1, 0.1], [3, 1, 0.3]]);
    // Down to one layer: everything reads layer 0.
    expect(chooseReaders(4, 1, (j, i) => err[`${j}:${i}`]).map((x) => [x.reader, x.source])).toEqual([[1, 0], [2, 0], [3, 0]]);
    // A move that needs an unmeasured pair is not made.
    expect(chooseReaders(3, 1, (j, i) => (j === 2 && i === 0 ? undefined : 0.1))).toHaveLength(1);
  });
});

/**
 * A 3-layer model whose layer 1 sees layer 0's input (layer 0 adds nothing to the residual: its
 * o_proj and down_proj are zero, and both layers share their input norm), with layer 1's K and V
 * projections exact linear maps of layer 0's: K_1 = a K_0 per frequency pair, V_1 = V_0 B.
 */
function mappedModel(): { dir: string; maps: { aRe: number[]; aIm: number[]; B: number[] }[] } {
  const spec = { numLayers: 3, hidden: 32, heads: 4, kvHeads: 2, intermediate: 48, vocab: 4096, maxPositions: 512, seed: 21 };
  const t = tinyLlamaTensors(spec);
  const get = (n: string) => t.find((x) => x.name === n) as RawTensor;
  const r = rng(5), hd = 8, half = 4, E = 32;
  get("model.layers.0.self_attn.o_proj.weight").data.fill(0);
  get("model.layers.0.mlp.down_proj.weight").data.fill(0);
  get("model.layers.1.input_layernorm.weight").data.set(get("model.layers.0.input_layernorm.weight").data);
  const k0 = get("model.layers.0.self_attn.k_proj.weight").data, v0 = get("model.layers.0.self_attn.v_proj.weight").data;
  const k1 = get("model.layers.1.self_attn.k_proj.weight").data, v1 = get("model.layers.1.self_attn.v_proj.weight").data;
  const maps = [];
  for (let g = 0; g < 2; g++) {
    const aRe = Array.from({ length: half }, () => 0.5 + r()), aIm = Array.from({ length: half }, () => r() - 0.5);
    const B = Array.from({ length: hd * hd }, () => r() - 0.5);
    maps.push({ aRe, aIm, B });
    for (let col = 0; col < E; col++) {
      const head = Float64Array.from({ length: hd }, (_, d) => k0[(g * hd + d) * E + col]);
      applyA(head, aRe, aIm, hd).forEach((y, d) => (k1[(g * hd + d) * E + col] = y));
      for (let c = 0; c < hd; c++) {
        let v = 0;
        for (let q = 0; q < hd; q++) v += v0[(g * hd + q) * E + col] * B[q * hd + c];
        v1[(g * hd + c) * E + col] = v;
      }
    }
  }
  const dir = writeTinyModel(spec, { tensors: t });
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(ROOT, "models", "default", f), path.join(dir, f));
  fs.writeFileSync(path.join(dir, "chat_template.jinja"), CHAT_TEMPLATE);
  return { dir, maps };
}

/** condense-maps.safetensors: its metadata, and each tensor's shape and values (F64 or I32). */
function readMaps(dir: string): { metadata: Record<string, string>; tensors: Record<string, { shape: number[]; values: Float64Array | Int32Array }> } {
  const buf = fs.readFileSync(path.join(dir, MAPS_FILE));
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
  const tensors: Record<string, { shape: number[]; values: Float64Array | Int32Array }> = {};
  for (const [name, t] of Object.entries<any>(header)) {
    if (name === "__metadata__") continue;
    const bytes = buf.subarray(8 + n + t.data_offsets[0], 8 + n + t.data_offsets[1]);
    const copy = Uint8Array.from(bytes).buffer;  // aligned
    tensors[name] = { shape: t.shape, values: t.dtype === "F64" ? new Float64Array(copy) : new Int32Array(copy) };
  }
  return { metadata: header.__metadata__, tensors };
}

/** A copy of a Llama model whose config names an architecture the engine does not load. */
function unsupportedModel(): string {
  const dir = testTempDir("lckv-condense-qwen-");
  const cfg = JSON.parse(fs.readFileSync(path.join(ROOT, "test", "fixtures", "llama-gqa-hd32", "config.json"), "utf8"));
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...cfg, architectures: ["Qwen2ForCausalLM"], model_type: "qwen2" }));
  return dir;
}

function relErr(a: Float32Array, b: Float32Array): number {
  let d = 0, s = 0;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    s = Math.max(s, Math.abs(b[i]));
  }
  return d / s;
}

const outDir = (name: string) => path.join(testTempDir("lckv-condense-"), name);

/** `use` of the model in `dir`, loaded on the CPU with an f32 cache, then disposed. */
async function withCpuModel<T>(dir: string, use: (m: Model) => Promise<T>): Promise<T> {
  const m = await loadModel(dir, { device: "cpu", kvCacheDtype: "f32" });
  try {
    return await use(m);
  } finally {
    await m.dispose();
  }
}

describe("lckv condense on a model with an exact linear relation between two layers", () => {
  const { dir: src, maps } = mappedModel();
  const prompt = Array.from({ length: 40 }, (_, i) => (i * 97 + 13) % 4096);
  let sourceLogits: Float32Array;
  beforeAll(async () => {
    sourceLogits = await withCpuModel(src, (m) => m.logits(prompt));
  });

  test("linear finds the pair, folds its maps, and the condensed model gives the source's logits", async () => {
    const out = outDir("linear");
    const report = await condenseModel(src, { out, calibrationText: calibration, kvLayers: 2, method: "linear", device: "cpu", calibrationTokens: 2048 });
    expect(report.layerTypes).toEqual([0, 0, 2]);
    expect(report.readers[0].kError).toBeLessThan(1e-6);
    expect(report.readers[0].vError).toBeLessThan(1e-5);
    const cfg = JSON.parse(fs.readFileSync(path.join(out, "config.json"), "utf8"));
    expect(cfg.layer_types).toBe("0_0_2");
    expect(cfg.model_type).toBe("lckv-llama");
    await withCpuModel(out, async (m) => {
      expect(m.config.kvLayers).toEqual([0, 2]);
      expect(relErr(await m.logits(prompt), sourceLogits)).toBeLessThan(1e-4);
    });
    // The reader has no K/V projections; the model card and the report sit beside the weights.
    const header = fs.readFileSync(path.join(out, "model.safetensors"));
    const names = Object.keys(JSON.parse(header.subarray(8, 8 + Number(header.readBigUInt64LE(0))).toString("utf8")));
    expect(names).not.toContain("model.layers.1.self_attn.k_proj.weight");
    expect(names).not.toContain("model.layers.1.self_attn.v_proj.weight");
    expect(fs.readFileSync(path.join(out, "README.md"), "utf8")).toMatch(/held-back perplexity: [\d.]+ before, [\d.]+ after/);
    expect(report.perplexity.condensed / report.perplexity.source).toBeCloseTo(1, 3);
    // The maps file holds what was fitted: layer 1 reads layer 0 through the maps it was built with.
    const f = readMaps(out);
    expect(f.metadata).toMatchObject({ format: "lckv-condense-maps", method: "linear", style: "rope", layer_types: "0_0_2" });
    expect(Object.keys(f.tensors).sort()).toEqual(["layers.1.k_map", "layers.1.source", "layers.1.v_map"]);
    expect(Array.from(f.tensors["layers.1.source"].values)).toEqual([0]);
    expect(f.tensors["layers.1.k_map"].shape).toEqual([2, 4, 2]);
    expect(f.tensors["layers.1.v_map"].shape).toEqual([2, 8, 8]);
    maps.forEach((want, g) => {
      const k = f.tensors["layers.1.k_map"].values.subarray(g * 8, (g + 1) * 8);
      want.aRe.forEach((re, f) => {
        expect(k[2 * f]).toBeCloseTo(re, 4);
        expect(k[2 * f + 1]).toBeCloseTo(want.aIm[f], 4);
      });
      const b = f.tensors["layers.1.v_map"].values.subarray(g * 64, (g + 1) * 64);
      want.B.forEach((x, e) => expect(b[e]).toBeCloseTo(x, 3));
    });
    // The tokenizer's files come along, a chat template in a file of its own too.
    expect(fs.readFileSync(path.join(out, "chat_template.jinja"), "utf8")).toBe(CHAT_TEMPLATE);
    // condense.json is the report, without the directory it was written to.
    const saved = JSON.parse(fs.readFileSync(path.join(out, "condense.json"), "utf8"));
    expect(saved.out).toBeUndefined();
    expect(saved.layerTypes).toEqual([0, 0, 2]);
  });

  test("a Mistral model whose sliding window is shorter than a calibration window condenses, and keeps its window", async () => {
    const mistral = testTempDir("lckv-condense-mistral-");
    for (const f of fs.readdirSync(src)) fs.copyFileSync(path.join(src, f), path.join(mistral, f));
    const cfg = JSON.parse(fs.readFileSync(path.join(src, "config.json"), "utf8"));
    fs.writeFileSync(path.join(mistral, "config.json"), JSON.stringify({ ...cfg, architectures: ["MistralForCausalLM"], model_type: "mistral", sliding_window: 64 }));
    const out = outDir("mistral");
    const report = await condenseModel(mistral, { out, calibrationText: calibration, kvLayers: 2, method: "linear", device: "cpu", calibrationTokens: 2048 });
    expect(report.layerTypes).toEqual([0, 0, 2]);
    const written = JSON.parse(fs.readFileSync(path.join(out, "config.json"), "utf8"));
    expect(written.layer_types).toBe("0s_0s_2s");
    expect(written.sliding_window).toBe(64);
    await withCpuModel(out, async (m) => expect(m.config.plan.window).toEqual([64, 64, 64]));
  });

  test("the calibration text's least length: nine tenths for the fit, a tenth of at least 64 tokens for the check", () => {
    for (const need of [512, 1024]) {
      const n = leastCalibrationTokens(need);
      const fits = (x: number) => Math.floor(x * 0.9) >= need && x - Math.floor(x * 0.9) >= 64;
      expect(fits(n)).toBe(true);
      expect(fits(n - 1)).toBe(false);
    }
    expect(leastCalibrationTokens(512)).toBe(631);
  });

  test("share reads layer 0's K/V unmapped: the same pattern, further from the source", async () => {
    const out = outDir("share");
    const report = await condenseModel(src, { out, calibrationText: calibration, kvLayers: 2, method: "share", device: "cpu", calibrationTokens: 2048 });
    await withCpuModel(out, async (m) => {
      expect(relErr(await m.logits(prompt), sourceLogits)).toBeGreaterThan(1e-2);
    });
    expect(report.readers.every((x) => x.kError > 0.01)).toBe(true);
  });

  test("bad input is refused by name, and nothing is left half-written", async () => {
    const parent = testTempDir("lckv-condense-bad-");
    const out = path.join(parent, "m");
    const run = (o: Record<string, unknown>, dir = src) => condenseModel(dir, { out, calibrationText: calibration, device: "cpu", kvLayers: 2, ...o } as any).catch((e) => e);
    let e = await run({ calibrationText: "too short", calibrationFile: "short.txt" });
    expect(e).toBeInstanceOf(InvalidInputError);
    expect(e.code).toBe("LCKV_CALIBRATION_TOO_SHORT");
    expect(e.message).toMatch(/short\.txt: \d+ tokens; condensing this model needs at least \d+/);
    e = await run({ kvLayers: undefined, ratio: 0.1 });
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.option).toBe("ratio");
    expect(e.message).toMatch(/keeps 0/);
    e = await run({ kvLayers: 3 });
    expect(e.option).toBe("kvLayers");
    e = await run({ ratio: 0.5 });
    expect(e.option).toBe("kvLayers");  // both given
    e = await run({}, unsupportedModel());
    expect(e).toBeInstanceOf(UnsupportedArchitectureError);
    expect(e.message).toMatch(/Qwen2ForCausalLM/);
    // K/V biases under RoPE: no map can carry them, so such a model is refused, not condensed without them.
    const biased = testTempDir("lckv-condense-bias-");
    const llamaConfig = JSON.parse(fs.readFileSync(path.join(src, "config.json"), "utf8"));
    fs.writeFileSync(path.join(biased, "config.json"), JSON.stringify({ ...llamaConfig, attention_bias: true }));
    e = await run({}, biased);
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.field).toBe("attention_bias");
    expect(e.message).toMatch(/must be false for condense: a reader's maps cannot carry the K and V biases of a RoPE model/);
    e = await run({}, path.join(ROOT, "test", "fixtures", "lckv-w2"));
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.message).toMatch(/layer_types.*already condensed/);
    expect(fs.readdirSync(parent)).toEqual([]);  // no output, no partial directory
    fs.mkdirSync(out);
    e = await run({});
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.option).toBe("out");
    expect(fs.readdirSync(out)).toEqual([]);
    // Outputs the final rename could not make are refused before any work, by name: a symbolic
    // link to nothing, and a path under a file.
    const dangling = path.join(parent, "dangling");
    fs.symlinkSync(path.join(parent, "nowhere"), dangling);
    e = await run({ out: dangling });
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.message).toMatch(/option 'out': .*dangling already exists/);
    const file = path.join(parent, "file.txt");
    fs.writeFileSync(file, "x");
    for (const under of [path.join(file, "sub"), path.join(file, "a", "b")]) {
      e = await run({ out: under });
      expect(e).toBeInstanceOf(InvalidOptionError);
      expect(e.message).toMatch(/option 'out': .*file\.txt is not a directory, so .* cannot be made/);
    }
    // Under a symbolic link to nothing, and a name too long for the partial directory beside it.
    e = await run({ out: path.join(dangling, "sub", "m") });
    expect(e.message).toMatch(/option 'out': .*dangling is a symbolic link to nothing, so .* cannot be made/);
    e = await run({ out: path.join(parent, "x".repeat(250)) });
    expect(e.message).toMatch(/option 'out': x{250} is too long a name: at most \d+ bytes \(its partial directory's name adds \d+\)/);
    // A path with missing directories on the way passes the check (they would be made); this run
    // is refused for its calibration, before anything is written.
    e = await run({ out: path.join(parent, "new", "deeper", "m"), calibrationText: "too short" });
    expect(e.code).toBe("LCKV_CALIBRATION_TOO_SHORT");
    expect(fs.readdirSync(parent).sort()).toEqual(["dangling", "file.txt", "m"]);
  });
});

/**
 * GPT-2 (test/fixtures/gpt2: 3 layers, 4 heads of 16) rebuilt so that layer 1 sees layer 0's
 * input (layer 0's c_proj and mlp.c_proj zero, both layers share ln_1) and its keys and values
 * are exact affine maps of layer 0's, per head: K_1 = K_0 A + c, V_1 = V_0 B + e (the biases of
 * c_attn carry the offsets).
 */
function mappedGpt2(): { dir: string; maps: { A: number[]; c: number[]; B: number[]; e: number[] }[] } {
  const fixture = path.join(ROOT, "test", "fixtures", "gpt2");
  const t = [...readModelTensors(fixture).values()].map((x) => ({ name: x.name, shape: x.shape, data: readF32(x) }));
  const get = (n: string) => t.find((x) => x.name === `transformer.${n}`)!.data;
  const r = rng(9), E = 64, hd = 16;
  for (const n of ["h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias", "h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias"]) get(n).fill(0);
  get("h.1.ln_1.weight").set(get("h.0.ln_1.weight"));
  get("h.1.ln_1.bias").set(get("h.0.ln_1.bias"));
  const w0 = get("h.0.attn.c_attn.weight"), b0 = get("h.0.attn.c_attn.bias"), w1 = get("h.1.attn.c_attn.weight"), b1 = get("h.1.attn.c_attn.bias");
  const maps = [];
  for (let h = 0; h < 4; h++) {
    const A = Array.from({ length: hd * hd }, () => r() - 0.5), c = Array.from({ length: hd }, () => r() - 0.5);
    const B = Array.from({ length: hd * hd }, () => r() - 0.5), e = Array.from({ length: hd }, () => r() - 0.5);
    maps.push({ A, c, B, e });
    for (const [part, M, off] of [[1, A, c], [2, B, e]] as const) {
      const col0 = part * E + h * hd;  // this head's columns of the keys (part 1) or values (part 2)
      for (let out = 0; out < hd; out++) {
        for (let i = 0; i < E; i++) {
          let acc = 0;
          for (let q = 0; q < hd; q++) acc += w0[i * 3 * E + col0 + q] * M[q * hd + out];
          w1[i * 3 * E + col0 + out] = acc;
        }
        let acc = off[out];
        for (let q = 0; q < hd; q++) acc += b0[col0 + q] * M[q * hd + out];
        b1[col0 + out] = acc;
      }
    }
  }
  const dir = testTempDir("lckv-condense-gpt2-");
  fs.writeFileSync(path.join(dir, "model.safetensors"), safetensorsBytes(t));
  for (const f of ["config.json", "tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(fixture, f), path.join(dir, f));
  return { dir, maps };
}

describe("lckv condense on GPT-2 (full key maps, offsets folded away or into c_proj's bias)", () => {
  const { dir: src, maps } = mappedGpt2();
  const prompt = Array.from({ length: 100 }, (_, i) => (i * 37 + 5) % 301);
  let sourceLogits: Float32Array;
  beforeAll(async () => {
    sourceLogits = await withCpuModel(src, (m) => m.logits(prompt));
  });

  test("linear fits A, c, B, e exactly, and the condensed model (q_attn, folded c_proj) gives the source's logits", async () => {
    const out = outDir("linear");
    const report = await condenseModel(src, { out, calibrationText: calibration, kvLayers: 2, method: "linear", device: "cpu", calibrationTokens: 2048 });
    expect(report.layerTypes).toEqual([0, 0, 2]);
    expect(report.readers[0].kError).toBeLessThan(1e-6);
    expect(report.readers[0].vError).toBeLessThan(1e-6);
    const cfg = JSON.parse(fs.readFileSync(path.join(out, "config.json"), "utf8"));
    expect(cfg).toMatchObject({ model_type: "gpt2", architectures: ["GPT2LMHeadModel"], layer_types: "0_0_2" });
    const names = [...readModelTensors(out).keys()];
    expect(names).toContain("transformer.h.1.attn.q_attn.weight");
    expect(names).toContain("transformer.h.1.attn.q_attn.bias");
    expect(names).not.toContain("transformer.h.1.attn.c_attn.weight");
    expect(names).toContain("transformer.h.2.attn.c_attn.weight");
    await withCpuModel(out, async (m) => {
      expect(m.config.kvLayers).toEqual([0, 2]);
      expect(relErr(await m.logits(prompt), sourceLogits)).toBeLessThan(1e-4);
    });
    const f = readMaps(out);
    expect(f.metadata).toMatchObject({ method: "linear", style: "affine", layer_types: "0_0_2" });
    expect(f.tensors["layers.1.k_map"].shape).toEqual([4, 16, 16]);
    expect(f.tensors["layers.1.k_offset"].shape).toEqual([4, 16]);
    maps.forEach((want, h) => {
      const at = (name: string, n: number) => f.tensors[`layers.1.${name}`].values.subarray(h * n, (h + 1) * n);
      want.A.forEach((x, i) => expect(at("k_map", 256)[i]).toBeCloseTo(x, 3));
      want.c.forEach((x, i) => expect(at("k_offset", 16)[i]).toBeCloseTo(x, 3));
      want.B.forEach((x, i) => expect(at("v_map", 256)[i]).toBeCloseTo(x, 3));
      want.e.forEach((x, i) => expect(at("v_offset", 16)[i]).toBeCloseTo(x, 3));
    });
  });

  test("share on the same model: the same pattern, further from the source", async () => {
    const out = outDir("share");
    const report = await condenseModel(src, { out, calibrationText: calibration, kvLayers: 2, method: "share", device: "cpu", calibrationTokens: 2048 });
    expect(report.layerTypes).toEqual([0, 0, 2]);
    await withCpuModel(out, async (m) => {
      expect(relErr(await m.logits(prompt), sourceLogits)).toBeGreaterThan(1e-2);
    });
  });

  test("bad input is refused by name, and nothing is left half-written", async () => {
    const parent = testTempDir("lckv-condense-bad-");
    const out = path.join(parent, "m");
    const run = (o: Record<string, unknown>, dir = src) => condenseModel(dir, { out, calibrationText: calibration, device: "cpu", kvLayers: 2, ...o } as any).catch((e) => e);
    let e = await run({ calibrationText: "far too short" });
    expect(e).toBeInstanceOf(InvalidInputError);
    expect(e.code).toBe("LCKV_CALIBRATION_TOO_SHORT");
    expect(e.message).toMatch(/to fit the maps at head size 16/);
    // A --calib-tokens below what the maps need is named, whatever the text's length.
    e = await run({ calibrationTokens: 10 });
    expect(e).toMatchObject({ code: "LCKV_INVALID_OPTION", option: "calibrationTokens" });
    expect(e.message).toMatch(/must be at least 512 for this model \(512 to fit the maps at head size 16\), got 10/);
    e = await run({ calibrationText: "far too short", method: "share" });
    expect(e.message).toMatch(/to measure how well one layer's K\/V stands in for another's at head size 16/);
    e = await run({ kvLayers: 0 });
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.option).toBe("kvLayers");
    e = await run({ kvLayers: undefined, ratio: 0.99 });
    expect(e.option).toBe("ratio");
    expect(e.message).toMatch(/keeps 3/);
    e = await run({}, path.join(ROOT, "test", "fixtures", "gpt2-lckv"));
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.message).toMatch(/layer_types.*already condensed/);
    expect(fs.readdirSync(parent)).toEqual([]);
  });
});
