/**
 * `lckv condense`: turns a pretrained standard model into a condensed-K/V one without training.
 * The calibration text runs through the engine (f32 weights and cache); every layer's K and V
 * are read back; for each layer j and each of the `candidates` layers i below it, the maps of
 * fit.ts are fitted per K/V head; chooseReaders picks which layers stop caching; fold.ts folds
 * the maps into the readers' W_q and W_o. The result is a Hugging Face directory in the LCKV
 * format (`layer_types`, no K/V projections for the readers), checked by the perplexity of a
 * held-back slice of the calibration text before it is moved into place.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { parseConfig, type ModelConfig } from "../config";
import { ConfigError, InvalidInputError, InvalidOptionError } from "../errors";
import { evaluatePerplexity } from "../eval";
import { isHubModelId, resolveModel } from "../hub";
import { loadModel } from "../load-model";
import type { Model } from "../model";
import { readModelTensors, type TensorInfo } from "../safetensors";
import { readJson } from "../model-files";
import { accumulatePair, chooseReaders, emptyPairStats, fitPair, type Choice, type CondenseMethod, type MapStyle, type PairFit, type PairStats } from "./fit";
import { foldOutput, foldOutputBias, foldQuery, type AttentionShape } from "./fold";
import { f32Tensor, readF32, readRaw, transpose, writeSafetensors, type OutTensor } from "./tensors";

export interface CondenseOptions {
  /** The directory to write (must not exist). */
  out: string;
  /** UTF-8 calibration text, and the file it came from (for messages). */
  calibrationText: string;
  calibrationFile?: string;
  /** How many layers keep their K/V, or what fraction of them (exactly one of the two). */
  kvLayers?: number;
  ratio?: number;
  /** "linear" (fitted maps, folded; the default) or "share" (A = B = I). */
  method?: CondenseMethod;
  device?: "auto" | "cpu" | "cuda";
  /** Calibration tokens read (default 16384); the last tenth of the text is held back for the check. */
  calibrationTokens?: number;
  /** Layers below a layer considered as its source (default 8). */
  candidates?: number;
  onProgress?: (phase: "calibrate" | "check", done: number, total: number) => void;
}

export interface CondensedLayer extends Choice {
  /** K's and V's relative residual over the calibration tokens, averaged over K/V heads. */
  kError: number;
  vError: number;
}

export interface CondenseReport {
  out: string;
  method: CondenseMethod;
  layerTypes: number[];
  kvLayers: number[];
  readers: CondensedLayer[];
  calibrationTokens: number;
  heldOutTokens: number;
  /** Perplexity of the held-back tokens: the source model, and the condensed one. */
  perplexity: { source: number; condensed: number };
}

/** The fitted maps, beside the condensed model (docs/condense.md): what the reference's unfolded computation reads. */
export const MAPS_FILE = "condense-maps.safetensors";

/**
 * Where condenseModel writes `out` before renaming it into place, so that the directory appears
 * whole or not at all; a process interrupted mid-run removes it (the command line does).
 */
export function partialDirectory(out: string): string {
  return `${path.resolve(out)}.partial-${process.pid}`;
}

export async function condenseModel(dirOrId: string, o: CondenseOptions): Promise<CondenseReport> {
  const method = o.method ?? "linear";
  if (method !== "linear" && method !== "share") throw new InvalidOptionError("method", `must be "linear" or "share", got ${JSON.stringify(method)}`);
  if (typeof o.out !== "string" || o.out === "") throw new InvalidOptionError("out", "must be a directory path");
  const out = path.resolve(o.out);
  const tmp = partialDirectory(out);
  checkOutputPath(out, tmp);
  const dir = !fs.existsSync(dirOrId) && isHubModelId(dirOrId) ? await resolveModel(dirOrId) : path.resolve(dirOrId);
  const configFile = path.join(dir, "config.json");
  const rawConfig = readJson(configFile) as Record<string, unknown>;
  // parseConfig refuses, as UnsupportedArchitectureError, any architecture the engine does not
  // load; condense takes all it does (Llama, Mistral, GPT-2) in their standard form.
  const config = parseConfig(rawConfig, configFile);
  // GPT-2 has no RoPE: its key maps are full matrices, and its biases call for offsets (fit.ts).
  const style: MapStyle = config.blockStyle === "gpt2" ? "affine" : "rope";
  if (config.kvLayers.length !== config.numLayers)
    throw new ConfigError(configFile, "layer_types", "already condensed: condense takes a model whose every layer caches its own K/V");
  // Under RoPE a key bias is rotated with its position, so no map of the rotated keys (nor any
  // change of W_q) carries it, and the value maps have no offset to carry a value bias: the
  // condensed model would silently lose them. GPT-2's biases are folded (affine maps).
  if (style === "rope" && config.attentionBias)
    throw new ConfigError(configFile, "attention_bias", "must be false for condense: a reader's maps cannot carry the K and V biases of a RoPE model");
  const keep = layersToKeep(config, o);
  const candidates = o.candidates ?? 8;
  if (!Number.isSafeInteger(candidates) || candidates < 1) throw new InvalidOptionError("candidates", `must be a positive integer, got ${candidates}`);

  // The statistics of a pair are headDim x headDim least-squares systems (share measures its
  // error through them too): they need several times that many tokens; the check needs a few
  // windows' worth.
  const need = Math.max(8 * config.headDim, 512);
  const why = `${need} to ${method === "share" ? "measure how well one layer's K/V stands in for another's" : "fit the maps"} at head size ${config.headDim}`;
  if (o.calibrationTokens !== undefined && o.calibrationTokens < need)
    throw new InvalidOptionError("calibrationTokens", `must be at least ${need} for this model (${why}), got ${o.calibrationTokens}`);

  const source = await loadModel(dir, { device: o.device ?? "auto", dtype: "f32", kvCacheDtype: "f32", prefixCache: 0 });
  try {
    if (!source.tokenizer) throw new InvalidInputError(`${dir}: the model has no tokenizer to encode the calibration text with`);
    const ids = source.tokenizer.encode(o.calibrationText, { addSpecialTokens: false });
    // Windows of at most 512 tokens, and no longer than any layer's sliding window: the K/V is
    // read back after each window's prefill, and a layer's window releases the pages below it.
    const slides = source.config.plan.window.filter((w) => w > 0);
    const window = Math.min(source.maxContext, 512, ...slides);
    const heldOut = ids.slice(Math.floor(ids.length * 0.9));
    const calib = ids.slice(0, Math.min(Math.floor(ids.length * 0.9), o.calibrationTokens ?? 16384));
    if (calib.length < need || heldOut.length < HELD_OUT_MIN)
      throw new InvalidInputError(
        `calibration text${o.calibrationFile ? ` ${o.calibrationFile}` : ""}: ${ids.length} tokens; condensing this model needs at least ${leastCalibrationTokens(need)} ` +
          `(${why}, and a tenth, at least ${HELD_OUT_MIN}, held back to check the result)`,
        "LCKV_CALIBRATION_TOO_SHORT",
      );

    const stats = await calibrate(source, calib, window, candidates, style, o.onProgress);
    const shape: AttentionShape = { hidden: config.hiddenSize, numHeads: config.numHeads, numKvHeads: config.numKvHeads, headDim: config.headDim };
    const fits = new Map<string, PairFit[]>();
    for (const [key, heads] of stats) fits.set(key, heads.map((s) => fitPair(s, config.headDim, method)));
    const pairError = (j: number, i: number) => {
      const f = fits.get(`${j}:${i}`);
      return f ? f.reduce((a, x) => a + (x.kError + x.vError) / 2, 0) / f.length : undefined;
    };
    const choices = chooseReaders(config.numLayers, keep, pairError);
    if (config.numLayers - choices.length > keep)
      throw new InvalidOptionError(o.kvLayers !== undefined ? "kvLayers" : "ratio", `cannot keep only ${keep} of ${config.numLayers} layers' K/V with ${candidates} candidate layers below each`);
    const target = Array.from({ length: config.numLayers }, (_, i) => i);
    for (const c of choices) target[c.reader] = c.source;  // each reader's final source

    fs.mkdirSync(tmp, { recursive: true });
    const fitsOf = (j: number) => fits.get(`${j}:${target[j]}`)!;
    writeCondensed(dir, tmp, rawConfig, config, shape, target, fitsOf);
    writeMaps(path.join(tmp, MAPS_FILE), method, style, config, target, fitsOf);
    const readers = choices.map((c) => {
      const f = fits.get(`${c.reader}:${c.source}`)!;
      return { ...c, kError: mean(f.map((x) => x.kError)), vError: mean(f.map((x) => x.vError)) };
    });

    // The check: the held-back tokens' perplexity before and after. Neither model has a layer
    // that reads a higher one, so the fixed-point prefill is a single, exact pass.
    const evalWindow = Math.min(window, 256);
    const before = (await evaluatePerplexity(source, heldOut, { window: evalWindow, prefill: "fixed-point" })).perplexity;
    o.onProgress?.("check", 1, 2);
    const condensed = await loadModel(tmp, { device: source.device, dtype: "f32", kvCacheDtype: "f32", prefixCache: 0 });
    let after: number;
    try {
      after = (await evaluatePerplexity(condensed, heldOut, { window: evalWindow, prefill: "fixed-point" })).perplexity;
    } finally {
      await condensed.dispose();
    }
    o.onProgress?.("check", 2, 2);
    const report: CondenseReport = {
      out,
      method,
      layerTypes: target,
      kvLayers: [...new Set(target)].sort((a, b) => a - b),
      readers,
      calibrationTokens: calib.length,
      heldOutTokens: heldOut.length,
      perplexity: { source: before, condensed: after },
    };
    fs.writeFileSync(path.join(tmp, "README.md"), modelCard(dirOrId, report));
    // The report without the output path: the directory may move, and the file says nothing of where it was made.
    const { out: _out, ...saved } = report;
    fs.writeFileSync(path.join(tmp, "condense.json"), JSON.stringify(saved, null, 2) + "\n");
    fs.renameSync(tmp, out);  // the directory appears whole, or not at all
    return report;
  } finally {
    await source.dispose();
    // Never throws: a failure to clean up must not hide the error that ended the run.
    try {
      fs.rmSync(tmp, { recursive: true, force: true });
    } catch {
      /* left behind, named by its .partial suffix */
    }
  }
}

/**
 * Refuses, before any work, an output the final rename could not create: a path that exists (a
 * symbolic link to nothing too), one under a symbolic link to nothing, one whose nearest
 * existing ancestor is not a writable directory (missing directories between are made), and a
 * name too long for the partial directory `tmp` beside it.
 */
function checkOutputPath(out: string, tmp: string): void {
  const stat = (p: string, follow: boolean) => {
    try {
      return follow ? fs.statSync(p) : fs.lstatSync(p);
    } catch {
      return undefined;
    }
  };
  if (stat(out, false)) throw new InvalidOptionError("out", `${out} already exists; condense writes a new directory`);
  // 255 bytes: a file name's limit on Linux, macOS and Windows file systems.
  const NAME_MAX = 255;
  const extra = Buffer.byteLength(path.basename(tmp)) - Buffer.byteLength(path.basename(out));
  if (Buffer.byteLength(path.basename(tmp)) > NAME_MAX) {
    throw new InvalidOptionError("out", `${path.basename(out)} is too long a name: at most ${NAME_MAX - extra} bytes (its partial directory's name adds ${extra})`);
  }
  let parent = path.dirname(out);
  while (!stat(parent, true) && path.dirname(parent) !== parent) {
    if (stat(parent, false)) throw new InvalidOptionError("out", `${parent} is a symbolic link to nothing, so ${out} cannot be made`);
    parent = path.dirname(parent);
  }
  if (!stat(parent, true)?.isDirectory()) throw new InvalidOptionError("out", `${parent} is not a directory, so ${out} cannot be made`);
  try {
    fs.accessSync(parent, fs.constants.W_OK);
  } catch {
    throw new InvalidOptionError("out", `${parent} is not writable, so ${out} cannot be made`);
  }
}

function layersToKeep(c: ModelConfig, o: CondenseOptions): number {
  if ((o.kvLayers === undefined) === (o.ratio === undefined)) throw new InvalidOptionError("kvLayers", "give exactly one of kvLayers and ratio");
  if (o.kvLayers !== undefined) {
    if (!Number.isSafeInteger(o.kvLayers) || o.kvLayers < 1 || o.kvLayers >= c.numLayers)
      throw new InvalidOptionError("kvLayers", `must be an integer in [1, ${c.numLayers - 1}] (the model has ${c.numLayers} layers), got ${o.kvLayers}`);
    return o.kvLayers;
  }
  const r = o.ratio!;
  if (typeof r !== "number" || !(r > 0 && r < 1)) throw new InvalidOptionError("ratio", `must be a fraction of the layers' K/V to keep, in (0, 1), got ${r}`);
  const keep = Math.round(c.numLayers * r);
  if (keep < 1 || keep >= c.numLayers)
    throw new InvalidOptionError("ratio", `${r} of ${c.numLayers} layers keeps ${keep}; a ratio must keep between 1 and ${c.numLayers - 1} layers (${(1 / c.numLayers).toFixed(3)} to ${((c.numLayers - 1) / c.numLayers).toFixed(3)})`);
  return keep;
}

/** Pair statistics keyed "j:i", one per K/V head, for each layer j and its `candidates` layers below. */
/** Tokens the check holds back at least (the text's last tenth). */
const HELD_OUT_MIN = 64;

/** The fewest tokens of text whose first nine tenths hold `need` and whose last tenth HELD_OUT_MIN. */
export function leastCalibrationTokens(need: number): number {
  let n = need;
  while (Math.floor(n * 0.9) < need || n - Math.floor(n * 0.9) < HELD_OUT_MIN) n++;
  return n;
}

async function calibrate(model: Model, ids: number[], window: number, candidates: number, style: MapStyle, progress?: CondenseOptions["onProgress"]): Promise<Map<string, PairStats[]>> {
  const c = model.config;
  const stats = new Map<string, PairStats[]>();
  for (let j = 1; j < c.numLayers; j++)
    for (let i = Math.max(0, j - candidates); i < j; i++) stats.set(`${j}:${i}`, Array.from({ length: c.numKvHeads }, () => emptyPairStats(c.headDim, style)));
  const kvDim = c.numKvHeads * c.headDim;
  const windows = Math.ceil(ids.length / window);
  for (let w = 0; w < windows; w++) {
    const part = ids.slice(w * window, (w + 1) * window);
    const seq = model.nativeModel().createSequence(part.length);
    try {
      // A standard model has no cyclic group: the fixed-point prefill is one exact pass.
      await seq.append(Int32Array.from(part), { mode: "fixed-point", logits: "none" });
      const n = part.length;
      // Every layer of a standard model is a KV layer: slot l is layer l. K rows, then V rows.
      const kv = Array.from({ length: c.numLayers }, (_, l) => seq.readKv(l, 0, n));
      for (const [key, heads] of stats) {
        const [j, i] = key.split(":").map(Number);
        const ki = kv[i].subarray(0, n * kvDim), vi = kv[i].subarray(n * kvDim), kj = kv[j].subarray(0, n * kvDim), vj = kv[j].subarray(n * kvDim);
        heads.forEach((s, g) => accumulatePair(s, c.headDim, n, kvDim, g * c.headDim, ki, kj, vi, vj));
      }
    } finally {
      seq.dispose();
    }
    progress?.("calibrate", w + 1, windows);
  }
  return stats;
}

/** Writes the condensed model into `dir`: config, tokenizer files, weights. */
function writeCondensed(src: string, dir: string, rawConfig: Record<string, unknown>, c: ModelConfig, shape: AttentionShape, target: number[], fitsOf: (layer: number) => PairFit[]): void {
  // A layer that attends through a sliding window keeps it ('s'; Mistral's window covers every layer).
  const layerTypes = target.map((t, i) => `${t}${c.plan.window[i] > 0 ? "s" : ""}`).join("_");
  const window = c.plan.window.find((w) => w > 0);
  // GPT-2 stays a gpt2 model with layer_types (as test/fixtures/gpt2-lckv); Llama and Mistral become lckv-llama.
  const cfg: Record<string, unknown> =
    c.blockStyle === "gpt2"
      ? { ...rawConfig, layer_types: layerTypes }
      : { ...rawConfig, architectures: ["LCKVLlamaForCausalLM"], model_type: "lckv-llama", layer_types: layerTypes, ...(window ? { sliding_window: window } : {}) };
  if (!window) delete cfg.sliding_window;
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(cfg, null, 2) + "\n");
  for (const f of fs.readdirSync(src)) {
    if (/^(tokenizer.*|special_tokens_map\.json|chat_template\.(jinja|json)|generation_config\.json|vocab\.json|merges\.txt)$/.test(f)) fs.copyFileSync(path.join(src, f), path.join(dir, f));
  }
  const tensors = [...readModelTensors(src).values()];
  const out = c.blockStyle === "gpt2" ? gpt2Tensors(tensors, shape, target, fitsOf) : llamaTensors(tensors, shape, target, fitsOf);
  writeSafetensors(path.join(dir, "model.safetensors"), out.sort((a, b) => a.name.localeCompare(b.name)), { format: "pt" });
}

/** A reader's q_proj (and bias) and o_proj folded; its k_proj and v_proj dropped; the rest as stored. */
function llamaTensors(tensors: TensorInfo[], shape: AttentionShape, target: number[], fitsOf: (layer: number) => PairFit[]): OutTensor[] {
  const out: OutTensor[] = [];
  for (const t of tensors) {
    const m = /^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$/.exec(t.name);
    const layer = m ? Number(m[1]) : -1;
    if (!m || target[layer] === layer) {
      out.push(raw(t));
      continue;
    }
    const [, , proj, kind] = m;
    if (proj === "k_proj" || proj === "v_proj") continue;  // a reader computes no K/V
    const fits = fitsOf(layer);
    if (proj === "q_proj") out.push(f32Tensor(t.name, t.shape, foldQuery(readF32(t), shape, fits, kind === "bias" ? 1 : shape.hidden)));
    else if (kind === "weight") out.push(f32Tensor(t.name, t.shape, foldOutput(readF32(t), shape, fits)));
    else out.push(raw(t));  // o_proj's bias: rope-style maps fit no value offset
  }
  return out;
}

/**
 * GPT-2's Conv1D weights are [in, out]: a reader's c_attn [E, 3E] (q|k|v) becomes q_attn [E, E],
 * its query columns folded (the layout the engine reads for a layer without K/V); c_proj's
 * input rows and bias take the value map and offset.
 */
function gpt2Tensors(tensors: TensorInfo[], shape: AttentionShape, target: number[], fitsOf: (layer: number) => PairFit[]): OutTensor[] {
  const E = shape.hidden;
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const out: OutTensor[] = [];
  for (const t of tensors) {
    const m = /^((?:transformer\.)?h\.(\d+)\.attn\.)(c_attn|c_proj)\.(weight|bias)$/.exec(t.name);
    const layer = m ? Number(m[2]) : -1;
    if (!m || target[layer] === layer) {
      out.push(raw(t));
      continue;
    }
    const [, prefix, , proj, kind] = m;
    const fits = fitsOf(layer);
    if (proj === "c_attn") {
      const all = readF32(t);
      if (kind === "bias") {
        out.push(f32Tensor(`${prefix}q_attn.bias`, [E], foldQuery(all.slice(0, E), shape, fits, 1)));
      } else {
        const wq = new Float32Array(E * E);  // [out, in]: the query columns of [in, 3E]
        for (let i = 0; i < E; i++) for (let o = 0; o < E; o++) wq[o * E + i] = all[i * 3 * E + o];
        out.push(f32Tensor(`${prefix}q_attn.weight`, [E, E], transpose(foldQuery(wq, shape, fits, E), E, E)));
      }
    } else {
      const weight = byName.get(`${prefix}c_proj.weight`);
      if (!weight) throw new InvalidInputError(`${t.file}: '${t.name}' has no '${prefix}c_proj.weight' beside it`);
      const wo = transpose(readF32(weight), E, E);  // [in, out] -> [out, in]
      if (kind === "weight") out.push(f32Tensor(t.name, t.shape, transpose(foldOutput(wo, shape, fits), E, E)));
      else out.push(f32Tensor(t.name, t.shape, foldOutputBias(readF32(t), wo, shape, fits)));
    }
  }
  return out;
}

/**
 * The fitted maps (docs/condense.md, "The maps file"): per reader layer j, the layer it reads and,
 * per K/V head, K_j ≈ K_i A (+ c) and V_j ≈ V_i B (+ e), in f64 as fitted.
 */
function writeMaps(file: string, method: CondenseMethod, style: MapStyle, c: ModelConfig, target: number[], fitsOf: (layer: number) => PairFit[]): void {
  const out: OutTensor[] = [];
  const d = c.headDim, heads = c.numKvHeads;
  const f64 = (name: string, shape: number[], values: Float64Array): OutTensor => ({ name, dtype: "F64", shape, data: Buffer.from(values.buffer, values.byteOffset, values.byteLength) });
  const stack = (parts: Float64Array[]) => {
    const all = new Float64Array(parts.reduce((a, p) => a + p.length, 0));
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    return all;
  };
  for (let j = 0; j < target.length; j++) {
    if (target[j] === j) continue;
    const fits = fitsOf(j);
    const source = Buffer.alloc(4);
    source.writeInt32LE(target[j]);
    out.push({ name: `layers.${j}.source`, dtype: "I32", shape: [1], data: source });
    // Rope style: a_f as (re, im) per frequency pair; matrix style: A, and the offsets.
    out.push(f64(`layers.${j}.k_map`, style === "rope" ? [heads, d / 2, 2] : [heads, d, d], stack(fits.map((f) => (f.keys.kind === "rope" ? interleave(f.keys) : f.keys.m)))));
    out.push(f64(`layers.${j}.v_map`, [heads, d, d], stack(fits.map((f) => f.values.m))));
    if (style === "affine") {
      const zero = new Float64Array(d);  // share fits no offsets
      out.push(f64(`layers.${j}.k_offset`, [heads, d], stack(fits.map((f) => (f.keys.kind === "matrix" && f.keys.offset) || zero))));
      out.push(f64(`layers.${j}.v_offset`, [heads, d], stack(fits.map((f) => f.values.offset ?? zero))));
    }
  }
  const layerTypes = target.join("_");
  writeSafetensors(file, out.sort((a, b) => a.name.localeCompare(b.name, "en", { numeric: true })), { format: "lckv-condense-maps", method, style, layer_types: layerTypes });
}

/** A rope map's (re, im) pairs, [half, 2]. */
function interleave(k: { re: Float64Array; im: Float64Array }): Float64Array {
  const out = new Float64Array(2 * k.re.length);
  k.re.forEach((re, f) => {
    out[2 * f] = re;
    out[2 * f + 1] = k.im[f];
  });
  return out;
}

function raw(t: TensorInfo): OutTensor {
  return { name: t.name, dtype: t.dtype, shape: t.shape, data: readRaw(t) };
}

function mean(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
}

function modelCard(source: string, r: CondenseReport): string {
  const rows = r.readers.map((x) => `| ${x.reader} | ${x.source} | ${x.kError.toFixed(4)} | ${x.vError.toFixed(4)} |`);
  return [
    `# ${path.basename(r.out)}`,
    "",
    `Condensed from \`${source}\` by \`lckv condense\` (method \`${r.method}\`), without training: ${r.readers.length} layers read a lower layer's K/V through linear maps folded into their query and output projections.`,
    "",
    `- layer_types: \`${r.layerTypes.join("_")}\` (${r.kvLayers.length} of ${r.layerTypes.length} layers keep K/V)`,
    `- calibration: ${r.calibrationTokens} tokens; held back for the check: ${r.heldOutTokens} tokens`,
    `- held-back perplexity: ${r.perplexity.source.toFixed(4)} before, ${r.perplexity.condensed.toFixed(4)} after (${(((r.perplexity.condensed / r.perplexity.source) - 1) * 100).toFixed(2)}%)`,
    "",
    "| layer | reads layer | K residual | V residual |",
    "|---|---|---|---|",
    ...rows,
    "",
  ].join("\n");
}
