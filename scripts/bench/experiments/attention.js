/**
 * Experiment 5: the attention kernels alone. One decode step's attention over 1, 16 and 128
 * sequences of 4096 tokens in each shape's heads (TinyLlama: 32 heads, 4 K/V heads, head size 64;
 * Llama-2-7B: 32 and 32, head size 128), each query at the last position of its own pages, timed
 * alone (no model around it): the bytes it must move (K and V of every key, plus the queries and
 * the output) over its time, against the copy bandwidth.
 */
const { loadAddon } = require("../../../dist/native");
const { measure, log } = require("../measure");

async function experimentAttention(bench) {
  const addon = loadAddon();
  const rows = [];
  const context = bench.tiny ? 256 : 4096;
  for (const shapeKey of bench.shapes) {
    const s = bench.store.shape(shapeKey);
    const heads = { numHeads: s.heads, numKvHeads: s.kvHeads, headDim: s.hidden / s.heads };
    for (const sequences of bench.tiny ? [1, 4, 16] : [1, 16, 128]) {
      const shape = { backend: bench.device, sequences, context, ...heads };
      // Enough calls per sample that each lasts milliseconds: the small shapes take microseconds.
      const iterations = bench.tiny ? 5 : Math.max(20, Math.ceil(2000 / sequences));
      let bytes = 0;
      const t = await measure(async () => {
        const r = addon.benchAttention({ ...shape, iterations });
        bytes = r.bytes;
        return r.ms;
      }, Math.max(bench.repeats, 5));
      const gbps = bytes / (t.median / 1e3) / 1e9;
      rows.push({ shape: shapeKey, sequences, context, ...heads, iterations, bytes, ms: t, gbps, ofCopy: gbps / bench.rates.copyGBps });
      log(`exp5 ${shapeKey} ${sequences} x ${context}: ${(t.median * 1e3).toFixed(1)} us, ${gbps.toFixed(0)} GB/s (${((gbps / bench.rates.copyGBps) * 100).toFixed(0)}% of copy)`);
    }
  }
  return rows;
}

module.exports = { experimentAttention };
