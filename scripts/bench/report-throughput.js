/**
 * The report's experiment 1: full-generation throughput with the decode bound beside every row
 * (costs.js), where prefill takes over, and a plain account of where LCKV loses and why.
 */
const { decodeGainBound, bytesPerGeneratedToken, prefillTakeover, fullGenerationFloorMs } = require("./costs");
const { SHAPES, TINY_SHAPES } = require("./models");
const { inSentence, fmt, pct, spread, ratio, table, bytes, gib, shapeName, truncatedTokens, kvLabel, shapeOf, setHeading } = require("./report-format");

/** Every experiment-1 row of every results file, with the file it came from. */
function throughputEntries(sets) {
  return sets.flatMap((set) => (set.r.throughput ?? []).map((row) => ({ set, row })));
}

const sameCell = (a, b) => shapeOf(a) === shapeOf(b) && kvLabel(a) === kvLabel(b) && a.prompt === b.prompt && a.gen === b.gen && (a.kvPoolGiB ?? null) === (b.kvPoolGiB ?? null);

/** The standard model's row at the same shape, K/V type, lengths and pool: from the same file if it has one. */
function standardFor(e, entries) {
  if (e.row.model === "default") return null;
  const candidates = entries.filter((o) => o.row.model === "standard" && o.row.batch && sameCell(o.row, e.row));
  return candidates.find((o) => o.set === e.set) ?? candidates[0] ?? null;
}

/** What the report says of a row: its ratios to the standard row, its bound, its roofline, its prefill share. */
function figures(e, entries) {
  const se = standardFor(e, entries), x = e.row, s = se?.row;
  const full = truncatedTokens(e.set.r) === null && x.wallMs !== undefined;
  const f = { std: s, full };
  if (s) {
    f.batchRatio = x.batch / s.batch;
    f.e2eRatio = x.tokPerS.median / s.tokPerS.median;
    if (x.decodeTokPerS && s.decodeTokPerS) f.decodeRatio = x.decodeTokPerS / s.decodeTokPerS;
  }
  if (x.weightBytes !== undefined) {
    f.perToken = bytesPerGeneratedToken(x.weightBytes, x.batch, x.attentionBytes);
    const copy = e.set.r.rates.copyGBps;
    if (copy > 0) {
      f.roofTokPerS = (copy * 1e9) / f.perToken;
      if (x.decodeTokPerS) f.ofRoofline = x.decodeTokPerS / f.roofTokPerS;
    }
    if (s?.weightBytes !== undefined) f.bound = decodeGainBound({ wStd: s.weightBytes, batchStd: s.batch, w: x.weightBytes, batch: x.batch, a: x.attentionBytes });
  }
  if (full && x.decodeMsPerStep) Object.assign(f, prefillTakeover({ wallMs: x.wallMs.median, gen: x.gen, decodeMsPerStep: x.decodeMsPerStep.median }));
  // The run's decode steps against the decode column's: the wall time after the last request's
  // first token, over the tokens that request still generates. Not for decode columns timed on
  // forks (‡), whose shared pages made them fast.
  if (full && x.decodeMsPerStep && x.lastFirstTokenMs && x.gen > 1 && (x.decodePrefixes ?? 0) >= x.batch)
    f.runStepRatio = (x.wallMs.median - x.lastFirstTokenMs.median) / (x.gen - 1) / x.decodeMsPerStep.median;
  if (full) {
    f.floorTokPerS = floorTokPerS(e.set, x);
    if (f.floorTokPerS !== undefined) f.ofFloor = x.tokPerS.median / f.floorTokPerS;
    const sFloor = se && floorTokPerS(se.set, s);
    if (f.floorTokPerS !== undefined && sFloor !== undefined) f.floorRatio = f.floorTokPerS / sFloor;
  }
  return f;
}

/**
 * A full-generation row's end-to-end floor in tokens/s (costs.js, fullGenerationFloorMs) at its
 * file's measured copy and GEMM rates; undefined for rows that do not record how their prompts
 * went (those before the prefill column), without the rates, or of the shipped default model
 * (its LM head is not its shape row's).
 */
function floorTokPerS(set, x) {
  const rates = set.r.rates, shape = (set.r.tiny ? TINY_SHAPES : SHAPES)[shapeOf(x)];
  if (x.model === "default" || x.prefill === undefined || x.weightBytes === undefined || !x.decodeContext || !shape || !(rates?.copyGBps > 0) || !(rates?.bf16Tflops > 0)) return undefined;
  const ms = fullGenerationFloorMs({
    weightBytes: x.weightBytes, headBytes: shape.vocab * shape.hidden * 2, a1: x.attentionBytes / x.decodeContext,
    batch: x.batch, prompt: x.prompt, gen: x.gen, tokenStepShare: x.prefill === "sequential" ? x.sharedPromptShare : 0,
    copyGBps: rates.copyGBps, tflops: rates.bf16Tflops,
  });
  return (x.batch * x.gen) / (ms / 1000);
}

/**
 * A row's prefill mode and the share of its prompt tokens that went as rows of the shared steps.
 * Rows measured before the mode was recorded asked every model for the iterative prefill (a model
 * without a cyclic group runs one pass whatever the mode: the default).
 */
function prefillLabel(set, x) {
  if (x.prefill === undefined) return hasCyclicGroup(set, x) ? "iterative" : "default";
  return `${x.prefill} (${pct(x.sharedPromptShare)})`;
}

/** One results file's experiment-1 table. */
function throughputTable(set, entries) {
  const n = truncatedTokens(set.r);
  const rows = [];
  for (const e of entries.filter((o) => o.set === set)) {
    const x = e.row;
    if (x.skipped) {
      rows.push([shapeName(shapeOf(x)), x.model, kvLabel(x), `${x.prompt}+${x.gen}`, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", x.skipped]);
      continue;
    }
    const f = figures(e, entries);
    rows.push([
      shapeName(shapeOf(x)), x.model, kvLabel(x), `${x.prompt}+${x.gen}`, prefillLabel(set, x),
      `${x.batch}${x.verified ? "" : " (not verified)"}${f.std ? ` (${ratio(f.batchRatio, 1)})` : ""}`,
      `${fmt(x.tokPerS.median, 0)} (${spread(x.tokPerS)})`, f.std ? ratio(f.e2eRatio) : "-",
      f.floorTokPerS !== undefined ? `${fmt(f.floorTokPerS, 0)} (${pct(f.ofFloor)})` : "-",
      f.floorRatio !== undefined ? ratio(f.floorRatio) : "-",
      x.decodeTokPerS !== undefined ? `${fmt(x.decodeTokPerS, 0)} (${spread(x.decodeMsPerStep)})${(x.decodePrefixes ?? 0) < x.batch ? " ‡" : ""}` : "-",
      f.decodeRatio !== undefined ? ratio(f.decodeRatio) : "-",
      f.bound !== undefined ? ratio(f.bound) : "-",
      f.perToken !== undefined ? `${fmt(x.weightBytes / x.batch / 2 ** 20, 1)} + ${fmt(x.attentionBytes / 2 ** 20, 1)}` : "-",
      pct(f.ofRoofline),
      f.runStepRatio !== undefined ? ratio(f.runStepRatio) : "-",
      f.prefillShare !== undefined ? pct(f.prefillShare) : "-",
      f.breakEvenGen !== undefined ? fmt(f.breakEvenGen, 0) : "-",
    ]);
  }
  const e2e = n === null ? "throughput, tokens/s (prefill included; spread)" : `tokens/s over the first ${n} generated tokens (prefill included; NOT throughput; spread)`;
  return table(["shape", "model", "K/V", "prompt+gen", "prefill (prompt tokens in shared steps)", "largest batch (vs standard)", e2e, "vs standard", "end-to-end floor, tokens/s (the run's share of it)", "floor vs standard", "decode tokens/s (spread)", "decode vs standard", "bound on decode vs standard", "W/B + A per token, MiB", "decode of its roofline", "the run's decode steps vs the same batch alone", "prefill share of wall time", "prefill = decode below (tokens generated)"], rows);
}

/** Experiment 1's sections: the default set's table, the full protocol's, the bound and its inputs, and the losses. */
function throughputSections(sets, L) {
  const entries = throughputEntries(sets);
  if (!entries.length) return;
  const withRows = sets.filter((s) => s.r.throughput);
  L.push("## 1. The paper's throughput experiment", "");
  L.push(
    "For each length pair, the largest batch the model's K/V pool holds: the engine's own accounting (pool pages / pages per sequence), verified by the pool (that many sequences reserve their full length at once and one more has to wait). Then FULL generations at that batch: every request prefills its prompt and generates every one of its tokens, all requests started at once as a server would take them. A model with a cyclic layer group (LCKV, sandwich) prefills in `sequential` mode, exact: with the other requests in flight its prompts go as batched token steps, each prompt's next token a row of the shared step, which is also what the engine's default mode does from 16 other requests on (below that the default runs the fixed point, which random weights never let converge). A model without one takes the default: chunks of its prompts mixed into the decode steps. The prefill column says the mode and the share of prompt tokens that went as rows of shared steps; rows measured before it existed ran the iterative prefill (9 passes over the cyclic group per chunk, one prompt at a time). **Throughput** is generated tokens over the wall time, prefill included. The decode columns time the generation phase alone at the same batch: decode steps of that many sequences at the middle of the generation (prompt + gen / 2 tokens of context), each with a prompt of its own (no page shared), generating and then rewound for the next run; each run's first step, which re-runs the last token after the rewind, is left out. \"The run's decode steps vs the same batch alone\" compares the full generation's steps with that column: the wall time after the last request's first token, over the tokens that request still generates, against the decode column's step; above 1x the run's steps were slower than the same batch decoding alone (docs/profiling.md, \"A full generation's decode steps\"). ‡: measured before that, with forks of up to 4 distinct prefixes, which share their pages: the attention found some of their K/V in L2, so such a row's decode figure, its ratio to the standard row and its share of the roofline read high (up to above the bound), and its prefill share reads high with them.",
    "",
  );
  for (const set of withRows) {
    const r = set.r;
    const pools = r.kvPoolGiB !== null && typeof r.kvPoolGiB === "object" ? Object.entries(r.kvPoolGiB).map(([s, g]) => `${gib(g)} at the ${shapeName(s)}`).join(", ") : gib(r.kvPoolGiB ?? 1);
    const n = truncatedTokens(r);
    L.push(...setHeading(set, "throughput", { extra: `, commit ${r.commit}` }));
    L.push(`K/V pool of each model: ${pools}. ` + (n === null ? `Timed: ${r.generationRuns ?? 1} full generation${(r.generationRuns ?? 1) > 1 ? "s" : ""} per row after an untimed warm-up of the same batch (32 tokens a request).` : `These results predate full generations: only the first ${n} generated tokens of each request were run and timed, so their end-to-end figure mostly weighs prefill and is not a throughput.`), "");
    L.push(throughputTable(set, entries), "");
  }
  stackedSection(entries, L);
  boundSection(entries, L);
  lossesSection(entries, L);
}

/** The compact types below bf16, which stack on a condensed cache. */
const COMPACT_TYPES = ["fp8", "int8", "int4"];

/**
 * Each condensed model's row in a compact K/V type against the standard model's row in bf16 (the
 * engine's default) at the same shape, lengths and pool: the two savings stacked, against what a
 * user runs without either.
 */
function stackedSection(entries, L) {
  const rows = [];
  for (const e of entries) {
    const x = e.row;
    if (x.model === "standard" || x.model === "default" || !x.batch || !COMPACT_TYPES.includes(x.kvDtype)) continue;
    const same = entries.filter((o) => o.row.model === "standard" && o.row.batch && o.row.kvDtype === "bf16" && shapeOf(o.row) === shapeOf(x) && o.row.prompt === x.prompt && o.row.gen === x.gen && (o.row.kvPoolGiB ?? null) === (x.kvPoolGiB ?? null));
    const s = (same.find((o) => o.set === e.set) ?? same[0])?.row;
    if (!s) continue;
    const decode = x.decodeTokPerS && s.decodeTokPerS ? ratio(x.decodeTokPerS / s.decodeTokPerS) : "-";
    rows.push([shapeName(shapeOf(x)), x.model, x.kvDtype, `${x.prompt}+${x.gen}`, `${x.batch} vs ${s.batch} (${ratio(x.batch / s.batch, 1)})`, ratio(x.tokPerS.median / s.tokPerS.median), decode]);
  }
  if (!rows.length) return;
  L.push("### Stacked: a condensed cache in a compact type against the standard model in bf16", "");
  L.push("Each condensed model's row in fp8, int8 or int4 against the standard model's bf16 row at the same shape, lengths and pool (from the same results file where it has one): both savings at once, against the engine's default cache without either.", "");
  L.push(table(["shape", "model", "K/V", "prompt+gen", "largest batch vs standard bf16", "throughput vs standard bf16", "decode vs standard bf16"], rows), "");
}

/** The bound: its formula, and its inputs per shape, K/V type and model. */
function boundSection(entries, L) {
  const rows = entries.filter((e) => e.row.weightBytes !== undefined);
  L.push("## The bound beside every row", "");
  L.push(
    "Per generated token, a decode step of B sequences reads the weights once for the whole batch and each sequence's K/V once for itself:",
    "",
    "    bytes per generated token = W / B + A",
    "    W = weight bytes a step reads (every matrix, the LM head included), bf16",
    "    A = layers that attend x context x K/V bytes per layer-token",
    "",
    "Every layer attends, and an LCKV (or CLA, or sandwich) layer that reads another layer's K/V reads as many bytes as a layer reading its own: the condensed cache shrinks what is stored — so the batch grows — but not A. At one K/V type and context, a model whose pool holds B sequences where the standard model's holds B_std therefore decodes at most",
    "",
    "    bound = (W_std / B_std + A) / (W / B + A)",
    "",
    "times faster than the standard model, once both run at the memory bandwidth. It is large when W / B_std dominates (few sequences share each read of the weights: a small pool, a long request) and near 1 when A does (the standard batch already amortizes the weights). The tables give W/B + A per row (context = prompt + gen / 2, the middle of the generation), the bound beside the measured decode ratio, and the measured decode figure against its own roofline (copy bandwidth / (W/B + A)). End to end, prefill comes on top: the column \"prefill share\" is the wall time that the decode steps do not account for (wall - gen x decode step) over the wall time, and \"prefill = decode below\" the generation length at which that prefill would take as long as the decode: with shorter generations, prefill takes over and sets the end-to-end ratio.",
    "",
    "**The end-to-end floor** (rows that record their prefill mode) is a floor under the wall time of the whole run with its prompts going as they went (the prefill column), at the copy and bf16 GEMM rates measured in the same run (not the card's data-sheet peaks): the larger of the run's bytes over the one and its flops over the other (scripts/bench/costs.js, `fullGenerationFloorMs`; over the whole run, since prompt chunks ride in decode steps). Flops: 2 per weight for every token that passes through the model. Bytes: every decode step reads W + B x A at its context, and a prompt that goes as token steps (a model with a cyclic layer group, LCKV or sandwich, beside other requests: one token of every prefilling sequence a step) also reads the weights and the K/V before it at every one of its steps. So such a model pays for its prompts in bytes, where a model whose prompts go in chunks (standard, CLA) pays in flops, and its floors' ratio to the standard model (\"floor vs standard\") falls below its decode bound wherever the prompt is long. A measured end-to-end ratio above the floors' ratio means that the standard row runs further below its floor than the condensed one (the floor column's percentages).",
    "",
  );
  if (!rows.length) return;
  const seen = new Map();
  for (const { row: x } of rows) {
    const key = `${shapeOf(x)}|${kvLabel(x)}|${x.model}`;
    if (!seen.has(key)) seen.set(key, [shapeName(shapeOf(x)), kvLabel(x), x.model, bytes(x.weightBytes), `${fmt(x.kvBytesPerElement, 2)} B`, bytes(x.attentionBytes / x.decodeContext)]);
  }
  L.push("Inputs (from each model's config and the engine's K/V bytes per token):", "");
  L.push(table(["shape", "K/V", "model", "W", "bytes per K/V element", "A per token of context (all layers)"], [...seen.values()]), "");
}

/** Whether a model of a results file reads K/V from a layer above (a cyclic group: a multi-pass prefill). */
function hasCyclicGroup(set, e) {
  const lt = set.r.models?.[e.model]?.layerTypes;
  const pattern = typeof lt === "string" ? lt : lt?.[shapeOf(e)];
  return pattern ? pattern.split("_").some((t, i) => Number(t) > i) : e.model.startsWith("lckv") || e.model === "sandwich";
}

/** Where LCKV (and the other condensed caches) win and lose against the standard model, with the reasons each row gives. */
function lossesSection(entries, L) {
  const losses = [], wins = [], even = [];
  for (const e of entries) {
    const x = e.row;
    if (x.model === "standard" || x.model === "default" || !x.batch) continue;
    const f = figures(e, entries);
    if (!f.std || !f.full) continue;
    const sf = figures(standardFor(e, entries), entries);
    const where = `**\`${x.model}\` at ${x.prompt}+${x.gen}** (${shapeName(shapeOf(x))}, ${kvLabel(x)} K/V, ${inSentence(e.set.label)}, batch ${x.batch} against ${f.std.batch})`;
    const floors = f.floorRatio !== undefined ? ` (the floors' ratio ${ratio(f.floorRatio)}; ${pct(f.ofFloor)} of its floor, the standard model ${pct(sf.ofFloor)})` : "";
    const figs = `end to end ${ratio(f.e2eRatio)}${floors}, decode ${ratio(f.decodeRatio)}${f.bound !== undefined ? ` against a bound of ${ratio(f.bound)}` : ""}`;
    const shortOfBound = f.bound !== undefined && f.decodeRatio !== undefined && f.decodeRatio < 0.7 * f.bound;
    const smallBound = f.bound !== undefined && f.bound < 1.25;
    if (!(f.e2eRatio < 1 || f.decodeRatio < 1 || shortOfBound || smallBound)) {
      (f.e2eRatio > 1.1 ? wins : even).push(`- ${where}: ${figs}; prefill is ${pct(f.prefillShare)} of its wall time (standard: ${pct(sf.prefillShare)}).`);
      continue;
    }
    const why = [];
    if (f.e2eRatio < 1 && f.decodeRatio !== undefined && f.e2eRatio < f.decodeRatio && f.prefillShare > sf.prefillShare) {
      const passes = hasCyclicGroup(e.set, x) && x.prefill === undefined ? `each of its ${x.batch} requests runs the iterative prefill (several passes over its cyclic layer group), and ` : "";
      const breakEven = f.breakEvenGen > 0 ? `; generating fewer than ${fmt(f.breakEvenGen, 0)} tokens per request, its prefill would outlast its decode` : "";
      why.push(`prefill is ${pct(f.prefillShare)} of its wall time against ${pct(sf.prefillShare)} for the standard model: ${passes}its ${ratio(f.batchRatio, 1)} larger batch means ${ratio(f.batchRatio, 1)} the prompts to prefill before the batch decodes${breakEven}`);
    }
    if (f.decodeRatio < 1 || shortOfBound) {
      const roof = f.ofRoofline !== undefined && Number.isFinite(f.ofRoofline) ? `its decode reaches ${pct(f.ofRoofline)} of its roofline at batch ${x.batch}, the standard model's ${pct(sf.ofRoofline)} at ${f.std.batch}: ` : "";
      why.push(`${roof}the larger batch costs more per token than the bytes say`);
    }
    if (smallBound) why.push(`the bound itself is small: A = ${bytes(x.attentionBytes)} per token dominates W / B_std = ${bytes(f.std.weightBytes / f.std.batch)}: the standard batch of ${f.std.batch} already shares each read of the weights, and a larger batch does not shrink A`);
    losses.push(`- ${where}: ${figs}. ${why.length ? `Why: ${why.join("; ")}.` : ""}`.trimEnd());
  }
  L.push("## Where LCKV loses, where it wins, and why", "");
  L.push("From the rows of full generations above, each against the standard model's row at the same shape, K/V type, lengths and pool (rows from truncated generations are not judged). \"LCKV\" here is every condensed cache (LCKV, CLA, sandwich): they share the mechanism — a smaller cache, so a larger batch, with every layer still reading K/V — and so share the losses. A row is listed as a loss when it is slower end to end or in decode than the standard model, when its decode falls short of 70% of its bound, or when the bound itself is under 1.25x.", "");
  L.push("Losses:", "", ...(losses.length ? losses : ["- none among these rows."]), "");
  L.push("Wins (more than 1.1x end to end, none of the above):", "", ...(wins.length ? wins : ["- none among these rows."]), "");
  if (even.length) L.push("About even (1x to 1.1x end to end, none of the above):", "", ...even, "");
}

/** Headline lines from experiment 1: per model and results file, the ranges of its ratios. */
function throughputHeadlines(sets) {
  const entries = throughputEntries(sets);
  const lines = [];
  for (const set of sets.filter((s) => s.r.throughput)) {
    for (const m of ["lckv-w2", "lckv-w10", "cla", "sandwich"]) {
      const fs = entries.filter((e) => e.set === set && e.row.model === m && e.row.batch).map((e) => figures(e, entries)).filter((f) => f.std);
      if (!fs.length) continue;
      const range = (k, d = 2) => {
        const v = fs.map((f) => f[k]).filter((y) => y !== undefined && Number.isFinite(y));
        if (!v.length) return "-";
        const [lo, hi] = [fmt(Math.min(...v), d), fmt(Math.max(...v), d)];
        return lo === hi ? `${lo}x` : `${lo}x to ${hi}x`;
      };
      const n = truncatedTokens(set.r);
      const e2e = n === null ? `throughput (full generations, prefill included) ${range("e2eRatio")}` : `tokens/s over the first ${n} generated tokens ${range("e2eRatio")} (not throughput: truncated generations)`;
      const floors = fs.some((f) => f.floorRatio !== undefined) ? ` (${range("floorRatio")} at the end-to-end floors)` : "";
      lines.push(`- \`${m}\` (${inSentence(set.label)}): ${range("batchRatio", 1)} larger batches than the standard cache in the same memory; ${e2e} the standard model's${floors}; decode ${range("decodeRatio")}${fs.some((f) => f.bound !== undefined) ? `, against a bound of ${range("bound")}` : ""}.`);
    }
  }
  return lines;
}

module.exports = { throughputSections, throughputHeadlines, throughputEntries, figures };
