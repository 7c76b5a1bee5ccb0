#!/usr/bin/env node
// Writes a model directory with random bf16 weights of a given shape, for speed measurements
// (its text is noise). Default: the TinyLlama-1.1B shape; --layer-types makes it LCKV.
//   node scripts/bench/make-random-model.js --out DIR [--layer-types 0_20_..._21] [--seed 1]
//   node scripts/bench/make-random-model.js --out DIR --layer-types ... --weights-from OTHER/model.safetensors
// Every layer gets its K/V projections, whatever --layer-types says (a layer that does not own
// K/V leaves them unread), so that --weights-from can link the variants of one shape to a single
// file instead of writing it again: 13 GB at the Llama-2-7B shape. Each tensor is generated and
// written on its own, so no more than one tensor is ever in memory.
const fs = require("node:fs");
const path = require("node:path");
const { Command } = require("commander");
const { addShapeOptions } = require("./shape-options");
const { Xorshift32, randomBf16, BF16_ONE } = require("./random-weights");

const command = new Command()
  .name("make-random-model")
  .description("a model directory with random bf16 weights (TinyLlama-1.1B's shape by default), for speed measurements")
  .requiredOption("--out <dir>", "the model directory to write")
  .option("--layer-types <pattern>", "LCKV layer_types, one target per layer (default: standard)")
  .option("--weights-from <file>", "link model.safetensors to this file of the same shape instead of writing one");
const values = addShapeOptions(command, "max_position_embeddings").parse().opts();
const L = +values.layers, E = +values.hidden, H = +values.heads, KV = +values.kvHeads, I = +values.intermediate, V = +values.vocab;
const hd = E / H;
if (values.layerTypes && values.layerTypes.split("_").length !== L) throw new Error("--layer-types needs one entry per layer");

fs.mkdirSync(values.out, { recursive: true });
const weightsFile = path.join(values.out, "model.safetensors");
fs.rmSync(weightsFile, { force: true });
if (values.weightsFrom) {
  fs.symlinkSync(path.resolve(values.weightsFrom), weightsFile);
} else {
  const rng = new Xorshift32(+values.seed | 1);
  const ones = (n) => new Uint16Array(n).fill(BF16_ONE);
  const tensors = [["model.embed_tokens.weight", [V, E], () => randomBf16(rng, V * E)], ["model.norm.weight", [E], () => ones(E)], ["lm_head.weight", [V, E], () => randomBf16(rng, V * E)]];
  for (let i = 0; i < L; i++) {
    const p = `model.layers.${i}.`;
    tensors.push([p + "input_layernorm.weight", [E], () => ones(E)], [p + "post_attention_layernorm.weight", [E], () => ones(E)]);
    tensors.push([p + "self_attn.q_proj.weight", [H * hd, E], () => randomBf16(rng, H * hd * E)], [p + "self_attn.o_proj.weight", [E, H * hd], () => randomBf16(rng, E * H * hd)]);
    tensors.push([p + "self_attn.k_proj.weight", [KV * hd, E], () => randomBf16(rng, KV * hd * E)], [p + "self_attn.v_proj.weight", [KV * hd, E], () => randomBf16(rng, KV * hd * E)]);
    tensors.push([p + "mlp.gate_proj.weight", [I, E], () => randomBf16(rng, I * E)], [p + "mlp.up_proj.weight", [I, E], () => randomBf16(rng, I * E)], [p + "mlp.down_proj.weight", [E, I], () => randomBf16(rng, E * I)]);
  }
  const header = {};
  let off = 0;
  for (const [name, shape] of tensors) {
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype: "BF16", shape, data_offsets: [off, off + bytes] };
    off += bytes;
  }
  let json = Buffer.from(JSON.stringify(header));
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const fd = fs.openSync(weightsFile, "w");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  fs.writeSync(fd, len);
  fs.writeSync(fd, json);
  for (const [, , make] of tensors) {
    const a = make();
    fs.writeSync(fd, Buffer.from(a.buffer, a.byteOffset, a.byteLength));
  }
  fs.closeSync(fd);
  console.log(`wrote ${values.out}: ${(off / 1e9).toFixed(2)} GB of bf16 weights`);
}
// config.json last: a directory with one holds its whole model.
const config = {
  architectures: [values.layerTypes ? "LCKVLlamaForCausalLM" : "LlamaForCausalLM"],
  model_type: values.layerTypes ? "lckv-llama" : "llama",
  hidden_size: E, intermediate_size: I, num_attention_heads: H, num_key_value_heads: KV, num_hidden_layers: L,
  vocab_size: V, max_position_embeddings: +values.maxPositions, rms_norm_eps: 1e-5, rope_theta: 10000, tie_word_embeddings: false,
  hidden_act: "silu", torch_dtype: "bfloat16",
  ...(values.layerTypes ? { layer_types: values.layerTypes, forward_passes: 7, backward_passes: 2 } : {}),
};
fs.writeFileSync(path.join(values.out, "config.json"), JSON.stringify(config, null, 2));
