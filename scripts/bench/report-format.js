/**
 * The bench report's building blocks: number formats, markdown tables, the results files it reads
 * (the default set's results.json and each part's full-*.json) and the labels rows share.
 */
const fs = require("node:fs");
const path = require("node:path");
const { PARTS } = require("./parts");

const fmt = (x, d = 1) => (x === undefined || x === null || Number.isNaN(x) ? "-" : Number(x).toFixed(d));
const pct = (x) => (x === undefined || x === null || !Number.isFinite(x) ? "-" : `${(100 * x).toFixed(0)}%`);
const spread = (s) => (s ? `${pct(s.spread)}${s.flagged ? " ⚠" : ""}` : "-");
const ratio = (x, d = 2) => (x === undefined || x === null || !Number.isFinite(x) ? "-" : `${fmt(x, d)}x`);
const table = (head, rows) => [`| ${head.join(" | ")} |`, `| ${head.map(() => "---").join(" | ")} |`, ...rows.map((r) => `| ${r.join(" | ")} |`)].join("\n");
const bytes = (b) => (b >= 2 ** 30 ? `${fmt(b / 2 ** 30, 2)} GiB` : b >= 2 ** 20 ? `${fmt(b / 2 ** 20, 1)} MiB` : `${fmt(b / 2 ** 10, 1)} KiB`);
const gib = (g) => (g === null || g === undefined ? "80% of free GPU memory" : g >= 1 ? `${fmt(g, g % 1 ? 1 : 0)} GiB` : `${fmt(g * 1024, 0)} MiB`);

const SHAPE_NAMES = { "1.1b": "TinyLlama-1.1B shape", "7b": "Llama-2-7B shape" };
const shapeName = (s) => SHAPE_NAMES[s] ?? s;

/**
 * The results files of a docs folder: the default set first, then the parts in parts.js's order,
 * then any other full-*.json. Each with a label saying which invocation made it.
 */
function loadResultSets(benchDir) {
  if (!fs.existsSync(benchDir)) return [];
  const files = fs.readdirSync(benchDir).filter((f) => f === "results.json" || /^full-.*\.json$/.test(f));
  const partOrder = Object.keys(PARTS);
  // full-<part>[-<shapes>][.<K/V types>].json: a part's name may itself hold dots (1.1b).
  const rank = (f) => {
    if (f === "results.json") return -1;
    const name = f.slice("full-".length, -".json".length);
    const i = partOrder.findIndex((p) => name === p || name.startsWith(`${p}.`) || name.startsWith(`${p}-`));
    return i < 0 ? partOrder.length : i;
  };
  return files
    .sort((a, b) => rank(a) - rank(b) || a.localeCompare(b))
    .map((file) => {
      const r = JSON.parse(fs.readFileSync(path.join(benchDir, file), "utf8"));
      const label = file === "results.json" ? "Default set" : r.part ? `Full protocol, part ${r.part}` : `Full protocol, experiments ${experimentsOf(r)}`;
      return { file, label, r };
    });
}

/** The experiments a custom full-protocol run chose (--only), from the keys its figures sit under. */
function experimentsOf(r) {
  const keys = Object.keys(r.experimentSeconds ?? {}).filter((k) => k !== "setup");
  return keys.length ? keys.join(", ") : "custom";
}

/**
 * Results written before full generations were the rule timed only the first `measuredTokens`
 * generated tokens of each request: their figures are "tokens/s over the first N tokens", never
 * throughput. Returns N for such a results file, null for full generations.
 */
function truncatedTokens(r) {
  return r.measuredTokens === undefined || r.measuredTokens === null ? null : r.measuredTokens;
}

/** The K/V type of a row: the one recorded, else the engine default's, named by its bytes per element. */
function kvLabel(row) {
  if (row.kvDtype) return row.kvDtype;
  const byBytes = { 4: "f32", 2: "16-bit", 1: "8-bit", 0.5: "4-bit" }[row.kvBytesPerElement];
  return byBytes ? `${byBytes} (engine default)` : "f32 (engine default)";
}

/** A set's label inside a sentence: its first letter lowercased, the names in it (kvTypes) kept. */
const inSentence = (label) => label.charAt(0).toLowerCase() + label.slice(1);

/** A row's shape: results from before the 7B shape are all at the 1.1B one. */
const shapeOf = (row) => row.shape ?? "1.1b";

/** "Measured at commit X" under a section of a file whose figures come from another commit than its latest run's. */
function measuredAt(r, key) {
  const at = r.measuredAt?.[key];
  return at && at !== r.commit ? [`Measured at commit ${at} (the figures of the other sections of this file: ${r.commit}).`, ""] : [];
}

/**
 * The heading of one result file's part of a section (its label, file, date and card; `prefix`
 * before the label, `extra` after the card), then the section's "measured at" line if any.
 */
function setHeading(set, key, { prefix = "", extra = "" } = {}) {
  const r = set.r;
  return [`### ${prefix}${set.label} (\`${set.file}\`: ${r.date}, ${r.rates.card}${extra})`, "", ...measuredAt(r, key), ...firstStepIncluded(r, key)];
}

/** The experiments whose decode figures come from measure.js's stepMs. */
const STEP_TIMED = new Set(["throughput", "decode", "kvTypes"]);

/**
 * A line under a section whose decode figures were measured before stepMs left each run's first
 * step out: that step re-runs the last token after the rewind, and with an int4 cache rewound
 * into a quantized page it first reads that page's rows back from their codes, host round trips
 * per K/V layer and sequence that such a figure spreads over its steps.
 */
function firstStepIncluded(r, key) {
  if (!STEP_TIMED.has(key) || !r[key] || r.firstStepLeftOut?.[key]) return [];
  return ["Measured before decode timings left out each run's first step: these decode figures include it, and an int4 figure at a context that ends a page (a multiple of 16 tokens) with it the read of each sequence's last page back from its codes (docs/profiling.md, \"int4's first step after a rewind\").", ""];
}

module.exports = { inSentence, fmt, pct, spread, ratio, table, bytes, gib, shapeName, loadResultSets, truncatedTokens, kvLabel, shapeOf, setHeading };
