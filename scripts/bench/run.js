#!/usr/bin/env node
/**
 * `npm run bench`: LCKV against standard caches and against the peers, side by side, on the GPU.
 *
 *   npm run bench                # the default set (meant to fit in 10 minutes on an H100: experimentSeconds in the results)
 *   npm run bench -- --full      # the paper's lengths in full, all of GPU memory, every batch
 *
 * Models: the TinyLlama-1.1B shape with random bf16 weights, as standard, LCKV w=2, LCKV w=10,
 * CLA and sandwich-middle, plus the shipped default model. Experiments:
 *   1. the paper's throughput experiment: the largest batch the K/V pool holds for each length
 *      pair, verified by running it, and the end-to-end throughput (prefill included) there;
 *   2. decode latency and throughput against batch size at 2048 tokens of context, with the
 *      memory-bandwidth roofline of each point;
 *   3. prefill throughput against prompt length, for each LCKV prefill mode (and the achieved
 *      TFLOP/s of the standard model against the card's measured bf16 GEMM rate);
 *   4. peers on the same card in the same run: transformers eager and static cache, and the
 *      project's PyTorch reference for LCKV;
 *   5. the attention kernels alone: one decode step's attention over 1, 16 and 128 sequences of
 *      4096 tokens (TinyLlama's 32 heads, 4 K/V heads, head size 64), its achieved bandwidth
 *      against the copy bandwidth.
 * Every figure is the median of several runs after a warm-up, with its spread; a spread above
 * 5% is flagged. Writes docs/bench/*.json, docs/bench/*.svg and docs/benchmarks.md.
 */
const { execFileSync, spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { Command } = require("commander");
const { loadModel, FIXED_POINT_MAX_PASSES } = require("../../dist");
const { loadAddon } = require("../../dist/native");
const { renderReport } = require("./report");

const ROOT = path.join(__dirname, "..", "..");
const program = new Command()
  .name("bench")
  .option("--full", "the paper's lengths in full, the whole GPU memory for the pool, every batch size")
  .option("--work <dir>", "where the random models are written", path.join(os.tmpdir(), "lckv-bench"))
  .option("--out <dir>", "where docs/benchmarks.md and docs/bench/ go", path.join(ROOT, "docs"))
  .option("--kv-memory <GiB>", "K/V pool of each model (default: 0.5, or 80% of free GPU memory with --full)")
  .option("--repeats <n>", "timed runs per figure (after one warm-up)", "3")
  .option("--only <list>", "experiments to run, e.g. 1,2")
  .option("--models <list>", "models to run (standard,lckv-w2,lckv-w10,cla,sandwich,default)")
  .option("--no-peers", "skip the Python peers")
  .option("--device <d>", "cuda (the benchmark's subject) or cpu (to check the script on tiny shapes)", "cuda")
  .option("--tiny", "tiny shapes instead of TinyLlama (checks the script; figures mean nothing)")
  .parse();
const opt = program.opts();
const only = opt.only ? new Set(opt.only.split(",").map(Number)) : new Set([1, 2, 3, 4, 5]);
const repeats = Math.max(1, +opt.repeats);

// ---- models ------------------------------------------------------------------------------------

const L = opt.tiny ? 6 : 22;
const range = (a, b) => Array.from({ length: b - a }, (_, i) => a + i);
const pattern = (targets) => targets.join("_");
const mid = Math.floor(L / 2) - 1;
const MODELS = {
  standard: { layerTypes: undefined, what: "standard (every layer caches K/V)" },
  "lckv-w2": { layerTypes: pattern([0, ...range(1, L - 1).map(() => L - 2), L - 1]), what: "LCKV, 2 warm-up layers (0_20_..._20_21)" },
  "lckv-w10": {
    // 5 standard layers at the bottom and 5 at the top; the middle attends to its top-most layer.
    layerTypes: pattern([...range(0, 5), ...range(5, L - 5).map(() => L - 6), ...range(L - 5, L)].slice(0, L)),
    what: "LCKV, 10 warm-up layers (0_1_2_3_4_16_..._16_17_..._21)",
  },
  cla: { layerTypes: pattern(range(0, L).map((i) => i - (i % 2))), what: "CLA, pairs share the lower layer's K/V (0_0_2_2_...)" },
  sandwich: { layerTypes: pattern([0, ...range(1, L - 1).map(() => mid), L - 1]), what: `sandwich-middle (0_${mid}_..._${mid}_${L - 1})` },
  default: { dir: path.join(ROOT, "models", "default"), what: "the shipped default model (6.5M parameters, LCKV)" },
};
const modelNames = opt.models ? opt.models.split(",") : Object.keys(MODELS);

function modelDir(name) {
  const m = MODELS[name];
  return m.dir ?? path.join(opt.work, `${opt.tiny ? "tiny-" : ""}${name}`);
}

// Writes the random models that are not on disk yet, all at once (each write is one process
// generating 2.2 GB of weights: in parallel they take the time of one).
async function writeModels(names) {
  await Promise.all(
    names.map((name) => {
      const m = MODELS[name], dir = modelDir(name);
      if (m.dir || fs.existsSync(path.join(dir, "config.json"))) return undefined;
      const args = ["--out", dir];
      if (m.layerTypes) args.push("--layer-types", m.layerTypes);
      if (opt.tiny) args.push("--layers", String(L), "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "512");
      return new Promise((resolve, reject) => {
        const child = spawn(process.execPath, [path.join(__dirname, "make-random-model.js"), ...args], { stdio: "inherit" });
        child.on("error", reject);
        child.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`make-random-model.js for ${name} exited with ${code}`))));
      });
    }),
  );
}

// ---- measurement helpers -------------------------------------------------------------------------

const now = () => Number(process.hrtime.bigint()) / 1e6;
function summary(samples) {
  const s = [...samples].sort((a, b) => a - b);
  const median = s[Math.floor(s.length / 2)];
  const spread = s.length > 1 ? (s[s.length - 1] - s[0]) / median : 0;
  return { median, spread, samples, flagged: spread > 0.05 };
}
async function measure(fn, runs = repeats) {
  await fn(); // warm-up
  const t = [];
  for (let i = 0; i < runs; i++) t.push(await fn());
  return summary(t);
}
let seed = 1;
function randomIds(n, vocab) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    out[i] = seed % vocab;
  }
  return out;
}
function log(...a) {
  process.stderr.write(a.join(" ") + "\n");
}

// The K/V pool of every model, in GiB (null: 80% of the free GPU memory, with --full). The
// default set's half GiB keeps experiment 1 within the 10 minutes: its time goes into
// prefilling the largest batch, which grows with the pool.
// --tiny (a check of the script) takes 16 MiB, so that its batches stay small on the CPU.
const KV_POOL_GIB = opt.kvMemory !== undefined ? +opt.kvMemory : opt.full ? null : opt.tiny ? 1 / 64 : 0.5;

function weightBytes(c, bytesPerWeight = 2) {
  const E = c.hiddenSize, I = c.intermediateSize, qd = c.numHeads * c.headDim, kvd = c.numKvHeads * c.headDim;
  let b = 0;
  for (let i = 0; i < c.numLayers; i++) b += (2 * qd * E + 3 * I * E + (c.kvLayers.includes(i) ? 2 * kvd * E : 0)) * bytesPerWeight;
  return b + c.vocabSize * E * bytesPerWeight; // lm_head (one embedding row per token is negligible)
}
// K/V bytes one decode step reads per token of context: every layer's attention reads the K/V
// it attends to, so a layer that reads another layer's K/V (LCKV, CLA) reads as many bytes as a
// layer that owns its own; the condensed cache saves memory, not these reads. f32 K/V.
function kvReadBytesPerToken(c) {
  return c.numLayers * 2 * c.numKvHeads * c.headDim * 4;
}
function forwardFlops(c, n, ctx0 = 0) {
  // 2 flops per weight per token, plus q.k and p.v over the visible keys (causal).
  const E = c.hiddenSize, I = c.intermediateSize, qd = c.numHeads * c.headDim, kvd = c.numKvHeads * c.headDim;
  let perToken = 0;
  for (let i = 0; i < c.numLayers; i++) perToken += 2 * (2 * qd * E + 3 * I * E + (c.kvLayers.includes(i) ? 2 * kvd * E : 0));
  perToken += 2 * c.vocabSize * E;
  const keys = n * ctx0 + (n * (n + 1)) / 2;
  return perToken * n + 4 * c.numLayers * qd * keys;
}

async function load(name, extra = {}) {
  const kvMemory = KV_POOL_GIB === null ? undefined : Math.floor(KV_POOL_GIB * 2 ** 30);
  return loadModel(modelDir(name), { device: opt.device, prefixCache: 0, maxBatch: 1 << 20, ...(kvMemory ? { kvCacheMemory: kvMemory } : {}), ...extra });
}

// ---- experiment 1: the paper's throughput experiment ---------------------------------------------

const LENGTHS = opt.tiny ? [[32, 64], [128, 128], [5, 251]] : [[512, 1024], [2048, 2048], [5, 8187]];
// Default set: every request reserves its full length (so the batch is the one that fits the
// whole generation), but only the first MEASURED tokens are generated and timed.
const MEASURED = opt.full ? Infinity : opt.tiny ? 8 : 32;

async function throughput(model, prompt, gen, batch, stopAfter = MEASURED) {
  const V = model.config.vocabSize;
  const controllers = [];
  const t0 = now();
  const counts = await Promise.all(
    Array.from({ length: batch }, async (_, i) => {
      const ac = new AbortController();
      controllers.push(ac);
      let n = 0;
      for await (const c of model.stream(randomIds(prompt, V), { maxNewTokens: gen, temperature: 0, ignoreEos: true, signal: ac.signal, prefill: "iterative" })) {
        void c;
        if (++n >= Math.min(gen, stopAfter)) ac.abort();
      }
      return n;
    }),
  );
  const ms = now() - t0;
  const tokens = counts.reduce((a, b) => a + b, 0);
  return { ms, tokens, tokPerS: (tokens / ms) * 1e3 };
}

async function experiment1() {
  const rows = [];
  for (const name of modelNames) {
    const model = await load(name);
    const st = model.cacheStats();
    // The default model's context is 256 tokens: the same three shapes, scaled into it.
    for (const [prompt, gen] of name === "default" ? [[32, 224], [128, 128], [5, 251]] : LENGTHS) {
      if (prompt + gen > model.maxContext) {
        rows.push({ model: name, prompt, gen, skipped: `context ${model.maxContext} < ${prompt + gen}` });
        continue;
      }
      // The engine's accounting: whole pages per sequence.
      const perSeq = Math.ceil((prompt + gen) / st.pageTokens);
      const batch = Math.floor(st.pagesTotal / perSeq);
      log(`exp1 ${name} ${prompt}+${gen}: batch ${batch}`);
      // Verified by the pool itself: `batch` sequences can all reserve their full length at
      // once (none waits), and one more has to wait.
      const held = Array.from({ length: batch + 1 }, () => model.createSequence());
      const admitted = await Promise.all(held.slice(0, batch).map((s) => s.reserveRequest(prompt, gen)));
      const waiting = held[batch].reserveRequest(prompt, gen);
      await new Promise((r) => setImmediate(r));
      const verified = admitted.every(Boolean) && model.cacheStats().queued === 1;
      for (const s of held.slice(0, batch)) s.dispose();
      await waiting;
      held[batch].dispose();
      // A warm-up run of the same batch (it also records the decode steps' CUDA graphs for its
      // batch size; with --full it stops after 32 tokens), then the timed runs: --repeats in the
      // default set, one with --full (a whole batch of full-length requests).
      await throughput(model, prompt, gen, batch, 32);
      const runs = [];
      for (let r = 0; r < (opt.full ? 1 : repeats); r++) runs.push(await throughput(model, prompt, gen, batch));
      const tp = summary(runs.map((x) => x.tokPerS));
      // The generation phase alone at this batch, the regime the paper's long generations are
      // in: decode steps of `batch` sequences at the middle of the generation (prompt + gen / 2
      // tokens of context), forks of up to 4 distinct prefixes, timed as in experiment 2.
      const ctxMid = prompt + Math.floor(gen / 2);
      const bases = await randomPrefixes(model, Math.min(4, batch), ctxMid);
      const decodeMs = await forkedDecodeMs(bases, batch, opt.tiny ? 4 : 16);
      for (const s of bases) s.dispose();
      rows.push({
        model: name, prompt, gen, batch, measuredTokens: Number.isFinite(MEASURED) ? Math.min(gen, MEASURED) : gen, verified, tokPerS: tp,
        decodeContext: ctxMid, decodeMsPerStep: decodeMs, decodeTokPerS: (batch * 1e3) / decodeMs.median,
        kvBytesPerToken: model.kvBytesPerToken, pagesTotal: st.pagesTotal,
      });
    }
    await model.dispose();
  }
  return rows;
}

// ---- experiment 2: decode against batch size at 2048 tokens of context ---------------------------

const CTX2 = opt.tiny ? 128 : 2048;
const STEPS2 = opt.tiny ? 4 : 16;

async function experiment2(rates) {
  const rows = [];
  const names = opt.full ? modelNames.filter((n) => n !== "default") : modelNames.filter((n) => ["standard", "lckv-w2", "lckv-w10"].includes(n));
  for (const name of names) {
    const model = await load(name);
    const st = model.cacheStats();
    const c = model.config;
    const maxBatch = Math.floor(st.pagesTotal / Math.ceil((CTX2 + STEPS2) / st.pageTokens));
    // Distinct prefixes, forked: the timing of a batch of B sequences of 2048 tokens without
    // prefilling B x 2048 tokens. Forks share their prefix's pages, so the K/V bytes counted for
    // the roofline are an upper bound on what the attention actually fetches from memory.
    const bases = await randomPrefixes(model, Math.min(8, maxBatch), CTX2 + 1);
    const sizes = [...new Set([1, 8, 32, 128, 512, maxBatch].filter((b) => b <= maxBatch && (opt.full || b <= 512 || b === maxBatch)))].sort((a, b) => a - b);
    for (const b of sizes) {
      const t = await forkedDecodeMs(bases, b, STEPS2);
      const bytes = weightBytes(c) + b * (CTX2 + STEPS2 / 2) * kvReadBytesPerToken(c);
      const roofMs = (bytes / (rates.copyGBps * 1e9)) * 1e3;
      rows.push({ model: name, batch: b, maxBatch, msPerStep: t, tokPerS: (b * 1e3) / t.median, roofMs, ofRoofline: roofMs / t.median });
      log(`exp2 ${name} batch ${b}: ${t.median.toFixed(2)} ms/step, ${((roofMs / t.median) * 100).toFixed(0)}% of roofline`);
    }
    // Batch 1 at a short context too (the other batch-1 point of the decode roofline).
    const short = model.createSequence();
    await short.append(randomIds(129, c.vocabSize));
    const t128 = await forkedDecodeMs([short], 1, STEPS2);
    const roof128 = ((weightBytes(c) + 136 * kvReadBytesPerToken(c)) / (rates.copyGBps * 1e9)) * 1e3;
    rows.push({ model: name, batch: 1, context: 128, msPerStep: t128, tokPerS: 1e3 / t128.median, roofMs: roof128, ofRoofline: roof128 / t128.median });
    short.dispose();
    for (const s of bases) s.dispose();
    await model.dispose();
  }
  return rows;
}

// ---- experiment 3: prefill ------------------------------------------------------------------------

async function experiment3(rates) {
  const rows = [];
  // 8192 only with --full: its iterative LCKV prefill alone took ~35 s of the default set's 10 minutes.
  const lengths = opt.tiny ? [16, 64, 256] : opt.full ? [128, 512, 2048, 8192] : [128, 2048];
  for (const name of ["standard", "lckv-w2"].filter((n) => modelNames.includes(n))) {
    const model = await load(name);
    const c = model.config;
    const modes = c.plan.cyclicGroup ? ["iterative", "fixed-point", "sequential"] : ["fixed-point"];
    const slow = new Set();
    for (const mode of modes) {
      for (const n of lengths) {
        if (n > model.maxContext) continue;
        if (mode === "sequential" && n > (opt.full ? 2048 : 512)) continue; // token by token: slow by design
        const ids = randomIds(n + 1, c.vocabSize);
        let passes = 0;
        if (slow.has(mode)) continue;
        const t = await measure(async () => {
          const s = model.createSequence();
          const t0 = now();
          passes = (await s.append(ids, { prefill: mode })).passes;
          const ms = now() - t0;
          s.dispose();
          return ms;
        });
        // A mode whose run took over 20 s is not run at longer prompts (the default set's budget),
        // nor is a fixed point that did not converge (random weights need not contract: it then
        // stops at its pass limit and runs the rest token by token, exact but slow).
        if (!opt.full && (t.median > 20000 || (mode === "fixed-point" && passes >= Math.min(n, FIXED_POINT_MAX_PASSES)))) slow.add(mode);
        const flops = forwardFlops(c, n);
        rows.push({ model: name, mode, tokens: n, ms: t, tokPerS: (n * 1e3) / t.median, passes, tflops: flops / (t.median / 1e3) / 1e12, ofGemmRate: flops / (t.median / 1e3) / 1e12 / rates.bf16Tflops });
        log(`exp3 ${name} ${mode} ${n}: ${t.median.toFixed(1)} ms (${passes} passes)`);
      }
    }
    await model.dispose();
  }
  return rows;
}

// ---- experiment 4: peers --------------------------------------------------------------------------

function python(script, args) {
  const out = execFileSync("python3", [path.join(__dirname, script), ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  return out.trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
}

// `count` sequences of `tokens` random tokens each, to be forked for decode timings. One pass
// of the iterative prefill: their K/V only has to be there, not exact.
async function randomPrefixes(model, count, tokens) {
  const bases = [];
  for (let i = 0; i < count; i++) {
    const s = model.createSequence();
    await s.append(randomIds(tokens, model.config.vocabSize), { prefill: "iterative", prefillPasses: 1 });
    bases.push(s);
  }
  return bases;
}

// Median ms per decode step of `batch` forks of `bases` (round robin), each generating `steps`
// tokens at once: the scheduler runs them as one batch.
async function forkedDecodeMs(bases, batch, steps) {
  return measure(async () => {
    const seqs = Array.from({ length: batch }, (_, i) => bases[i % bases.length].fork());
    const t0 = now();
    await Promise.all(seqs.map(async (s) => {
      for await (const x of s.generate({ maxNewTokens: steps, temperature: 0, ignoreEos: true })) void x;
    }));
    const ms = (now() - t0) / steps;
    for (const s of seqs) s.dispose();
    return ms;
  });
}

// lckv's own decode step at `batch` sequences of `ctx` tokens, for a ratio measured side by
// side with a peer in the same invocation.
async function oursDecodeMs(model, batch, ctx) {
  const [base] = await randomPrefixes(model, 1, ctx + 1);
  const t = await forkedDecodeMs([base], batch, opt.tiny ? 4 : 16);
  base.dispose();
  return t;
}

async function experiment4(exp1) {
  if (!opt.peers || opt.device !== "cuda") return [];
  const rows = [];
  const std = modelDir("standard");
  const tokens = opt.tiny ? "4" : "32";
  const peer = (script, args, what) => {
    try {
      return python(script, args);
    } catch (e) {
      return [{ peer: what, error: `${script} exited with status ${e.status} (its output is in the bench log)` }];
    }
  };
  const ours = await load("standard");
  // Batch 1 at 128 and 2048 tokens, eager and with the static cache (one process, one load;
  // the static cache makes transformers compile its forward, once per cache length, and the
  // bench log shows how long each warm-up with its compile took).
  for (const r of peer("hf_peer.py", ["--model", std, "--context", `128,${CTX2}`, "--tokens", tokens, "--batch", "1", "--repeats", String(repeats), "--caches", "dynamic,static"], "transformers")) {
    if (!r.error) r.ours = await oursDecodeMs(ours, 1, r.context);
    rows.push(r);
  }
  // A large batch at 512 tokens of context: 64 sequences (a serving-sized batch that
  // transformers' eager cache holds easily), or with --full the largest batch our standard
  // model ran at 512+1024 (experiment 1) if that is larger.
  const fits = exp1.find((r) => r.model === "standard" && r.prompt === LENGTHS[0][0] && r.batch)?.batch ?? 0;
  const big = opt.tiny ? 16 : opt.full ? Math.max(64, fits) : 64;
  for (const r of peer("hf_peer.py", ["--model", std, "--context", String(LENGTHS[0][0]), "--tokens", tokens, "--batch", String(big), "--repeats", String(repeats)], "transformers eager")) {
    if (!r.error) r.ours = await oursDecodeMs(ours, big, r.context);
    rows.push(r);
  }
  await ours.dispose();
  const lckv = await load("lckv-w2");
  for (const r of peer("reference_peer.py", ["--model", modelDir("lckv-w2"), "--context", "128", "--tokens", opt.tiny ? "4" : "16", "--repeats", String(repeats)], "lckv PyTorch reference")) {
    if (!r.error) r.ours = await oursDecodeMs(lckv, 1, 128);
    rows.push(r);
  }
  await lckv.dispose();
  return rows;
}

// ---- experiment 5: the attention kernels alone -----------------------------------------------------

// One decode step's attention over `sequences` sequences of ATTN_CONTEXT tokens, each query at the
// last position of its own pages, timed alone (no model around it): bytes it must move (K and V
// of every key, plus the queries and the output) over its time, against the copy bandwidth.
const ATTN_SHAPE = opt.tiny ? { numHeads: 4, numKvHeads: 2, headDim: 16 } : { numHeads: 32, numKvHeads: 4, headDim: 64 };
const ATTN_CONTEXT = opt.tiny ? 256 : 4096;
const ATTN_SEQUENCES = opt.tiny ? [1, 4, 16] : [1, 16, 128];

async function experiment5(rates) {
  const addon = loadAddon();
  const rows = [];
  for (const sequences of ATTN_SEQUENCES) {
    const shape = { backend: opt.device, sequences, context: ATTN_CONTEXT, ...ATTN_SHAPE };
    // Enough calls per sample that each lasts milliseconds: the small shapes take microseconds.
    const iterations = opt.tiny ? 5 : Math.max(20, Math.ceil(2000 / sequences));
    let bytes = 0;
    const t = await measure(async () => {
      const r = addon.benchAttention({ ...shape, iterations });
      bytes = r.bytes;
      return r.ms;
    }, Math.max(repeats, 5));
    const gbps = bytes / (t.median / 1e3) / 1e9;
    rows.push({ sequences, context: ATTN_CONTEXT, ...ATTN_SHAPE, iterations, bytes, ms: t, gbps, ofCopy: gbps / rates.copyGBps });
    log(`exp5 ${sequences} x ${ATTN_CONTEXT}: ${(t.median * 1e3).toFixed(1)} us, ${gbps.toFixed(0)} GB/s (${((gbps / rates.copyGBps) * 100).toFixed(0)}% of copy)`);
  }
  return rows;
}

// ---- main -----------------------------------------------------------------------------------------

(async () => {
  const t0 = now();
  const rates = opt.device === "cuda" ? python("device_rates.py", [])[0] : { card: "cpu", driver: "-", copyGBps: NaN, bf16Tflops: NaN, memoryGB: os.totalmem() / 1e9 };
  log(`card ${rates.card}, copy ${rates.copyGBps?.toFixed?.(0)} GB/s, bf16 GEMM ${rates.bf16Tflops?.toFixed?.(0)} TFLOP/s`);
  await writeModels(modelNames);
  const results = {
    date: new Date().toISOString().slice(0, 10),
    command: `npm run bench${process.argv.slice(2).length ? " -- " + process.argv.slice(2).join(" ") : ""}`,
    full: !!opt.full,
    rates,
    models: Object.fromEntries(modelNames.map((n) => [n, { what: MODELS[n].what, layerTypes: MODELS[n].layerTypes ?? null }])),
    measuredTokens: Number.isFinite(MEASURED) ? MEASURED : null,
    kvPoolGiB: KV_POOL_GIB,
  };
  const benchDir = path.join(opt.out, "bench");
  const file = path.join(benchDir, "results.json");
  // --only with earlier results: keep the experiments not rerun.
  if (opt.only && fs.existsSync(file)) {
    const old = JSON.parse(fs.readFileSync(file, "utf8"));
    for (const k of ["throughput", "decode", "prefill", "peers", "attention"]) if (old[k] && !only.has({ throughput: 1, decode: 2, prefill: 3, peers: 4, attention: 5 }[k])) results[k] = old[k];
    results.commands = [...(old.commands ?? [`${old.command} (${old.date}, ${old.rates?.card})`])];
    results.measuredAt = { ...(old.measuredAt ?? {}) };
  }
  // The code measured: LCKV_COMMIT where the checkout has no git history (a copied tree).
  let commit = process.env.LCKV_COMMIT;
  if (!commit) {
    try {
      commit = execFileSync("git", ["rev-parse", "--short", "HEAD"], { cwd: ROOT, stdio: ["ignore", "pipe", "ignore"] }).toString().trim();
    } catch {
      commit = "unknown commit";
    }
  }
  results.commit = commit;
  results.commands = [...(results.commands ?? []), `${results.command} (${results.date}, ${rates.card}, ${commit}: experiments ${[...only].join(", ")})`];
  // Written after every experiment, so an interrupted run keeps what it measured.
  const save = () => {
    results.seconds = (now() - t0) / 1e3;
    fs.mkdirSync(benchDir, { recursive: true });
    fs.writeFileSync(file, JSON.stringify(results, null, 1) + "\n");
    renderReport(results, opt.out);
  };
  // Seconds per part, kept in the results: where the default set's time budget goes.
  results.experimentSeconds = { setup: (now() - t0) / 1e3 };
  const experiments = [
    [1, "throughput", () => experiment1()],
    [2, "decode", () => experiment2(rates)],
    [3, "prefill", () => experiment3(rates)],
    [4, "peers", () => experiment4(results.throughput ?? [])],
    [5, "attention", () => experiment5(rates)],
  ];
  for (const [n, key, run] of experiments) {
    if (!only.has(n)) continue;
    const start = now();
    results[key] = await run();
    results.experimentSeconds[key] = (now() - start) / 1e3;
    results.measuredAt = { ...(results.measuredAt ?? {}), [key]: commit };
    log(`experiment ${n} took ${results.experimentSeconds[key].toFixed(0)} s`);
    save();
  }
  log(`done in ${results.seconds.toFixed(0)} s; wrote ${path.join(opt.out, "benchmarks.md")} and ${benchDir}`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
