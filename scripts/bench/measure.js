/**
 * How the bench times things: a median of several runs after a warm-up, with its spread; random
 * prompts; decode steps of forked sequences; and full generations of a batch of requests.
 */

const now = () => Number(process.hrtime.bigint()) / 1e6;

function log(...a) {
  process.stderr.write(a.join(" ") + "\n");
}

/** The median of `samples`, their spread ((max - min) / median) and whether it is above 5%. */
function summary(samples) {
  const s = [...samples].sort((a, b) => a - b);
  const median = s[Math.floor(s.length / 2)];
  const spread = s.length > 1 ? (s[s.length - 1] - s[0]) / median : 0;
  return { median, spread, samples, flagged: spread > 0.05 };
}

/** One untimed warm-up call of `fn`, then `runs` calls; `fn` returns its own figure (ms). */
async function measure(fn, runs) {
  await fn();
  const t = [];
  for (let i = 0; i < runs; i++) t.push(await fn());
  return summary(t);
}

let seed = 1;
/** `n` random token ids below `vocab` (at or above `from`), from one stream for the whole run. */
function randomIds(n, vocab, from = 0) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    out[i] = from + (seed % (vocab - from));
  }
  return out;
}

/**
 * Waits for the device work queued so far: one generated token of `seq` (its readback follows
 * the work queued before it). append() resolves when its work is queued, not done
 * (docs/profiling.md, "How to time a prefill"), so a timed span of appends ends with this.
 */
async function hostSync(seq) {
  let tokens = 0;
  for await (const x of seq.generate({ maxNewTokens: 1, temperature: 0, ignoreEos: true })) if (x.token !== null) tokens++;
  // A sequence that fills the context generates nothing, and so waits for nothing.
  if (tokens !== 1) throw new Error(`hostSync: a sequence of ${seq.length} tokens has no room for the token that waits for the device`);
}

/**
 * Pool pages one sequence of `tokens` tokens holds (st: a model's cacheStats()): its tokens' pages
 * and, in int4, its residual's, as the pool's admission counts them.
 */
function sequencePages(st, tokens) {
  return Math.ceil(tokens / st.pageTokens) + st.residualPages;
}

/**
 * Bytes of a K/V pool that holds `sequences` sequences of `tokens` tokens each at once
 * (sequencePages), and one page to spare each (a token generated after the prompt).
 */
function poolBytesFor(model, sequences, tokens) {
  const st = model.cacheStats();
  return sequences * (sequencePages(st, tokens) + 1) * st.pageBytes;
}

/**
 * `count` sequences of `tokens` random tokens each, for decode timings (forked, or run
 * themselves). One pass of the iterative prefill: their K/V only has to be there, not exact.
 */
async function randomPrefixes(model, count, tokens) {
  const bases = [];
  for (let i = 0; i < count; i++) {
    const s = model.createSequence();
    await s.append(randomIds(tokens, model.config.vocabSize), { prefill: "iterative", prefillPasses: 1 });
    bases.push(s);
  }
  return bases;
}

/**
 * Median ms per decode step of `batch` forks of `bases` (round robin), each generating `steps`
 * tokens at once: the scheduler runs them as one batch.
 */
async function forkedDecodeMs(bases, batch, steps, runs) {
  return measure(async () => {
    const seqs = Array.from({ length: batch }, (_, i) => bases[i % bases.length].fork());
    const ms = await stepMs(seqs, steps);
    for (const s of seqs) s.dispose();
    return ms;
  }, runs);
}

/**
 * Ms per step while every one of `seqs` generates `steps` tokens at once (the scheduler's one
 * batch), from the step that gave the last of them its first token to the end, over the steps
 * between. The first step is left out: a sequence rewound to its length (or never generated
 * from) re-runs its last token there, and an int4 cache rewound into a quantized page first
 * reads that page's rows back from their codes, a cost once per request, not per step (it made
 * int4's step at 64 x 2048 read 6.3 ms instead of about 2.8 on an H100).
 */
async function stepMs(seqs, steps) {
  if (steps < 2) throw new Error(`stepMs: at least 2 steps (the first is left out), got ${steps}`);
  let started = 0, t0 = 0;
  await Promise.all(seqs.map(async (s) => {
    let first = true;
    for await (const x of s.generate({ maxNewTokens: steps, temperature: 0, ignoreEos: true })) {
      void x;
      if (first && (first = false, ++started === seqs.length)) t0 = now();
    }
  }));
  return (now() - t0) / (steps - 1);
}

/**
 * Median ms per decode step of `seqs`, each generating `steps` tokens at once (one batch), then
 * rewound to the length it had: every sequence reads only its own pages, where forks of fewer
 * prefixes would share theirs (and find them in L2).
 */
async function ownDecodeMs(seqs, steps, runs) {
  const lengths = seqs.map((s) => s.length);
  return measure(async () => {
    const ms = await stepMs(seqs, steps);
    seqs.forEach((s, i) => s.truncate(lengths[i]));
    return ms;
  }, runs);
}

/**
 * `batch` requests of `prompt` random tokens, each generating `gen` tokens (end-of-sequence
 * ignored), all started at once as a server would take them, in the prefill mode `prefill` (the
 * engine's default when undefined).
 * Returns the wall time, the tokens generated, and when the last of the requests produced its
 * first token (every prompt prefilled by then; decode steps of the requests that started first
 * may have run in between). `stopAfter` ends each request early: used for warm-ups only, whose
 * figures are never reported.
 */
async function generation(model, prompt, gen, batch, stopAfter = gen, prefill = undefined) {
  const V = model.config.vocabSize;
  let lastFirstToken = 0;
  const sharedBefore = model.schedulerStats().promptTokens;
  const t0 = now();
  const counts = await Promise.all(
    Array.from({ length: batch }, async () => {
      const ac = new AbortController();
      let n = 0;
      for await (const c of model.stream(randomIds(prompt, V), { maxNewTokens: gen, temperature: 0, ignoreEos: true, signal: ac.signal, ...(prefill ? { prefill } : {}) })) {
        void c;
        if (++n === 1) lastFirstToken = Math.max(lastFirstToken, now() - t0);
        if (n >= Math.min(gen, stopAfter)) ac.abort();
      }
      return n;
    }),
  );
  const ms = now() - t0;
  const tokens = counts.reduce((a, b) => a + b, 0);
  // Prompt tokens that went as rows of the shared steps (batched token steps, mixed steps): which
  // path the engine's default prefill took under this load.
  const sharedPromptTokens = model.schedulerStats().promptTokens - sharedBefore;
  return { ms, tokens, tokPerS: (tokens / ms) * 1e3, lastFirstTokenMs: lastFirstToken, sharedPromptTokens };
}

/**
 * Fairness: one stream decodes; after its 16th token a request with a prompt of `n` tokens
 * arrives (`prefill` its mode, the engine's default when undefined) and generates one token. The
 * stream runs until 200 ms after that prompt's prefill (an LCKV prompt that goes as batched token
 * steps takes as many steps as it has tokens), shifting its context if it must. Per arrival: the
 * stream's median gap between tokens before it (its step), its longest gap while the prompt was
 * prefilled, and the time the prefill took. `runs` arrivals; medians over them.
 */
async function streamGap(model, n, runs, prefill = undefined) {
  const V = model.config.vocabSize;
  const results = [];
  for (let rep = 0; rep < runs; rep++) {
    const stamps = [];
    let arrival = 0, prefilled = 0, arriving;
    const stream = model.stream([1, 2, 3, 4], { maxNewTokens: 1e6, contextShift: "sink-window", temperature: 0, ignoreEos: true });
    const reader = (async () => {
      for await (const chunk of stream) {
        void chunk;
        stamps.push(now());
        if (stamps.length === 16) {
          arrival = now();
          const prompt = Array.from({ length: n }, (_, i) => (i * 37 + rep * 11 + 5) % V);
          arriving = model.generate(prompt, { maxNewTokens: 1, temperature: 0, ...(prefill ? { prefill } : {}) }).then(() => (prefilled = now()));
        }
        if (prefilled && now() - prefilled > 200) break;
      }
    })();
    await reader;
    await arriving;
    const gaps = stamps.slice(1).map((t, i) => [stamps[i], t - stamps[i]]);
    const before = gaps.filter(([t]) => t < arrival).map(([, g]) => g);
    const during = gaps.filter(([t, g]) => t + g > arrival && t < prefilled).map(([, g]) => g);
    results.push({ stepMs: summary(before).median, longestGapMs: Math.max(...during), prefillMs: prefilled - arrival });
  }
  return { stepMs: summary(results.map((r) => r.stepMs)), longestGapMs: summary(results.map((r) => r.longestGapMs)), prefillMs: summary(results.map((r) => r.prefillMs)), runs: results };
}

module.exports = { now, log, summary, measure, randomIds, hostSync, sequencePages, poolBytesFor, randomPrefixes, stepMs, forkedDecodeMs, ownDecodeMs, generation, streamGap };
