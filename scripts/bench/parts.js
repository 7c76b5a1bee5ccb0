/**
 * `npm run bench -- --full --part <name>`: the paper's protocol, in parts of under 10 minutes on an
 * H100 each (the lent GPU machine's limit per command). Each part is a preset of --shapes,
 * --only and --models, and writes docs/bench/full-<part>[-<shapes>][.<K/V types>].json (the shapes
 * where --shapes narrows the preset); the report reads every such file beside
 * docs/bench/results.json (the default set). --kv-dtypes runs each model
 * at each K/V type: a part's time grows with the number of types, so run one type per call where
 * the estimate says so. The estimates are for one K/V type of 2 or 4 bytes, from the H100 figures
 * of 2026-11/12; a 1-byte or 4-bit K/V type multiplies the batches, and LCKV's prefill (one
 * iterative prefill per request) with them.
 */
const PARTS = {
  "1.1b": { shapes: ["1.1b"], only: [1], what: "full generations at the 1.1B shape: standard, LCKV w=2, CLA, sandwich at 512+1024, 2048+2048 and 5+8187", minutes: 6 },
  "7b-a": { shapes: ["7b"], only: [1], models: ["standard", "cla", "lckv-w2"], what: "full generations at the 7B shape, standard, CLA and LCKV w=2 at 512+1024 and 2048+2048 (writes the 13.5 GB of weights the first time)", minutes: 6 },
  "7b-b": { shapes: ["7b"], only: [1], models: ["standard", "sandwich"], what: "full generations at the 7B shape, sandwich (and standard again, for its ratios) at 512+1024 and 2048+2048", minutes: 5 },
  // Experiment 3's many-prompt rows add to the ~5 minutes measured before them: at 1.1B a warm-up
  // and 3 runs of LCKV's 64 x 2048 (~4.2 s a run on an H100, 2026-12-06) and of the standard
  // 16 x 2048 (under a second), ~20 s; at 7B not measured yet, estimated at ~1 minute more (its
  // steps read ~6x the weights). Experiment 2's sequences of their own (up to 128 per model, 2049
  // tokens each, one-pass prefills) add an estimated ~2 s per model at 1.1B and ~15 s at 7B.
  kernels: { shapes: ["1.1b", "7b"], only: [2, 3, 5, 8], what: "decode against batch size, prefill (one prompt at a time, and many at once), the attention kernels and a running stream's longest wait while a prompt arrives, at both shapes", minutes: 8 },
  peers: { shapes: ["1.1b"], only: [4, 6], what: "transformers (eager and static cache), the PyTorch reference and node-llama-cpp at the 1.1B shape", minutes: 5 },
  "llama-7b": { shapes: ["7b"], only: [6], what: "node-llama-cpp and lckv at the 7B shape (writes 25 GB of GGUF the first time)", minutes: 4 },
};

/** The K/V pool of each model, in GiB, per shape: the default set's, and the full protocol's. */
const POOL_GIB = { default: { "1.1b": 0.5, "7b": 4 }, full: { "1.1b": 2, "7b": 8 }, tiny: 1 / 64 };

/**
 * The results file of a full-protocol run: full-<part>[.<K/V types>].json, or
 * full-custom-<experiments>-<shapes>... for a run of --only without a part. A part run at fewer
 * shapes than its preset (--shapes) writes full-<part>-<shapes>..., so that the part's other
 * shapes, run in another call, keep their file beside it. `kvDtypes`: the --kv-dtypes list, or null.
 */
function resultsFileName({ part, only, shapes, kvDtypes }) {
  const narrowed = part && PARTS[part].shapes.some((s) => !shapes.includes(s));
  const name = part ? (narrowed ? `${part}-${shapes.join("+")}` : part) : `custom-${only.join("")}-${shapes.join("+")}`;
  return `full-${name}${kvDtypes ? `.${kvDtypes.join("+")}` : ""}.json`;
}

module.exports = { PARTS, POOL_GIB, resultsFileName };
