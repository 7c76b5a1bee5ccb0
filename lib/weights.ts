/**
 * Checkpoint tensor names -> the engine's canonical names, with the layout fixes each format
 * needs (GPT-2 stores Conv1D weights as [in, out] and fuses q, k and v into c_attn).
 * Shapes are checked here, before any data is read, so a mismatch names the tensor and file.
 */
import { ModelConfig } from "./config";
import { ModelLoadError, SafetensorsError } from "./errors";
import { TensorInfo } from "./safetensors";

export interface TensorSource {
  name: string;
  sourceName: string;
  file: string;
  offset: number;
  nbytes: number;
  dtype: "F32" | "F16" | "BF16";
  shape: number[];
  transpose?: boolean;
  slice?: [number, number];
}

interface Want {
  canonical: string;
  /** Candidate checkpoint names, first found wins. */
  from: string[];
  /** Shape after layout conversion: [out, in] or [n]. */
  shape: number[];
  transpose?: boolean;
  slice?: [number, number];
  /** Shape as stored, when it differs from `shape` (fused or transposed). */
  storedShape?: number[];
}

const LOADABLE = new Set(["F32", "F16", "BF16"]);

function llamaWants(c: ModelConfig): Want[] {
  const E = c.hiddenSize;
  const qd = c.numHeads * c.headDim;
  const kvd = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const p = (n: string) => [`model.${n}`, n];
  const w: Want[] = [
    { canonical: "embed.weight", from: p("embed_tokens.weight"), shape: [c.vocabSize, E] },
    { canonical: "final_norm.weight", from: p("norm.weight"), shape: [E] },
  ];
  if (!c.tieWordEmbeddings) w.push({ canonical: "lm_head.weight", from: ["lm_head.weight"], shape: [c.vocabSize, E] });
  for (let i = 0; i < c.numLayers; i++) {
    const L = (n: string) => p(`layers.${i}.${n}`);
    const C = (n: string) => `layers.${i}.${n}`;
    const kv = c.kvLayers.includes(i);
    w.push({ canonical: C("attn_norm.weight"), from: L("input_layernorm.weight"), shape: [E] });
    w.push({ canonical: C("mlp_norm.weight"), from: L("post_attention_layernorm.weight"), shape: [E] });
    const proj: [string, string, number, number][] = [
      ["q", "self_attn.q_proj", qd, E],
      ["o", "self_attn.o_proj", E, qd],
    ];
    if (kv) proj.push(["k", "self_attn.k_proj", kvd, E], ["v", "self_attn.v_proj", kvd, E]);
    for (const [name, src, out, inp] of proj) {
      w.push({ canonical: C(`${name}.weight`), from: L(`${src}.weight`), shape: [out, inp] });
      if (c.attentionBias) w.push({ canonical: C(`${name}.bias`), from: L(`${src}.bias`), shape: [out] });
    }
    const mlp: [string, string, number, number][] = [
      ["gate", "mlp.gate_proj", I, E],
      ["up", "mlp.up_proj", I, E],
      ["down", "mlp.down_proj", E, I],
    ];
    for (const [name, src, out, inp] of mlp) {
      w.push({ canonical: C(`${name}.weight`), from: L(`${src}.weight`), shape: [out, inp] });
      if (c.mlpBias) w.push({ canonical: C(`${name}.bias`), from: L(`${src}.bias`), shape: [out] });
    }
  }
  return w;
}

function gpt2Wants(c: ModelConfig, have: Map<string, TensorInfo>): Want[] {
  const E = c.hiddenSize;
  const I = c.intermediateSize;
  const p = (n: string) => [`transformer.${n}`, n];
  const w: Want[] = [
    { canonical: "embed.weight", from: p("wte.weight"), shape: [c.vocabSize, E] },
    { canonical: "pos_embed.weight", from: p("wpe.weight"), shape: [c.maxPositionEmbeddings, E] },
    { canonical: "final_norm.weight", from: p("ln_f.weight"), shape: [E] },
    { canonical: "final_norm.bias", from: p("ln_f.bias"), shape: [E] },
  ];
  for (let i = 0; i < c.numLayers; i++) {
    const L = (n: string) => p(`h.${i}.${n}`);
    const C = (n: string) => `layers.${i}.${n}`;
    const kv = c.kvLayers.includes(i);
    for (const [canon, src] of [["attn_norm", "ln_1"], ["mlp_norm", "ln_2"]]) {
      w.push({ canonical: C(`${canon}.weight`), from: L(`${src}.weight`), shape: [E] });
      w.push({ canonical: C(`${canon}.bias`), from: L(`${src}.bias`), shape: [E] });
    }
    // Queries: from the fused c_attn [E, 3E] when present, else from q_attn [E, E] (a layer
    // that reads another layer's K/V carries no K/V projection).
    const fused = L("attn.c_attn.weight").some((n) => have.has(n));
    if (fused || kv) {
      const parts: [string, number][] = kv ? [["q", 0], ["k", 1], ["v", 2]] : [["q", 0]];
      for (const [name, k] of parts) {
        const slice: [number, number] = [k * E, (k + 1) * E];
        w.push({ canonical: C(`${name}.weight`), from: L("attn.c_attn.weight"), shape: [E, E], storedShape: [E, 3 * E], transpose: true, slice });
        w.push({ canonical: C(`${name}.bias`), from: L("attn.c_attn.bias"), shape: [E], storedShape: [3 * E], slice });
      }
    } else {
      w.push({ canonical: C("q.weight"), from: L("attn.q_attn.weight"), shape: [E, E], storedShape: [E, E], transpose: true });
      w.push({ canonical: C("q.bias"), from: L("attn.q_attn.bias"), shape: [E] });
    }
    w.push({ canonical: C("o.weight"), from: L("attn.c_proj.weight"), shape: [E, E], storedShape: [E, E], transpose: true });
    w.push({ canonical: C("o.bias"), from: L("attn.c_proj.bias"), shape: [E] });
    w.push({ canonical: C("up.weight"), from: L("mlp.c_fc.weight"), shape: [I, E], storedShape: [E, I], transpose: true });
    w.push({ canonical: C("up.bias"), from: L("mlp.c_fc.bias"), shape: [I] });
    w.push({ canonical: C("down.weight"), from: L("mlp.c_proj.weight"), shape: [E, I], storedShape: [I, E], transpose: true });
    w.push({ canonical: C("down.bias"), from: L("mlp.c_proj.bias"), shape: [E] });
  }
  return w;
}

/** Resolves every tensor the engine needs, or throws naming the first one missing or malformed. */
export function resolveWeights(c: ModelConfig, have: Map<string, TensorInfo>, dir: string): TensorSource[] {
  const wants = c.blockStyle === "gpt2" ? gpt2Wants(c, have) : llamaWants(c);
  const out: TensorSource[] = [];
  for (const want of wants) {
    const srcName = want.from.find((n) => have.has(n));
    if (!srcName) {
      const layer = /^layers\.(\d+)\.(k|v)\./.exec(want.canonical);
      const why = layer
        ? ` (layer ${layer[1]} is the K/V target of layers [${c.layerTypes.flatMap((t, i) => (t === Number(layer[1]) ? [i] : [])).join(", ")}] in layer_types, so it must carry K/V projections)`
        : "";
      throw new ModelLoadError(`${dir}: missing tensor '${want.from[0]}'${why}`, dir, "LCKV_MISSING_TENSOR");
    }
    const t = have.get(srcName)!;
    if (!LOADABLE.has(t.dtype)) {
      throw new SafetensorsError(t.file, `dtype ${t.dtype} is not supported for weights (supported: F32, F16, BF16)`, srcName);
    }
    const stored = want.storedShape ?? want.shape;
    if (t.shape.length !== stored.length || t.shape.some((d, k) => d !== stored[k])) {
      throw new SafetensorsError(t.file, `shape ${JSON.stringify(t.shape)} does not match ${JSON.stringify(stored)} implied by config.json`, srcName);
    }
    out.push({
      name: want.canonical,
      sourceName: srcName,
      file: t.file,
      offset: t.offset,
      nbytes: t.nbytes,
      dtype: t.dtype as "F32" | "F16" | "BF16",
      shape: t.shape,
      transpose: want.transpose,
      slice: want.slice,
    });
  }
  return out;
}
