/**
 * The report's peers: transformers and the PyTorch reference (experiment 4), node-llama-cpp
 * (experiment 6), each row beside lckv's figure at the same point, measured in the same run.
 */
const { fmt, spread, ratio, table, shapeName, shapeOf, setHeading } = require("./report-format");

function hfPeersSection(sets, L) {
  const withRows = sets.filter((s) => s.r.peers?.length);
  if (!withRows.length) return;
  L.push("## 4. transformers and the PyTorch reference, same card, same run", "");
  for (const set of withRows) {
    const r = set.r;
    L.push(...setHeading(set, "peers"));
    const rows = r.peers.map((p) => {
      if (p.error) return [p.peer, p.batch ?? "-", p.context ?? "-", "-", "-", "-", "-", `failed: ${p.error}`];
      const o = p.ours;
      return [p.peer, p.batch, p.context, fmt(p.msPerStep, 2), fmt(p.tokPerS, 0), o ? fmt(o.median, 2) : "-", o ? `${fmt(p.msPerStep / o.median, 1)}x` : "-", `${spread({ spread: p.spread, flagged: p.spread > 0.05 })} / ${spread(o)}`];
    });
    L.push(table(["peer", "batch", "context", "peer ms / step", "peer tokens/s", "lckv ms / step", "lckv is faster by", "spread (peer / lckv)"], rows), "");
  }
  L.push("Each peer row and its lckv figure were measured one after the other in the same invocation, at the 1.1B shape: lckv's standard model for the transformers rows, lckv's LCKV w=2 model for the PyTorch reference (batch 1, 128 tokens). transformers runs its eager attention with bf16 weights and K/V; with the static cache, generate() compiles the forward with torch.compile by itself (the row says so), and the compile happens in the untimed warm-up. lckv's figure forks one prefix of the row's context into the batch, so at batch 64 its sequences share that prefix's K/V pages (the attention may find them in L2), while transformers' 64 sequences each hold a copy; it times 16 steps a run against the peer's 32.", "");
}

const llamaFigure = (x) => (x.error ? `failed: ${x.error}` : x.msPerStep ? `${fmt(x.msPerStep.median, 2)} ms, ${fmt(x.tokPerS, 0)} tok/s (${spread(x.msPerStep)})` : `${fmt(x.ms.median, 1)} ms, ${fmt(x.tokPerS, 0)} tok/s (${spread(x.ms)})`);
const median = (x) => (x.msPerStep ?? x.ms)?.median;

function llamaPeerSection(sets, L) {
  const withRows = sets.filter((s) => s.r.llamaPeer?.length);
  if (!withRows.length) return;
  L.push("## 6. node-llama-cpp (llama.cpp), same card, same run", "");
  L.push(
    "The peer a TypeScript user would pick, through its own API: `getLlama()` with its CUDA build (compiled from the llama.cpp source it ships, for sm_90), `loadModel()` with every layer on the GPU, `createContext({ sequences, flashAttention: true })`, and each sequence's `evaluate()` generator at temperature 0, end-of-sequence ignored — node-llama-cpp batches the sequences that evaluate at once into one llama.cpp decode. Its model is the same shape written as a GGUF of random weights (scripts/bench/make-gguf.js): F16 matrices, and Q8_0 and Q4_0 (what its users run: every matrix quantized, the LM head and the embedding included). A decode row times `steps` tokens of every sequence at once after its prompt was evaluated, median of several windows after a warm-up; the prefill row times one 2048-token prompt in one sequence (batch size 2048). lckv's figures are its standard model (bf16 weights) at the same points and each K/V type of the run, forks of one distinct prefix per sequence where its pool holds them (the row says how many); it has no quantized weights, so the Q8_0 and Q4_0 rows have no lckv figure of their own: compare them with the F16 batch-1 row. These rows time what a node-llama-cpp user gets through its API, not llama.cpp's kernels alone: on an H100 (2026-12-05, outside this run) llama.cpp's own batched benchmark decoded 64 sequences of 2048 tokens at 10,175 tok/s with f16 K/V, about ten times what the batch-64 row below measures through the API, and batch 1 at 1.44 ms a step, against about 2.1 ms below. docs/profiling.md (\"node-llama-cpp's host cost per sequence\") measures where the difference goes: about 0.6 ms per sequence per step on the host, in its API.",
    "",
  );
  for (const set of withRows) {
    const r = set.r;
    for (const shape of r.llamaPeer) {
      L.push(...setHeading(set, "llamaPeer", { prefix: `${shapeName(shapeOf(shape))}, ` }));
      if (shape.error) {
        L.push(`Not measured: ${shape.error}.`, "");
        continue;
      }
      const i = shape.info;
      L.push(`node-llama-cpp ${i.nodeLlamaCpp}, llama.cpp ${i.llamaCpp?.commit ? `${i.llamaCpp.commit.slice(0, 9)} (${i.llamaCpp.title ?? ""})` : JSON.stringify(i.llamaCpp)}, ${i.gpu || "CPU"} build (${i.buildType}), ${i.gpuNames?.join(", ") || "no GPU"}.`, "");
      const rows = shape.rows.map((p) => {
        const ours = p.oursError ? `not measured: ${p.oursError}` : p.ours.map((o) => `${o.kvDtype ?? "default"} K/V: ${fmt(median(o), 2)} ms, ${fmt(o.tokPerS, 0)} tok/s${o.distinctPrefixes !== undefined && o.distinctPrefixes < p.batch ? ` (${o.distinctPrefixes} distinct prefixes)` : ""}`).join("; ");
        const vs = p.ours.length && !p.llama.error ? p.ours.map((o) => ratio(median(p.llama) / median(o))).join(", ") : "-";
        return [p.kind, p.weights, p.llamaKv, p.batch, p.context, llamaFigure(p.llama), ours || "-", vs];
      });
      L.push(table(["row", "llama.cpp weights", "llama.cpp K/V", "batch", "context", "llama.cpp", "lckv (standard, bf16 weights)", "llama.cpp time / lckv time"], rows), "");
    }
  }
}

module.exports = { hfPeersSection, llamaPeerSection };
