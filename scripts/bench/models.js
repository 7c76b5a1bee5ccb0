/**
 * The models the bench runs: two shapes (TinyLlama-1.1B and Llama-2-7B, random bf16 weights),
 * each as a standard model and as LCKV, CLA and sandwich variants, plus the shipped default
 * model. A shape's weights are written once (make-random-model.js, every layer with its K/V
 * projections); each variant is a directory of its own config.json and a link to those weights,
 * of which it loads the tensors its layer_types needs. The GGUF files of node-llama-cpp's side
 * (make-gguf.js) are written beside them.
 */
const { execFileSync, spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");

const ROOT = path.join(__dirname, "..", "..");
const COMMON = { maxPositions: 16384, normEps: 1e-5, ropeTheta: 10000 };

/** The shapes, by the name --shapes takes. */
const SHAPES = {
  "1.1b": { what: "TinyLlama-1.1B shape: 22 layers, hidden 2048, 32 heads, 4 K/V heads, MLP 5632, vocab 32000", dir: "tinyllama-1.1b", layers: 22, hidden: 2048, heads: 32, kvHeads: 4, intermediate: 5632, vocab: 32000, ...COMMON },
  "7b": { what: "Llama-2-7B shape: 32 layers, hidden 4096, 32 heads, no GQA, MLP 11008, vocab 32000", dir: "llama2-7b", layers: 32, hidden: 4096, heads: 32, kvHeads: 32, intermediate: 11008, vocab: 32000, ...COMMON },
};
/**
 * --tiny: the same two kinds of shape (with and without GQA), small enough for the CPU; head size
 * 32, the least llama.cpp's quantized K/V blocks take.
 */
const TINY_SHAPES = {
  "1.1b": { what: "tiny, with GQA (stands in for the 1.1B shape): 6 layers, hidden 128, 4 heads, 2 K/V heads, MLP 256, vocab 512", dir: "tiny-gqa", layers: 6, hidden: 128, heads: 4, kvHeads: 2, intermediate: 256, vocab: 512, ...COMMON },
  "7b": { what: "tiny, no GQA (stands in for the 7B shape): 6 layers, hidden 128, 4 heads, 4 K/V heads, MLP 352, vocab 512", dir: "tiny-mha", layers: 6, hidden: 128, heads: 4, kvHeads: 4, intermediate: 352, vocab: 512, ...COMMON },
};

const range = (a, b) => Array.from({ length: b - a }, (_, i) => a + i);
const pattern = (targets) => targets.join("_");

/** The variants of an L-layer shape: layer_types (one K/V target per layer) and what they are. */
function variants(L) {
  const mid = Math.floor(L / 2) - 1;
  return {
    standard: { layerTypes: undefined, what: "standard (every layer caches K/V)" },
    "lckv-w2": { layerTypes: pattern([0, ...range(1, L - 1).map(() => L - 2), L - 1]), what: `LCKV, 2 warm-up layers (0_${L - 2}_..._${L - 2}_${L - 1})` },
    "lckv-w10": {
      // 5 standard layers at the bottom and 5 at the top; the middle attends to its top-most layer.
      layerTypes: pattern([...range(0, 5), ...range(5, L - 5).map(() => L - 6), ...range(L - 5, L)].slice(0, L)),
      what: `LCKV, 10 warm-up layers (0_1_2_3_4_${L - 6}_..._${L - 6}_${L - 5}_..._${L - 1})`,
    },
    cla: { layerTypes: pattern(range(0, L).map((i) => i - (i % 2))), what: "CLA, pairs share the lower layer's K/V (0_0_2_2_...)" },
    sandwich: { layerTypes: pattern([0, ...range(1, L - 1).map(() => mid), L - 1]), what: `sandwich-middle (0_${mid}_..._${mid}_${L - 1})` },
  };
}
const DEFAULT_MODEL = { dir: path.join(ROOT, "models", "default"), what: "the shipped default model (6.5M parameters, LCKV)" };
const MODEL_NAMES = [...Object.keys(variants(22)), "default"];

/** The arguments of make-random-model.js and make-gguf.js for a shape. */
function shapeArgs(s) {
  return ["--layers", s.layers, "--hidden", s.hidden, "--heads", s.heads, "--kv-heads", s.kvHeads, "--intermediate", s.intermediate, "--vocab", s.vocab, "--max-positions", s.maxPositions].map(String);
}

function runScript(script, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(__dirname, script), ...args], { stdio: ["ignore", "inherit", "inherit"] });
    child.on("error", reject);
    child.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`${script} ${args.join(" ")} exited with ${code}`))));
  });
}

/** The model directories of one bench run: `work` holds them, `tiny` picks the tiny shapes. */
class ModelStore {
  constructor(work, tiny) {
    this.work = work;
    this.shapes = tiny ? TINY_SHAPES : SHAPES;
  }
  shape(key) {
    const s = this.shapes[key];
    if (!s) throw new Error(`unknown shape ${key} (known: ${Object.keys(this.shapes).join(", ")})`);
    return s;
  }
  variant(shapeKey, name) {
    if (name === "default") return DEFAULT_MODEL;
    const v = variants(this.shape(shapeKey).layers)[name];
    if (!v) throw new Error(`unknown model ${name} (known: ${MODEL_NAMES.join(", ")})`);
    return v;
  }
  dir(shapeKey, name) {
    return name === "default" ? DEFAULT_MODEL.dir : path.join(this.work, this.shape(shapeKey).dir, name);
  }
  /** Writes the shape's weights if they are not on disk yet, then each variant's directory. */
  async ensure(shapeKey, names) {
    const s = this.shape(shapeKey);
    const std = this.dir(shapeKey, "standard");
    if (names.some((n) => n !== "default") && !fs.existsSync(path.join(std, "config.json"))) await runScript("make-random-model.js", ["--out", std, ...shapeArgs(s)]);
    for (const name of names) {
      const v = this.variant(shapeKey, name);
      if (name === "default" || !v.layerTypes || fs.existsSync(path.join(this.dir(shapeKey, name), "config.json"))) continue;
      await runScript("make-random-model.js", ["--out", this.dir(shapeKey, name), ...shapeArgs(s), "--layer-types", v.layerTypes, "--weights-from", path.join(std, "model.safetensors")]);
    }
  }
  /** The GGUF of the shape with `type` matrices (f16, q8_0, q4_0), written if it is not there. */
  async gguf(shapeKey, type) {
    const file = path.join(this.work, this.shape(shapeKey).dir, "gguf", `${type}.gguf`);
    if (!fs.existsSync(file)) {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      await runScript("make-gguf.js", ["--out", file, "--type", type, ...shapeArgs(this.shape(shapeKey))]);
    }
    return file;
  }
}

/**
 * The profiling scripts' model (profile-step.js, generation-steps.js): a TinyLlama-shaped model
 * with random bf16 weights and the given layer_types (default: standard), written once under
 * the temporary directory. Returns its directory.
 */
function profilingModelDir(layerTypes) {
  const dir = path.join(os.tmpdir(), "lckv-bench", layerTypes ? `profile-${layerTypes.length}-${layerTypes.slice(0, 40)}` : "standard");
  if (!fs.existsSync(path.join(dir, "config.json"))) {
    const args = ["--out", dir, ...(layerTypes ? ["--layer-types", layerTypes] : [])];
    execFileSync(process.execPath, [path.join(__dirname, "make-random-model.js"), ...args], { stdio: "inherit" });
  }
  return dir;
}

module.exports = { SHAPES, TINY_SHAPES, MODEL_NAMES, variants, ModelStore, shapeArgs, profilingModelDir };
