/**
 * Experiment 2: the decode step against batch size at 2048 tokens of context (and batch 1 at
 * 128), against the memory roofline: (W + B x A) / copy bandwidth (costs.js).
 */
const { forkedDecodeMs, ownDecodeMs, randomPrefixes, randomIds, sequencePages, log } = require("../measure");
const { weightBytes, kvBytesPerElement, attentionBytes } = require("../costs");

/** Batches up to this many rows time sequences of their own (one prefill each), larger ones forks. */
const OWN_SEQUENCES = 128;

async function experimentDecode(bench) {
  const rows = [];
  const context = bench.tiny ? 128 : 2048;
  const steps = bench.tiny ? 4 : 16;
  const names = bench.full ? bench.models.filter((n) => n !== "default") : bench.models.filter((n) => ["standard", "lckv-w2", "lckv-w10"].includes(n));
  for (const shape of bench.shapes) {
    for (const kvDtype of bench.kvDtypes) {
      for (const name of names) {
        const model = await bench.load(shape, name, kvDtype);
        const st = model.cacheStats();
        const c = model.config;
        const kvType = bench.kvTypeOf(model, kvDtype);
        const kvName = kvType ?? "default K/V";
        const bpe = kvBytesPerElement(c, model.kvBytesPerToken);
        const W = weightBytes(c);
        const roofMs = (batch, ctx) => ((W + batch * attentionBytes(c, ctx, bpe)) / (bench.rates.copyGBps * 1e9)) * 1e3;
        const maxBatch = Math.floor(st.pagesTotal / Math.ceil((context + steps) / st.pageTokens));
        const sizes = [...new Set([1, 8, 32, 128, 512, maxBatch].filter((b) => b <= maxBatch && (bench.full || b <= 512 || b === maxBatch)))].sort((a, b) => a - b);
        // Up to OWN_SEQUENCES rows, a sequence of its own for each (generated, then rewound), so
        // that the attention reads every row's K/V from memory. Above, forks of 8 distinct
        // prefixes: a batch of hundreds without hundreds of prefills, but forks share their
        // prefix's pages, so the attention may find some K/V in L2 and the roofline's K/V bytes
        // are an upper bound (the row records how many distinct prefixes it read).
        // (As many as the pool holds with their steps generated: a fork shares its prefix's pages,
        // a sequence of its own holds them all.)
        const ownFit = Math.floor(st.pagesTotal / sequencePages(st, context + 1 + steps));
        const own = await randomPrefixes(model, Math.min(OWN_SEQUENCES, ownFit), context + 1);
        let bases = null;
        for (const b of sizes) {
          let t, prefixes;
          if (b <= own.length) {
            t = await ownDecodeMs(own.slice(0, b), steps, bench.repeats);
            prefixes = b;
          } else {
            // The own sequences' pages back to the pool first: the forks of the largest batch need it all.
            for (const s of own.splice(0)) s.dispose();
            bases ??= await randomPrefixes(model, Math.min(8, maxBatch), context + 1);
            t = await forkedDecodeMs(bases, b, steps, bench.repeats);
            prefixes = bases.length;
          }
          const roof = roofMs(b, context + steps / 2);
          rows.push({ shape, model: name, kvDtype: kvType, batch: b, maxBatch, prefixes, msPerStep: t, tokPerS: (b * 1e3) / t.median, roofMs: roof, ofRoofline: roof / t.median });
          log(`exp2 ${shape} ${name} ${kvName} batch ${b}: ${t.median.toFixed(2)} ms/step, ${((roof / t.median) * 100).toFixed(0)}% of roofline`);
        }
        for (const s of own) s.dispose();
        // Batch 1 at a short context too (the other batch-1 point of the decode roofline).
        const short = model.createSequence();
        await short.append(randomIds(129, c.vocabSize));
        const t128 = await forkedDecodeMs([short], 1, steps, bench.repeats);
        const roof128 = roofMs(1, 128 + steps / 2);
        rows.push({ shape, model: name, kvDtype: kvType, batch: 1, context: 128, msPerStep: t128, tokPerS: 1e3 / t128.median, roofMs: roof128, ofRoofline: roof128 / t128.median });
        short.dispose();
        for (const s of bases ?? []) s.dispose();
        await model.dispose();
      }
    }
  }
  return rows;
}

module.exports = { experimentDecode };
