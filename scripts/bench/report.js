/**
 * Turns the bench results (docs/bench/results.json) into docs/benchmarks.md and two SVG charts:
 * throughput against batch size, and K/V memory against context. Written by scripts/bench/run.js;
 * `node scripts/bench/report.js [results.json]` re-renders without measuring again.
 */
const fs = require("node:fs");
const path = require("node:path");

const fmt = (x, d = 1) => (x === undefined || x === null || Number.isNaN(x) ? "-" : Number(x).toFixed(d));
const pct = (x) => (x === undefined || Number.isNaN(x) ? "-" : `${(100 * x).toFixed(0)}%`);
const spread = (s) => (s ? `${pct(s.spread)}${s.flagged ? " ⚠" : ""}` : "-");
const table = (head, rows) => [`| ${head.join(" | ")} |`, `| ${head.map(() => "---").join(" | ")} |`, ...rows.map((r) => `| ${r.join(" | ")} |`)].join("\n");

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

// A small line chart with log-scaled axes where asked; enough for two figures, no dependency.
function lineChart({ title, xLabel, yLabel, series, logX = false, logY = false }) {
  const W = 640, H = 400, m = { l: 70, r: 170, t: 40, b: 50 };
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}"><text x="20" y="30">${title}: no data</text></svg>\n`;
  const tx = (v) => (logX ? Math.log10(v) : v), ty = (v) => (logY ? Math.log10(v) : v);
  const xs = pts.map((p) => tx(p[0])), ys = pts.map((p) => ty(p[1]));
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), logY ? Math.min(...ys) : 0, Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const X = (v) => m.l + ((tx(v) - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (v) => H - m.b - ((ty(v) - y0) / (y1 - y0)) * (H - m.t - m.b);
  const ticks = (a, b, log) => {
    if (log) {
      const out = [];
      for (let e = Math.floor(a); e <= Math.ceil(b); e++) out.push(10 ** e);
      return out.filter((v) => Math.log10(v) >= a - 1e-9 && Math.log10(v) <= b + 1e-9);
    }
    const step = 10 ** Math.floor(Math.log10((b - a) / 4 || 1));
    const out = [];
    for (let v = Math.ceil(a / step) * step; v <= b + 1e-9; v += step * Math.ceil((b - a) / step / 5)) out.push(v);
    return out;
  };
  const label = (v) => (v >= 1e9 ? `${v / 1e9}G` : v >= 1e6 ? `${v / 1e6}M` : v >= 1e3 ? `${v / 1e3}k` : `${+v.toPrecision(3)}`);
  let s = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">\n`;
  s += `<rect width="${W}" height="${H}" fill="white"/>\n<text x="${m.l}" y="22" font-size="15">${title}</text>\n`;
  s += `<line x1="${m.l}" y1="${H - m.b}" x2="${W - m.r}" y2="${H - m.b}" stroke="black"/><line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${H - m.b}" stroke="black"/>\n`;
  for (const v of ticks(x0, x1, logX)) s += `<text x="${X(logX ? v : v).toFixed(1)}" y="${H - m.b + 16}" text-anchor="middle">${label(v)}</text>\n`;
  for (const v of ticks(y0, y1, logY)) s += `<text x="${m.l - 6}" y="${Y(v).toFixed(1)}" text-anchor="end" dominant-baseline="middle">${label(v)}</text><line x1="${m.l}" x2="${W - m.r}" y1="${Y(v).toFixed(1)}" y2="${Y(v).toFixed(1)}" stroke="#ddd"/>\n`;
  s += `<text x="${(m.l + W - m.r) / 2}" y="${H - 12}" text-anchor="middle">${xLabel}</text>\n`;
  s += `<text transform="translate(16 ${(m.t + H - m.b) / 2}) rotate(-90)" text-anchor="middle">${yLabel}</text>\n`;
  series.forEach((ser, i) => {
    const c = COLORS[i % COLORS.length];
    const p = [...ser.points].sort((a, b) => a[0] - b[0]);
    s += `<polyline fill="none" stroke="${c}" stroke-width="2" points="${p.map((q) => `${X(q[0]).toFixed(1)},${Y(q[1]).toFixed(1)}`).join(" ")}"/>\n`;
    for (const q of p) s += `<circle cx="${X(q[0]).toFixed(1)}" cy="${Y(q[1]).toFixed(1)}" r="3" fill="${c}"/>\n`;
    s += `<rect x="${W - m.r + 12}" y="${m.t + i * 18}" width="12" height="3" fill="${c}"/><text x="${W - m.r + 30}" y="${m.t + i * 18 + 5}">${ser.name}</text>\n`;
  });
  return s + "</svg>\n";
}

// The K/V pool of the default set (results before kvPoolGiB was recorded used 1 GiB).
function poolSize(r) {
  const gib = r.kvPoolGiB ?? 1;
  return gib >= 1 ? `${fmt(gib, gib % 1 ? 1 : 0)} GiB` : `${fmt(gib * 1024, 0)} MiB`;
}

// "Measured at commit X" under a section whose figures come from another commit than the
// latest run's (an earlier invocation kept by --only, or a run cut short).
function measuredAt(r, key) {
  const at = r.measuredAt?.[key];
  return at && at !== r.commit ? [`Measured at commit ${at} (the figures of the other sections: ${r.commit}).`, ""] : [];
}

// The figures a reader wants first, computed from the tables below, and what limits them.
function headlines(r, L) {
  const lines = [];
  const tp = (r.throughput ?? []).filter((x) => x.batch && x.model !== "default");
  const std = (x) => tp.find((y) => y.model === "standard" && y.prompt === x.prompt && y.gen === x.gen);
  for (const m of ["lckv-w2", "lckv-w10", "cla", "sandwich"]) {
    const rows = tp.filter((x) => x.model === m && std(x));
    if (!rows.length) continue;
    const b = rows.map((x) => x.batch / std(x).batch), t = rows.map((x) => x.tokPerS.median / std(x).tokPerS.median);
    const d = rows.filter((x) => x.decodeTokPerS && std(x).decodeTokPerS).map((x) => x.decodeTokPerS / std(x).decodeTokPerS);
    const decode = d.length ? `; decode throughput at those batches ${fmt(Math.min(...d), 2)}x to ${fmt(Math.max(...d), 2)}x` : "";
    lines.push(`- \`${m}\`: ${fmt(Math.min(...b), 1)}x to ${fmt(Math.max(...b), 1)}x larger batches than the standard cache in the same memory; end-to-end throughput ${fmt(Math.min(...t), 2)}x to ${fmt(Math.max(...t), 2)}x the standard model's${decode} (experiment 1).`);
  }
  const d1 = (r.decode ?? []).filter((x) => x.batch === 1);
  if (d1.length) {
    const f = d1.map((x) => x.ofRoofline);
    lines.push(`- Batch-1 decode: ${pct(Math.min(...f))} to ${pct(Math.max(...f))} of the memory-bandwidth roofline (experiment 2).`);
  }
  for (const p of (r.peers ?? []).filter((x) => x.ours && !x.error)) {
    const at = r.measuredAt?.peers && r.measuredAt.peers !== r.commit ? ` (commit ${r.measuredAt.peers})` : "";
    lines.push(`- ${p.peer}, batch ${p.batch}, ${p.context} tokens: lckv is ${fmt(p.msPerStep / p.ours.median, 1)}x faster per step${at}.`);
  }
  if (!lines.length) return;
  const pre = (m, mode) => (r.prefill ?? []).find((x) => x.model === m && x.mode === mode && x.tokens === 2048);
  const ratio = pre("lckv-w2", "iterative") && pre("standard", "fixed-point") ? pre("lckv-w2", "iterative").ms.median / pre("standard", "fixed-point").ms.median : NaN;
  L.push("## Headlines", "", ...lines, "");
  L.push(
    "What limits them, from these tables and the per-op profile (`LCKV_PROFILE=1`, docs/profiling.md):",
    "",
    `- **Prefill, and LCKV's passes over it.** An LCKV prompt needs several passes over the cyclic layer group (the iterative scheme's 9 here; the fixed point does not converge on random weights, which need not contract: it stops at its pass limit and runs the rest token by token), so its prefill of 2048 tokens costs ${fmt(ratio, 1)}x the standard model's (experiment 3). The prefill attention runs on the tensor cores (mma.sync with tf32 operands, each split in two and three products summed, for f32 accuracy) and the matrix products in cuBLASLt; the standard model's 2048-token prefill reaches ${pre("standard", "fixed-point") ? fmt(pre("standard", "fixed-point").tflops, 0) : "?"} TFLOP/s, ${pre("standard", "fixed-point") ? pct(pre("standard", "fixed-point").ofGemmRate) : "?"} of the card's bf16 GEMM rate. In the default set only ${r.measuredTokens ?? "all"} generated tokens of each request are timed, so with 512- and 2048-token prompts its end-to-end column mostly weighs prefill, where LCKV's passes cost it; with a 5-token prompt, and in its decode columns (the generation phase alone), it weighs decode, where the larger batches pay. The paper's 7.7x (30B, A100) comes from a regime where the standard model's batch is memory-starved and generation dominates; at 1.1B with a ${r.kvPoolGiB === null ? "whole-GPU" : poolSize(r)} cache the standard model still batches ${(r.throughput ?? []).find((x) => x.model === "standard" && x.batch)?.batch ?? "several"} sequences at 512+1024.`,
    decodeLimits(r),
    "- K/V are cached in f32 (transformers keeps bf16), which doubles the K/V bytes per token; every ratio between our models is unaffected.",
    "",
  );
}

// What stands between decode and the roofline, from experiments 2 and 5 and a kernel timeline
// (scripts/bench/kernel-trace.cpp; its figures are quoted with their card and date).
function decodeLimits(r) {
  const d = (r.decode ?? []).find((x) => x.model === "standard" && x.batch === 1 && !x.context);
  const d128 = (r.decode ?? []).find((x) => x.model === "standard" && x.batch === 1 && x.context === 128);
  const d8 = (r.decode ?? []).find((x) => x.model === "standard" && x.batch === 8);
  const a1 = (r.attention ?? []).find((x) => x.sequences === 1);
  const a128 = (r.attention ?? []).find((x) => x.sequences === 128);
  return (
    `- **Decode: recorded, fused, run ahead of the host, still short of the roofline.** A decode step is one CUDA graph of about 9 kernels per layer (Q/K/V in one GEMV launch, gate and up with SwiGLU in another, RoPE fused into the K/V write), each launched so that it may start while the one before it finishes (programmatic dependent launch, sm_90). A batch of one takes a GEMV whose warps stream each weight row in 512-byte loads, the first of them issued before the preceding kernel has finished; batches of 2 to 16 take a tensor-core GEMV. Each step queues the next one on the GPU, fed on the device with the tokens it chose, before JavaScript sees them (\`runAhead\`), so the GPU does not wait for the host between steps. ` +
    (d ? `At batch 1 and 2048 tokens a step takes ${fmt(d.msPerStep.median, 2)} ms against a roofline of ${fmt(d.roofMs, 2)} ms (${pct(d.ofRoofline)})` : "") +
    (d128 ? `, at 128 tokens ${fmt(d128.msPerStep.median, 2)} ms against ${fmt(d128.roofMs, 2)} ms (${pct(d128.ofRoofline)})` : "") +
    (d8 ? `; batch 8 costs ${fmt(d8.msPerStep.median / (d?.msPerStep.median ?? NaN), 2)}x batch 1 for 8x the tokens` : "") +
    `. What the last changes bought, each measured side by side in one call on an H100 (2026-11-27, \`scripts/bench/profile-step.js\`, batch 1, 128 tokens): run-ahead 1.69 to 1.46 ms per step, the one-row GEMV 1.46 to 1.32 ms, its first loads before the wait 1.33 to 1.30 ms; attention and RoPE loading the step's positions, page tables and earlier keys before that wait 1.39 to 1.37 ms at 2048 tokens and 2.05-2.07 to 1.97-1.98 ms at batch 16 and 128 tokens; the token choice keeping 16 loads per thread in flight and the final norm reading the residual in place 1.32 to 1.25-1.28 ms (docs/profiling.md). Where the rest goes: the GEMVs alone, launched back to back over 22 layers' weights (\`scripts/bench/gemv-rate.cu\`, same day), take 10.9 µs per launch, 0.96 ms for a step's 1.94 GB (67% of the copy rate); the 8-10 MB matrices of Q/K/V and the output projection are the least efficient, a few microseconds of ramp and tail against 3 µs of bytes. A CUPTI timeline of 10 replayed steps at batch 1 and 128 tokens (same day, \`LCKV_PDL=0\` so that each kernel's time is its own, \`scripts/bench/kernel-trace.cpp\`) puts 0.93 ms of a step in the GEMVs (the LM head's included) and 0.35 ms in the other kernels: attention 0.13 ms and its split-K merge 0.05 ms, the norms 0.09 ms, RoPE with the K/V write 0.06 ms, the token choice 0.01 ms. With programmatic launch on, the GPU is busy 99% of a step's span: 10-18 µs between two steps (the chosen tokens to the host, the next inputs to the device; a replayed graph's own start costs about 3 µs, \`scripts/bench/graph-launch.cu\`). ` +
    (a1 ? `The attention of a single sequence cannot fill the GPU (experiment 5: ${pct(a1.ofCopy)} of the copy bandwidth at 1 sequence${a128 ? `, ${pct(a128.ofCopy)} at 128` : ""}). ` : "") +
    `For scale, a published measurement on the same card and a model of the same size (Llama-3.2-1B, batch 1; Hazy Research, \"Look Ma, No Bubbles\", 2025-05-27): vLLM and SGLang used at most 50% of the H100's memory bandwidth, and a forward pass fused into one persistent kernel 78%; with a kernel per op, each boundary's drain and ramp is paid about 180 times a step. Block shapes of the GEMV, two or four warps per weight row, L2 prefetches of the weights (of a GEMV's own tile, or of the next GEMVs' during attention), folding the norms into the GEMVs (46 fewer kernels), merging attention's splits inside a thread block cluster or in the last block of each group, RoPE inside the attention kernel, and smaller or register-capped blocks for the one-row GEMV did not close the gap (docs/profiling.md, "Tried, measured, not kept"). ` +
    `Next: a persistent kernel per layer or per step, and a bf16 K/V cache.`
  );
}

function renderReport(r, outDir) {
  const benchDir = path.join(outDir, "bench");
  fs.mkdirSync(benchDir, { recursive: true });
  const L = [];
  L.push("# Benchmarks", "");
  L.push(`Generated by scripts/bench/run.js (\`npm run bench\`). Raw figures: [bench/results.json](bench/results.json). Invocations:`, "");
  for (const c of r.commands ?? [`${r.command} (${r.date})`]) L.push(`- \`${c.replace(/ \(/, "` (")}`);
  L.push("");
  L.push(`- Card: **${r.rates.card}** (${fmt(r.rates.memoryGB, 0)} GB), driver ${r.rates.driver}.`);
  L.push(`- Measured in the same run: device-to-device copy **${fmt(r.rates.copyGBps, 0)} GB/s** (the memory roofline's rate) and a bf16 8192³ GEMM at **${fmt(r.rates.bf16Tflops, 0)} TFLOP/s**.`);
  L.push(`- Each figure is the median of several runs after a warm-up; "spread" is (max - min) / median, and ⚠ marks a spread above 5%.`);
  L.push(`- Models (random bf16 weights, TinyLlama-1.1B shape: 22 layers, hidden 2048, 32 heads, 4 KV heads, intermediate 5632, vocab 32000; K/V cached in f32):`);
  for (const [n, m] of Object.entries(r.models)) L.push(`  - \`${n}\`: ${m.what}${m.layerTypes ? ` — \`${m.layerTypes}\`` : ""}`);
  const parts = Object.entries(r.experimentSeconds ?? {}).map(([k, s]) => `${k} ${fmt(s, 0)} s`).join(", ");
  L.push(`- Run time: ${fmt(r.seconds, 0)} s${parts ? ` (${parts})` : ""}${r.seconds_note ? ` (${r.seconds_note})` : ""}.${r.full ? "" : " This is the default set; `npm run bench -- --full` runs the paper's lengths in full with the whole GPU memory."}`, "");

  headlines(r, L);

  if (r.throughput) {
    L.push("## 1. The paper's throughput experiment", "", ...measuredAt(r, "throughput"));
    const pool = poolSize(r);
    L.push(r.kvPoolGiB === null || (r.full && r.kvPoolGiB === undefined) ? "The K/V pool of each model takes 80% of the free GPU memory after its weights." : `Each model's K/V pool is ${pool} (\`--kv-memory\`), so the batch sizes are those of a ${pool} cache; \`--full\` uses the whole GPU. Every request reserves the pages of its whole length (prompt + generation), so the batch is the one that fits the full generation; in the default set only the first ${r.measuredTokens} generated tokens of each request are run and timed (prefill included), which is where the prompt's share of the time is largest. Each figure is the median of the timed runs after a warm-up run of the same batch (with \`--full\`, one full-length run after a 32-token warm-up).`, "");
    L.push("The batch is the engine's own accounting (pool pages / pages per sequence), verified by the pool: that many sequences reserve their full length at once and one more has to wait.", "");
    const rows = [];
    for (const x of r.throughput) {
      if (x.skipped) {
        rows.push([x.model, `${x.prompt}+${x.gen}`, "-", "-", "-", "-", x.skipped]);
        continue;
      }
      const std = x.model === "default" ? null : r.throughput.find((y) => y.model === "standard" && y.prompt === x.prompt && y.gen === x.gen && y.batch);
      const dec = x.decodeTokPerS !== undefined;
      rows.push([
        x.model, `${x.prompt}+${x.gen}`, `${x.batch}${x.verified ? "" : " (not verified)"}`, std ? `${fmt(x.batch / std.batch, 1)}x` : "-",
        fmt(x.tokPerS.median, 0), std ? `${fmt(x.tokPerS.median / std.tokPerS.median, 2)}x` : "-", spread(x.tokPerS),
        dec ? fmt(x.decodeTokPerS, 0) : "-", dec && std?.decodeTokPerS ? `${fmt(x.decodeTokPerS / std.decodeTokPerS, 2)}x` : "-", dec ? spread(x.decodeMsPerStep) : "-",
      ]);
    }
    L.push(table(["model", "prompt+gen", "largest batch", "batch vs standard", "tokens/s (prefill included)", "throughput vs standard", "spread", "decode tokens/s at this batch", "decode vs standard", "spread"], rows), "");
    if (r.throughput.some((x) => x.decodeTokPerS !== undefined))
      L.push("The decode columns time the generation phase alone at the same batch: decode steps of that many sequences at the middle of the generation (prompt + gen / 2 tokens of context), forks of up to 4 distinct prefixes, median of the timed runs after a warm-up. Forks share their prefix's pages, so the attention may find some K/V in L2. This is where long generations spend their time, and where the larger batches pay.", "");
  }

  if (r.decode) {
    L.push("## 2. Decode against batch size", "", ...measuredAt(r, "decode"));
    L.push("Per decode step at 2048 tokens of context (and batch 1 at 128), against the memory roofline: (weight bytes + K/V bytes the step reads) / copy bandwidth. Every layer's attention reads the K/V it attends to, so an LCKV layer that reads the top layer's K/V reads as many bytes as a standard layer: the condensed cache saves memory, not these reads." + (r.rooflineNote ? ` (${r.rooflineNote[0].toUpperCase()}${r.rooflineNote.slice(1)}.)` : "") + " The batch's sequences are forks of 8 distinct 2048-token prefixes (so that a batch of hundreds needs no hundreds of prefills); forks share their prefix's pages, so at large batches the attention may find some K/V in L2, and the roofline's K/V bytes are an upper bound.", "");
    const rows = r.decode.map((x) => [x.model, x.context ?? 2048, x.batch + (x.batch === x.maxBatch ? " (max)" : ""), fmt(x.msPerStep.median, 2), fmt(x.tokPerS, 0), fmt(x.roofMs, 2), pct(x.ofRoofline), spread(x.msPerStep)]);
    L.push(table(["model", "context", "batch", "ms / step", "tokens/s", "roofline ms", "of roofline", "spread"], rows), "");
    const chart = lineChart({
      title: "Decode throughput against batch size (2048 tokens of context)",
      xLabel: "sequences in the batch",
      yLabel: "generated tokens / s",
      logX: true,
      logY: true,
      series: [...new Set(r.decode.map((x) => x.model))].map((m) => ({ name: m, points: r.decode.filter((x) => x.model === m && !x.context).map((x) => [x.batch, x.tokPerS]) })),
    });
    fs.writeFileSync(path.join(benchDir, "throughput-vs-batch.svg"), chart);
    L.push("![throughput against batch size](bench/throughput-vs-batch.svg)", "");
  }

  // Memory against context: K/V bytes per sequence, from each model's bytes per token.
  const perToken = {};
  for (const x of [...(r.throughput ?? [])]) if (x.kvBytesPerToken) perToken[x.model] = x.kvBytesPerToken;
  if (Object.keys(perToken).length) {
    const ctxs = [512, 1024, 2048, 4096, 8192];
    const chart = lineChart({
      title: "K/V cache of one sequence against context",
      xLabel: "tokens of context",
      yLabel: "bytes",
      logX: true,
      logY: true,
      series: Object.entries(perToken).map(([m, b]) => ({ name: `${m} (${(b / 1024).toFixed(0)} KiB/token)`, points: ctxs.map((c) => [c, c * b]) })),
    });
    fs.writeFileSync(path.join(benchDir, "memory-vs-context.svg"), chart);
    L.push("## K/V memory against context", "");
    L.push("Bytes per token are the engine's (`model.kvBytesPerToken`: KV layers x 2 x KV heads x head size x 4 bytes).", "");
    L.push("![K/V memory against context](bench/memory-vs-context.svg)", "");
  }

  if (r.prefill) {
    L.push("## 3. Prefill", "", ...measuredAt(r, "prefill"));
    L.push("One prompt, no logits kept. TFLOP/s counts 2 flops per weight per token plus the causal attention products, against the bf16 GEMM rate measured above. The LCKV modes: `iterative` runs the config's forward_passes + backward_passes passes over the cyclic group (approximate), `fixed-point` iterates until the K/V read from above stops moving (exact to 1e-6), `sequential` is token by token (exact).", "");
    const rows = r.prefill.map((x) => [x.model, x.mode, x.tokens, fmt(x.ms.median, 1), fmt(x.tokPerS, 0), x.passes, fmt(x.tflops, 1), pct(x.ofGemmRate), spread(x.ms)]);
    L.push(table(["model", "mode", "tokens", "ms", "tokens/s", "passes", "TFLOP/s", "of GEMM rate", "spread"], rows), "");
  }

  if (r.peers) {
    L.push("## 4. Peers, same card, same run", "", ...measuredAt(r, "peers"));
    const rows = r.peers.map((p) => {
      if (p.error) return [p.peer, p.batch ?? "-", p.context ?? "-", "-", "-", "-", "-", `failed: ${p.error}`];
      const o = p.ours;
      return [p.peer, p.batch, p.context, fmt(p.msPerStep, 2), fmt(p.tokPerS, 0), o ? fmt(o.median, 2) : "-", o ? `${fmt(p.msPerStep / o.median, 1)}x` : "-", `${spread({ spread: p.spread, flagged: p.spread > 0.05 })} / ${spread(o)}`];
    });
    L.push(table(["peer", "batch", "context", "peer ms / step", "peer tokens/s", "lckv ms / step", "lckv is faster by", "spread (peer / lckv)"], rows), "");
    L.push("Each peer row and its lckv figure were measured one after the other in the same invocation: lckv's standard model for the transformers rows, lckv's LCKV w=2 model for the PyTorch reference (batch 1, 128 tokens). transformers runs its eager attention with bf16 weights and K/V; with the static cache, generate() compiles the forward with torch.compile by itself (the row says so), and the compile happens in the untimed warm-up. lckv holds bf16 weights and f32 K/V. lckv's figure forks one prefix of the row's context into the batch, so at batch 64 its sequences share that prefix's K/V pages (the attention may find them in L2), while transformers' 64 sequences each hold a copy; it times 16 steps a run against the peer's 32.", "");
  }
  if (r.attention) {
    const a = r.attention[0] ?? {};
    L.push("## 5. Attention alone", "", ...measuredAt(r, "attention"));
    L.push(`The attention of one decode step by itself, no model around it: one query per sequence at the last of ${a.context ?? "-"} tokens of its own K/V pages (${a.numHeads ?? "-"} query heads, ${a.numKvHeads ?? "-"} K/V heads, head size ${a.headDim ?? "-"}, f32 K/V). Bytes are what a call must move: K and V of every key of every sequence, plus the queries and the output. The time per call is the mean over a loop of calls (host clock, closed by a synchronising download), and GB/s = bytes / time, set against the device-to-device copy bandwidth measured above.`, "");
    const rows = r.attention.map((x) => [x.sequences, x.context, fmt(x.bytes / 1e6, 1), fmt(x.ms.median * 1e3, 1), fmt(x.gbps, 0), pct(x.ofCopy ?? NaN), spread(x.ms)]);
    L.push(table(["sequences", "tokens each", "MB moved", "µs / call", "GB/s", "of copy bandwidth", "spread"], rows), "");
  }
  fs.writeFileSync(path.join(outDir, "benchmarks.md"), L.join("\n") + "\n");
}

module.exports = { renderReport, lineChart };

if (require.main === module) {
  const file = process.argv[2] ?? path.join(__dirname, "..", "..", "docs", "bench", "results.json");
  renderReport(JSON.parse(fs.readFileSync(file, "utf8")), path.dirname(path.dirname(file)));
}
