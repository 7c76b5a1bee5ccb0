#!/usr/bin/env node
/**
 * `npm run bench`: LCKV against standard caches and against the peers, side by side, on the GPU.
 *
 *   npm run bench                            # the default set: about 6 to 7 minutes on an H100
 *   npm run bench -- --full --part <name>    # the paper's protocol, one part of under 10 minutes
 *   npm run bench -- --kv-dtypes f32,bf16    # each model at each K/V cache type
 *   npm run bench -- --device cpu --tiny     # checks the script on tiny shapes (figures mean nothing)
 *
 * Shapes (random bf16 weights, models.js): TinyLlama-1.1B ("1.1b") and Llama-2-7B ("7b"), each as
 * standard, LCKV w=2, CLA and sandwich (and LCKV w=10 and the shipped default model on request).
 * Experiments (experiments/):
 *   1. the paper's throughput experiment: the largest batch the K/V pool holds for each length
 *      pair, verified by running it, and FULL generations there (every token of every request):
 *      end-to-end throughput (generated tokens over wall time, prefill included), the decode step
 *      alone at that batch, and beside each row the bound on LCKV's decode gain (costs.js);
 *   2. decode latency and throughput against batch size at 2048 tokens of context, against the
 *      memory-bandwidth roofline;
 *   3. prefill throughput against prompt length, for each LCKV prefill mode; and many prompts at
 *      once: the standard model's 16 x 2048 tokens in mixed steps, LCKV's 64 x 2048 as batched
 *      token steps (exact), with the rows the scheduler's steps carried;
 *   4. the Python peers: transformers eager and static cache, and the PyTorch reference of LCKV;
 *   5. the attention kernels alone, in each shape's heads;
 *   6. node-llama-cpp (llama.cpp) through its own API, on GGUF files of the same shape;
 *   7. the K/V cache types side by side: capacity in one pool, decode at batch 64 and 2048 tokens
 *      against each type's roofline, batch 1, and the attention alone (experiments/kv-types.js);
 *   8. fairness: a running stream's longest gap between tokens while a 2048-token prompt arrives,
 *      against its step time (experiments/stream-gap.js).
 * The default set: the 1.1B shape, experiments 1, 2, 3, 5, 6, 7 and 8, a 512 MiB pool, two timed full
 * generations per row.
 *
 * The full protocol runs in parts (parts.js), each a preset of --shapes, --only and --models:
 *   1.1b      full generations at the 1.1B shape, 2 GiB pool             ~6 min
 *   7b-a      full generations at 7B: standard, CLA, LCKV w=2, 8 GiB pool ~6 min (weights written once)
 *   7b-b      full generations at 7B: standard, sandwich                   ~5 min
 *   kernels   experiments 2, 3, 5 and 8 at both shapes                     ~8 min
 *   peers     transformers, the PyTorch reference, node-llama-cpp at 1.1B  ~5 min
 *   llama-7b  node-llama-cpp and lckv at 7B                               ~4 min (GGUFs written once)
 * (estimates for one K/V type of 2 or 4 bytes). Each part writes docs/bench/full-<part>[-<shapes>][.<K/V types>].json; the
 * report (report.js) renders the default set and every part into docs/benchmarks.md.
 * node-llama-cpp is not a dependency: scripts/bench/llama-peer/prepare.sh installs and packs it
 * here, build-on-device.sh builds it on the GPU machine.
 *
 * Every figure is the median of several runs after a warm-up, with its spread; a spread above 5%
 * is flagged. A figure from a truncated generation is never called throughput.
 */
const { execFileSync } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { Command, Option } = require("commander");
const { loadModel } = require("../../dist");
const { renderReport } = require("./report");
const { ModelStore, MODEL_NAMES, SHAPES } = require("./models");
const { PARTS, POOL_GIB, resultsFileName } = require("./parts");
const { now, log } = require("./measure");
const { python } = require("./experiments/hf-peers");

const ROOT = path.join(__dirname, "..", "..");
/** The K/V cache types loadModel's kvCacheDtype takes. */
const KV_DTYPES = ["f32", "bf16", "fp8", "int8", "int4"];
const EXPERIMENTS = [
  [1, "throughput", require("./experiments/throughput").experimentThroughput],
  [2, "decode", require("./experiments/decode").experimentDecode],
  [3, "prefill", require("./experiments/prefill").experimentPrefill],
  [4, "peers", require("./experiments/hf-peers").experimentHfPeers],
  [5, "attention", require("./experiments/attention").experimentAttention],
  [6, "llamaPeer", require("./experiments/llama-peer").experimentLlamaPeer],
  [7, "kvTypes", require("./experiments/kv-types").experimentKvTypes],
  [8, "streamGap", require("./experiments/stream-gap").experimentStreamGap],
];
const DEFAULT_SET = { shapes: ["1.1b"], only: [1, 2, 3, 5, 6, 7, 8], models: ["standard", "lckv-w2", "cla", "sandwich"] };

const list = (v) => v.split(",").map((x) => x.trim()).filter(Boolean);
function fail(message) {
  process.stderr.write(`bench: ${message}\n`);
  process.exit(2);
}

const opt = new Command()
  .name("bench")
  .option("--full", "the paper's protocol (with --part, or --only and friends)")
  .addOption(new Option("--part <name>", "with --full: one part of the protocol").choices(Object.keys(PARTS)))
  .option("--work <dir>", "where the random models and GGUF files are written", path.join(os.tmpdir(), "lckv-bench"))
  .option("--out <dir>", "where docs/benchmarks.md and docs/bench/ go", path.join(ROOT, "docs"))
  .option("--kv-memory <GiB>", "K/V pool of each model (default: 0.5 GiB at 1.1B and 4 at 7B; with --full 2 and 8)")
  .option("--kv-dtypes <list>", `K/V cache types to run each model at (${KV_DTYPES.join(", ")}; default: the engine's)`)
  .option("--repeats <n>", "timed runs per figure (after one warm-up)", "3")
  .option("--only <list>", "experiments to run, e.g. 1,2")
  .option("--models <list>", `models to run (${MODEL_NAMES.join(",")})`)
  .option("--shapes <list>", `shapes to run (${Object.keys(SHAPES).join(",")})`)
  .option("--lengths <list>", "experiment 1's prompt+generation pairs to run, e.g. 512+1024,2048+2048")
  .option("--llama-peer <dir>", "where prepare.sh installed node-llama-cpp", path.join(ROOT, ".llama-peer", "install"))
  .option("--no-peers", "skip the peers (transformers, the PyTorch reference, node-llama-cpp)")
  .option("--device <d>", "cuda (the benchmark's subject) or cpu (to check the script on tiny shapes)", "cuda")
  .option("--tiny", "tiny shapes (checks the script; figures mean nothing)")
  .parse()
  .opts();

if (opt.part && !opt.full) fail("--part is a part of the full protocol: give --full too");
if (opt.full && !opt.part && !opt.only) fail(`--full runs in parts of under 10 minutes: add --part <name> (${Object.keys(PARTS).join(", ")}), or choose with --only/--shapes/--models`);
const preset = opt.part ? PARTS[opt.part] : opt.full ? {} : DEFAULT_SET;
const only = new Set(opt.only ? list(opt.only).map(Number) : preset.only ?? DEFAULT_SET.only);
for (const n of only) if (!EXPERIMENTS.some(([k]) => k === n)) fail(`--only: no experiment ${n} (1 to ${EXPERIMENTS.length})`);
const shapes = opt.shapes ? list(opt.shapes) : preset.shapes ?? DEFAULT_SET.shapes;
for (const s of shapes) if (!SHAPES[s]) fail(`--shapes: unknown shape '${s}' (known: ${Object.keys(SHAPES).join(", ")})`);
const models = opt.models ? list(opt.models) : preset.models ?? DEFAULT_SET.models;
for (const m of models) if (!MODEL_NAMES.includes(m)) fail(`--models: unknown model '${m}' (known: ${MODEL_NAMES.join(", ")})`);
const kvDtypes = opt.kvDtypes ? list(opt.kvDtypes) : [undefined];
for (const t of kvDtypes) if (t !== undefined && !KV_DTYPES.includes(t)) fail(`--kv-dtypes: unknown K/V cache type '${t}' (known: ${KV_DTYPES.join(", ")})`);
const lengths = opt.lengths ? list(opt.lengths).map((p) => { const m = /^(\d+)\+(\d+)$/.exec(p); if (!m) fail(`--lengths: '${p}' is not prompt+generation, e.g. 512+1024`); return [+m[1], +m[2]]; }) : null;
// A pair that no selected shape runs would leave experiment 1 with nothing to time: refuse it.
if (lengths && only.has(1)) {
  const { LENGTHS, TINY_LENGTHS } = require("./experiments/throughput");
  const known = [...new Set(shapes.flatMap((s) => (opt.tiny ? TINY_LENGTHS : LENGTHS)[s].map(([p, g]) => `${p}+${g}`)))];
  for (const [p, g] of lengths)
    if (!known.includes(`${p}+${g}`)) fail(`--lengths: no shape of this run has ${p}+${g} (known${opt.tiny ? " with --tiny" : ""}: ${known.join(", ")})`);
}
const repeats = Math.max(1, +opt.repeats);
if (opt.kvMemory !== undefined && !(+opt.kvMemory > 0)) fail(`--kv-memory: a size in GiB above 0, got '${opt.kvMemory}'`);

const store = new ModelStore(opt.work, !!opt.tiny);
const poolGiB = (shape) => (opt.kvMemory !== undefined ? +opt.kvMemory : opt.tiny ? POOL_GIB.tiny : POOL_GIB[opt.full ? "full" : "default"][shape]);

/** The K/V type a model runs with: what the engine reports, else what was asked, else null (its default). */
function kvTypeOf(model, asked) {
  return model.info?.kvCacheDtype ?? model.kvCacheDtype ?? asked ?? null;
}

/** The shared state of one invocation, handed to every experiment. */
const bench = {
  full: !!opt.full, tiny: !!opt.tiny, device: opt.device, peers: opt.peers, repeats,
  // Full generations are long: two timed runs each in the default set, one in the full protocol.
  generationRuns: opt.full ? 1 : Math.min(2, repeats),
  shapes, models, kvDtypes, store, poolGiB, kvTypeOf,
  llamaPeerInstall: path.resolve(opt.llamaPeer),
  rates: null,
  results: null,
  lengths: (shape, table) => (lengths ? table[shape].filter(([p, g]) => lengths.some(([a, b]) => a === p && b === g)) : table[shape]),
  /** Loads a model of the run; `extra` overrides the load options (e.g. its own pool). */
  async load(shape, name, kvDtype, extra = {}) {
    await store.ensure(shape, [name]);
    const kvCacheMemory = Math.floor(poolGiB(shape) * 2 ** 30);
    return loadModel(store.dir(shape, name), { device: opt.device, prefixCache: 0, maxBatch: 1 << 20, kvCacheMemory, ...(kvDtype ? { kvCacheDtype: kvDtype } : {}), ...extra });
  },
};

/** The results file of this invocation: the default set's, or the part's (parts.js, resultsFileName). */
function resultsFile(benchDir) {
  return path.join(benchDir, opt.full ? resultsFileName({ part: opt.part, only: [...only], shapes, kvDtypes: opt.kvDtypes ? kvDtypes : null }) : "results.json");
}

// A promise that never settles (a request waiting for K/V pages that nothing will free, say)
// empties the event loop, and Node would exit with status 0 and no results: say so and fail.
let finished = false;
process.on("beforeExit", () => {
  if (finished) return;
  console.error("the bench stopped with work pending: a request never finished (the last line above says which experiment)");
  process.exit(1);
});

/**
 * The invocation as the report shows it: without the options that only say where files go
 * (--out, --work, --llama-peer), which name directories of the machine it ran on and change no
 * figure.
 */
function benchCommand(args) {
  const kept = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (["--out", "--work", "--llama-peer"].includes(a)) i++;
    else if (!/^--(out|work|llama-peer)=/.test(a)) kept.push(a);
  }
  return `npm run bench${kept.length ? " -- " + kept.join(" ") : ""}`;
}

(async () => {
  const t0 = now();
  bench.rates = opt.device === "cuda" ? python("device_rates.py", [])[0] : { card: "cpu", driver: "-", copyGBps: NaN, bf16Tflops: NaN, memoryGB: os.totalmem() / 1e9 };
  log(`card ${bench.rates.card}, copy ${bench.rates.copyGBps?.toFixed?.(0)} GB/s, bf16 GEMM ${bench.rates.bf16Tflops?.toFixed?.(0)} TFLOP/s`);
  const results = (bench.results = {
    date: new Date().toISOString().slice(0, 10),
    command: benchCommand(process.argv.slice(2)),
    full: !!opt.full,
    part: opt.part ?? null,
    tiny: !!opt.tiny,
    rates: bench.rates,
    shapes: Object.fromEntries(shapes.map((s) => [s, store.shape(s).what])),
    models: Object.fromEntries(models.map((m) => [m, { what: store.variant(shapes[0], m).what, layerTypes: Object.fromEntries(shapes.map((s) => [s, store.variant(s, m).layerTypes ?? null])) }])),
    kvDtypes: kvDtypes.map((t) => t ?? null),
    generationRuns: bench.generationRuns,
    kvPoolGiB: Object.fromEntries(shapes.map((s) => [s, poolGiB(s)])),
  });
  const benchDir = path.join(opt.out, "bench");
  const file = resultsFile(benchDir);
  // --only with earlier results in the same file: keep the experiments not rerun.
  if (opt.only && fs.existsSync(file)) {
    const old = JSON.parse(fs.readFileSync(file, "utf8"));
    const kept = EXPERIMENTS.filter(([n, key]) => old[key] && !only.has(n));
    for (const [, key] of kept) results[key] = old[key];
    if (kept.length) {
      // What describes the kept figures stays with them: an earlier protocol's truncated
      // generations (never to be read as throughput) and the models they ran.
      if (old.measuredTokens !== undefined) results.measuredTokens = old.measuredTokens;
      results.models = { ...(old.models ?? {}), ...results.models };
    }
    results.commands = [...(old.commands ?? [`${old.command} (${old.date}, ${old.rates?.card})`])];
    results.measuredAt = { ...(old.measuredAt ?? {}) };
    results.experimentSeconds = { ...(old.experimentSeconds ?? {}) };
    results.firstStepLeftOut = { ...(old.firstStepLeftOut ?? {}) };
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
  results.commands = [...(results.commands ?? []), `${results.command} (${results.date}, ${bench.rates.card}, ${commit}: experiments ${[...only].join(", ")})`];
  // Written after every experiment, so an interrupted run keeps what it measured.
  const save = () => {
    results.seconds = (now() - t0) / 1e3;
    fs.mkdirSync(benchDir, { recursive: true });
    fs.writeFileSync(file, JSON.stringify(results, null, 1) + "\n");
    renderReport(opt.out);
  };
  results.experimentSeconds = { ...(results.experimentSeconds ?? {}), setup: (now() - t0) / 1e3 };
  for (const [n, key, run] of EXPERIMENTS) {
    if (!only.has(n)) continue;
    const start = now();
    results[key] = await run(bench);
    results.experimentSeconds[key] = (now() - start) / 1e3;
    results.measuredAt = { ...(results.measuredAt ?? {}), [key]: commit };
    // Decode steps are timed without each run's first step (measure.js, stepMs); the report marks
    // the figures of experiments measured before that.
    results.firstStepLeftOut = { ...(results.firstStepLeftOut ?? {}), [key]: true };
    log(`experiment ${n} took ${results.experimentSeconds[key].toFixed(0)} s`);
    save();
  }
  log(`done in ${results.seconds.toFixed(0)} s; wrote ${file} and ${path.join(opt.out, "benchmarks.md")}`);
  finished = true;
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
