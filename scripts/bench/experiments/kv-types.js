/**
 * Experiment 7: the K/V cache types side by side (loadModel's kvCacheDtype), on the standard model
 * of the first shape:
 *   capacity   sequences of 2048 + 2048 tokens a pool of POOL_GIB holds (the engine's own page
 *              size: codes, scales and padding count), against f32;
 *   decode     ms per step at DECODE_BATCH distinct sequences of DECODE_CONTEXT tokens (distinct
 *              prompts: forks would share pages and read them from L2), against the type's
 *              roofline: the weights plus every sequence's K/V read once, over the copy bandwidth;
 *   batch 1    ms per step at 128 tokens;
 *   attention  one decode step's attention alone over 16 and 128 sequences of 4096 tokens in the
 *              shape's heads, the bytes it must read (each type's own) over its time.
 * Every type runs whatever --kv-dtypes says (the experiment is about the types themselves).
 */
const { loadAddon } = require("../../../dist/native");
const { measure, log, sequencePages, poolBytesFor, stepMs } = require("../measure");

const TYPES = ["f32", "bf16", "fp8", "int8", "int4"];
const POOL_GIB = 2;

async function decodeFigure(bench, shape, kvCacheDtype, rows, context, steps) {
  const probe = await bench.load(shape, "standard", kvCacheDtype, { kvCacheMemory: 1 << 24 });
  const need = poolBytesFor(probe, rows, context + steps);
  await probe.dispose();
  const model = await bench.load(shape, "standard", kvCacheDtype, { maxBatch: rows, kvCacheMemory: Math.ceil(need * 1.1) });
  try {
    const V = model.config.vocabSize;
    const seqs = [];
    for (let b = 0; b < rows; b++) {
      const s = model.createSequence();
      await s.append(Array.from({ length: context }, (_, i) => (i * 7919 + b * 104729 + 13) % V));
      seqs.push(s);
    }
    const ms = await measure(async () => {
      for (const s of seqs) s.truncate(context);  // every run reads the same context
      return stepMs(seqs, steps);
    }, bench.repeats);
    const bytesPerStep = model.nativeModel().weightBytes + rows * (context + steps / 2) * model.kvBytesPerToken;
    for (const s of seqs) s.dispose();
    return { ms, bytesPerStep, kvBytesPerToken: model.kvBytesPerToken };
  } finally {
    await model.dispose();
  }
}

async function experimentKvTypes(bench) {
  const addon = loadAddon();
  const shape = bench.shapes[0];
  const s = bench.store.shape(shape);
  const batch = bench.tiny ? 4 : 64, context = bench.tiny ? 64 : 2048, steps = bench.tiny ? 4 : 32;
  const capContext = bench.tiny ? 256 : 4096;
  const rows = [];
  for (const kvCacheDtype of TYPES) {
    const cap = await bench.load(shape, "standard", kvCacheDtype, { kvCacheMemory: (bench.tiny ? 1 / 64 : POOL_GIB) * 2 ** 30 });
    const stats = cap.cacheStats();
    const { pagesTotal, pageBytes, residualPages } = stats;
    await cap.dispose();
    // A sequence holds its context's pages and, in int4, its residual's.
    const capacity = Math.floor(pagesTotal / sequencePages(stats, capContext));
    const decode = await decodeFigure(bench, shape, kvCacheDtype, batch, context, steps);
    const batch1 = await decodeFigure(bench, shape, kvCacheDtype, 1, 128, steps * 2);
    const attention = [];
    for (const sequences of bench.tiny ? [4] : [16, 128]) {
      const args = { backend: bench.device, sequences, context: capContext, numHeads: s.heads, numKvHeads: s.kvHeads, headDim: s.hidden / s.heads, kvCacheDtype };
      let bytes = 0;
      const ms = await measure(async () => {
        const r = addon.benchAttention({ ...args, iterations: bench.tiny ? 3 : 50 });
        bytes = r.bytes;
        return r.ms;
      }, Math.max(bench.repeats, 3));
      const gbps = bytes / (ms.median / 1e3) / 1e9;
      attention.push({ sequences, context: capContext, bytes, ms, gbps, ofCopy: gbps / bench.rates.copyGBps });
    }
    const roofMs = (decode.bytesPerStep / (bench.rates.copyGBps * 1e9)) * 1e3;
    const row = { shape, kvCacheDtype, pageBytes, residualPages, poolGiB: bench.tiny ? 1 / 64 : POOL_GIB, capacityContext: capContext, capacity, batch, context, decode: { ...decode, roofMs, ofRoofline: roofMs / decode.ms.median }, batch1, attention };
    rows.push(row);
    log(`exp7 ${kvCacheDtype}: capacity ${capacity}, decode ${decode.ms.median.toFixed(3)} ms (roofline ${roofMs.toFixed(3)}), batch 1 ${batch1.ms.median.toFixed(3)} ms, attention ${attention.map((a) => `${a.sequences}: ${a.gbps.toFixed(0)} GB/s`).join(", ")}`);
  }
  return rows;
}

module.exports = { experimentKvTypes, KV_TYPES: TYPES };
