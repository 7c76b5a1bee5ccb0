/**
 * What a step costs, from the model's shape: the bytes a decode step reads, the flops a prefill
 * computes, and from those the bound on what LCKV's larger batch can buy in decode.
 *
 * Per generated token, a decode step of B sequences reads the weights once for the whole batch
 * and every sequence's K/V once for itself:
 *
 *     bytes per generated token = W / B + A
 *     W = weight bytes a step reads (every matrix, the LM head included; the embedding row is negligible)
 *     A = layers that attend x context x K/V bytes per layer-token
 *
 * Every layer attends, and an LCKV layer that reads another layer's K/V reads as many bytes as a
 * layer reading its own: the condensed cache shrinks what is stored, not A. So at one K/V type
 * and context, a model whose pool holds B_lckv sequences where the standard one holds B_std
 * decodes at most
 *
 *     bound = (W / B_std + A) / (W / B_lckv + A)
 *
 * times faster, once both run at the memory bandwidth. Large when W / B_std dominates (a small
 * batch, a short context: the weights are read for few tokens); near 1 when A does (the standard
 * batch already amortizes the weights, or the context is long).
 */

/** Bytes of the weights a decode step reads, `bytesPerWeight` each (bf16 on the GPU: 2). */
function weightBytes(c, bytesPerWeight = 2) {
  const E = c.hiddenSize, I = c.intermediateSize, qd = c.numHeads * c.headDim, kvd = c.numKvHeads * c.headDim;
  let b = 0;
  for (let i = 0; i < c.numLayers; i++) b += (2 * qd * E + 3 * I * E + (c.kvLayers.includes(i) ? 2 * kvd * E : 0)) * bytesPerWeight;
  return b + c.vocabSize * E * bytesPerWeight;
}

/** Bytes of one K or V element in the model's cache, from the engine's own bytes per token. */
function kvBytesPerElement(c, kvBytesPerToken) {
  return kvBytesPerToken / (c.kvLayers.length * 2 * c.numKvHeads * c.headDim);
}

/** K/V bytes one layer's attention reads per token of context. */
function kvBytesPerLayerToken(c, bytesPerElement) {
  return 2 * c.numKvHeads * c.headDim * bytesPerElement;
}

/** A: K/V bytes a decode step reads per sequence at `context` tokens (every layer attends). */
function attentionBytes(c, context, bytesPerElement) {
  return c.numLayers * context * kvBytesPerLayerToken(c, bytesPerElement);
}

/** W / B + A: bytes a decode step reads per generated token. */
function bytesPerGeneratedToken(W, batch, A) {
  return W / batch + A;
}

/** The bound on a model's decode gain over the standard one: (W_std / B_std + A) / (W / B + A). */
function decodeGainBound({ wStd, batchStd, w, batch, a }) {
  return bytesPerGeneratedToken(wStd, batchStd, a) / bytesPerGeneratedToken(w, batch, a);
}

/**
 * Where prefill takes over, from a full-generation run: the prefill's share of the wall time
 * (what the decode steps at the measured ms per step do not account for) and the generation
 * length at which the batch's prefill would take as long as its decode.
 */
function prefillTakeover({ wallMs, gen, decodeMsPerStep }) {
  const prefillMs = Math.max(0, wallMs - gen * decodeMsPerStep);
  return { prefillMs, prefillShare: prefillMs / wallMs, breakEvenGen: prefillMs / decodeMsPerStep };
}

/**
 * A floor under the wall time, in ms, of a full-generation run (each of `batch` requests prefills
 * `prompt` tokens and generates `gen`) at `copyGBps` (the copy rate measured in the run) and
 * `tflops` (its bf16 GEMM rate): the larger of the run's bytes over the one and its flops over the
 * other. Taken over the whole run, not per phase, because the engine mixes prompt chunks into
 * decode steps, where a prompt's flops may hide under the decode's reads. Counted at their least:
 * - flops: 2 per weight (W counts 2 bytes a weight, so W flops a token) for every token that must
 *   pass through the model, prompt + gen - 1 a request (the last generated token is only sampled),
 *   the LM head (`headBytes`) only for the gen tokens it chooses; attention's products left out;
 * - bytes: gen - 1 decode steps, each reading W and every sequence's K/V at its context (`a1`
 *   bytes a token of context: A over its context), contexts prompt .. prompt + gen - 2; and the
 *   prompt tokens that went as token steps (`tokenStepShare` of them, one token of every
 *   prefilling sequence a step: LCKV's exact prefill beside other requests), each step reading
 *   every weight but the LM head and the K/V before it. A chunk of a prompt reads each weight once
 *   for its many tokens: left out.
 * So a model whose prompts go as token steps pays for them in bytes, where one whose prompts go
 * in chunks pays in flops: why LCKV's floors' ratio to the standard model is below its decode
 * bound at long prompts.
 */
function fullGenerationFloorMs({ weightBytes: W, headBytes, a1, batch: B, prompt: P, gen: G, tokenStepShare = 0, copyGBps, tflops }) {
  const body = W - headBytes, n = G - 1, k = tokenStepShare * P;
  const bytes = n * W + B * a1 * (n * P + (n * (n - 1)) / 2) + k * body + (B * a1 * k * (k - 1)) / 2;
  const flops = B * ((P + G - 1) * body + G * headBytes);
  return Math.max(bytes / (copyGBps * 1e6), flops / (tflops * 1e9));
}

/** Flops of a forward over `n` tokens after `ctx0` cached ones: 2 per weight per token, plus q.k and p.v. */
function forwardFlops(c, n, ctx0 = 0) {
  const E = c.hiddenSize, I = c.intermediateSize, qd = c.numHeads * c.headDim, kvd = c.numKvHeads * c.headDim;
  let perToken = 0;
  for (let i = 0; i < c.numLayers; i++) perToken += 2 * (2 * qd * E + 3 * I * E + (c.kvLayers.includes(i) ? 2 * kvd * E : 0));
  perToken += 2 * c.vocabSize * E;
  const keys = n * ctx0 + (n * (n + 1)) / 2;
  return perToken * n + 4 * c.numLayers * qd * keys;
}

module.exports = { weightBytes, kvBytesPerElement, kvBytesPerLayerToken, attentionBytes, bytesPerGeneratedToken, decodeGainBound, prefillTakeover, fullGenerationFloorMs, forwardFlops };
