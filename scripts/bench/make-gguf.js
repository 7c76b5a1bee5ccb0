#!/usr/bin/env node
// Writes a Llama-architecture GGUF of random weights in a given shape, for node-llama-cpp's side
// of the benchmark (its text is noise): the shape of make-random-model.js's models, matrices in
// F16, Q8_0 or Q4_0 (the LM head and the embedding included), norms in F32, and a Llama
// (SentencePiece) vocabulary of <unk>, <s>, </s>, the 256 byte tokens, the space and printable
// ASCII characters, and filler tokens.
//   node scripts/bench/make-gguf.js --out FILE [--type f16|q8_0|q4_0] [--layers 22 --hidden 2048 ...]
const { Command } = require("commander");
const { writeGguf, gguf } = require("./gguf-writer");
const { Xorshift32, randomF16, randomQ8_0, randomQ4_0, F32_ONE, QK } = require("./random-weights");

/** ggml type and llama.cpp's general.file_type (LLAMA_FTYPE_MOSTLY_*) of each weight type. */
const WEIGHT_TYPES = { f16: { ggml: "F16", fileType: 1 }, q8_0: { ggml: "Q8_0", fileType: 7 }, q4_0: { ggml: "Q4_0", fileType: 2 } };

/** The SentencePiece vocabulary llama.cpp expects of the "llama" tokenizer model. */
function llamaVocab(size) {
  if (size < 259) throw new Error(`a Llama vocabulary needs at least 259 tokens (3 special, 256 bytes), got ${size}`);
  const tokens = ["<unk>", "<s>", "</s>"], types = [2, 3, 3]; // unknown, control, control
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    types.push(6); // byte
  }
  // "▁" (SentencePiece's space) and the printable ASCII characters, so that plain text
  // tokenizes into normal tokens and detokenizes back to itself; then filler words.
  for (const t of ["\u2581", ...Array.from({ length: 94 }, (_, i) => String.fromCharCode(0x21 + i))]) {
    if (tokens.length >= size) break;
    tokens.push(t);
    types.push(1); // normal
  }
  for (let i = tokens.length; i < size; i++) {
    tokens.push(`\u2581w${i}`);
    types.push(1);
  }
  const scores = tokens.map((_, i) => (i < 259 ? 0 : -i));
  return { tokens, scores, types };
}

/**
 * The metadata and tensors of a random Llama model of `shape` ({ layers, hidden, heads, kvHeads,
 * intermediate, vocab, maxPositions, normEps, ropeTheta }) with matrices in `type`.
 */
function llamaGguf(shape, type = "f16", seed = 1) {
  const wt = WEIGHT_TYPES[type];
  if (!wt) throw new Error(`--type must be one of ${Object.keys(WEIGHT_TYPES).join(", ")}, got ${type}`);
  const { layers: L, hidden: E, heads: H, kvHeads: KV, intermediate: I, vocab: V } = shape;
  const hd = E / H;
  const vocab = llamaVocab(V);
  const metadata = [
    ["general.architecture", gguf.string("llama")],
    ["general.name", gguf.string(`random llama ${L}x${E}`)],
    ["general.file_type", gguf.u32(wt.fileType)],
    ["general.quantization_version", gguf.u32(2)],
    ["general.alignment", gguf.u32(32)],
    ["llama.context_length", gguf.u32(shape.maxPositions)],
    ["llama.embedding_length", gguf.u32(E)],
    ["llama.block_count", gguf.u32(L)],
    ["llama.feed_forward_length", gguf.u32(I)],
    ["llama.attention.head_count", gguf.u32(H)],
    ["llama.attention.head_count_kv", gguf.u32(KV)],
    ["llama.attention.layer_norm_rms_epsilon", gguf.f32(shape.normEps)],
    ["llama.rope.freq_base", gguf.f32(shape.ropeTheta)],
    ["llama.rope.dimension_count", gguf.u32(hd)],
    ["llama.vocab_size", gguf.u32(V)],
    ["tokenizer.ggml.model", gguf.string("llama")],
    ["tokenizer.ggml.tokens", gguf.array("string", vocab.tokens)],
    ["tokenizer.ggml.scores", gguf.array("f32", vocab.scores)],
    ["tokenizer.ggml.token_type", gguf.array("i32", vocab.types)],
    ["tokenizer.ggml.bos_token_id", gguf.u32(1)],
    ["tokenizer.ggml.eos_token_id", gguf.u32(2)],
    ["tokenizer.ggml.unknown_token_id", gguf.u32(0)],
  ];
  const rng = new Xorshift32(seed | 1);
  const matrix = (name, ne0, ne1) => ({
    name, dims: [ne0, ne1], type: wt.ggml,
    write: (rows) => (wt.ggml === "F16" ? randomF16(rng, rows * ne0) : wt.ggml === "Q8_0" ? randomQ8_0(rng, (rows * ne0) / QK) : randomQ4_0(rng, (rows * ne0) / QK)),
  });
  const norm = (name) => ({ name, dims: [E], type: "F32", write: () => new Uint32Array(E).fill(F32_ONE) });
  // ggml's ne[0] is the input dimension: a [out, in] matrix of PyTorch is ne = [in, out].
  const tensors = [matrix("token_embd.weight", E, V), norm("output_norm.weight"), matrix("output.weight", E, V)];
  for (let i = 0; i < L; i++) {
    const p = `blk.${i}.`;
    tensors.push(norm(p + "attn_norm.weight"), matrix(p + "attn_q.weight", E, H * hd), matrix(p + "attn_k.weight", E, KV * hd), matrix(p + "attn_v.weight", E, KV * hd));
    tensors.push(matrix(p + "attn_output.weight", H * hd, E), norm(p + "ffn_norm.weight"));
    tensors.push(matrix(p + "ffn_gate.weight", E, I), matrix(p + "ffn_up.weight", E, I), matrix(p + "ffn_down.weight", I, E));
  }
  return { metadata, tensors };
}

module.exports = { llamaGguf, llamaVocab, WEIGHT_TYPES };

if (require.main === module) {
  const { addShapeOptions } = require("./shape-options");
  const command = new Command()
    .name("make-gguf")
    .description("a Llama GGUF of random weights (TinyLlama-1.1B's shape by default), for node-llama-cpp's side of the benchmark")
    .requiredOption("--out <file>", "the GGUF file to write")
    .option("--type <t>", `matrix weights: ${Object.keys(WEIGHT_TYPES).join(", ")}`, "f16");
  const o = addShapeOptions(command, "context_length").parse().opts();
  const shape = { layers: +o.layers, hidden: +o.hidden, heads: +o.heads, kvHeads: +o.kvHeads, intermediate: +o.intermediate, vocab: +o.vocab, maxPositions: +o.maxPositions, normEps: 1e-5, ropeTheta: 10000 };
  const tmp = `${o.out}.partial`;
  const { tensors } = writeGguf(tmp, llamaGguf(shape, o.type, +o.seed));
  require("node:fs").renameSync(tmp, o.out); // a file that exists is a whole one
  const bytes = tensors.reduce((a, t) => a + t.nbytes, 0);
  console.log(`wrote ${o.out}: ${(bytes / 1e9).toFixed(2)} GB of ${o.type} weights`);
}
