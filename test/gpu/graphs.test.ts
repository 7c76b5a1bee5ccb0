/**
 * Decode steps recorded as CUDA graphs and replayed give exactly what the same steps give run
 * op by op (loadModel's cudaGraphs: false): across batch sizes that change as requests finish, across the
 * 256-position context buckets and page-table strides that start new recordings, for greedy and
 * seeded sampling, on an LCKV model whose middle layers read K/V from above.
 * Runs with `npm run test:gpu` on a machine with an NVIDIA GPU; elsewhere it says it skipped.
 */
import { loadModel, Model } from "../../lib";
import { writeTinyModel } from "../helpers/tiny-model";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU graph tests");

/** Prompts of different lengths and generations that end at different steps. */
const requests = [
  { prompt: 5, maxNewTokens: 300 },
  { prompt: 40, maxNewTokens: 120 },
  { prompt: 250, maxNewTokens: 200 },
];

async function runAll(model: Model, sampling: { temperature: number; seed?: number; topP?: number }): Promise<number[][]> {
  const V = model.config.vocabSize;
  return Promise.all(
    requests.map(async (r, i) => {
      const prompt = Array.from({ length: r.prompt }, (_, k) => (k * 31 + i * 7 + 3) % V);
      return (await model.generate(prompt, { maxNewTokens: r.maxNewTokens, ignoreEos: true, ...sampling, seed: sampling.seed })).tokens;
    }),
  );
}

describeGpu("cuda: decode-step graphs", () => {
  let graphs: Model, eager: Model;

  beforeAll(async () => {
    const dir = writeTinyModel({ layerTypes: "0_3_3_3_4", numLayers: 5, hidden: 64, heads: 4, kvHeads: 2, vocab: 256, maxPositions: 1024, seed: 5 });
    graphs = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0 });
    eager = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0, cudaGraphs: false });
  });
  afterAll(async () => {
    await graphs?.dispose();
    await eager?.dispose();
  });

  test("greedy tokens are the same replayed and op by op, and the steps were replayed", async () => {
    const a = await runAll(graphs, { temperature: 0 });
    const b = await runAll(eager, { temperature: 0 });
    expect(a.map((t) => t.length)).toEqual(requests.map((r) => r.maxNewTokens));
    expect(a).toEqual(b);
    const g = graphs.nativeModel().memoryInfo();
    const e = eager.nativeModel().memoryInfo();
    // Several recordings (batch sizes 3, 2, 1; context buckets), most steps replayed.
    expect(g.stepGraphs).toBeGreaterThanOrEqual(3);
    expect(g.stepGraphRecordings).toBeGreaterThanOrEqual(g.stepGraphs);
    expect(g.stepGraphReplays).toBeGreaterThan(200);
    expect(e.stepGraphs).toBe(0);
    expect(e.stepGraphReplays).toBe(0);
  });

  test("a fresh model whose first work is batched token steps records them, and they give what op by op gives", async () => {
    // Three prompts at once in sequential mode: from the model's first step on, one token of each
    // a step (39 steps of 3 rows). The second step is recorded (its key's second sighting), and
    // a recording cannot upload the RoPE frequencies: a failed one would leave the steps of its
    // key op by op for good.
    const dir = writeTinyModel({ layerTypes: "0_3_3_3_4", numLayers: 5, hidden: 64, heads: 4, kvHeads: 2, vocab: 256, maxPositions: 1024, seed: 5 });
    const run = async (cudaGraphs: boolean) => {
      const m = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0, cudaGraphs });
      try {
        const seqs = [0, 1, 2].map(() => m.createSequence());
        await Promise.all(seqs.map((s, i) => s.append(Array.from({ length: 40 }, (_, k) => (k * 31 + i * 7 + 3) % 256), { prefill: "sequential" })));
        const steps = m.schedulerStats();
        const info = m.nativeModel().memoryInfo();
        const tokens = await Promise.all(
          seqs.map(async (s) => {
            const out: (number | null)[] = [];
            for await (const c of s.generate({ maxNewTokens: 8, temperature: 0, ignoreEos: true })) out.push(c.token);
            return out;
          }),
        );
        return { steps, info, tokens };
      } finally {
        await m.dispose();
      }
    };
    const recorded = await run(true);
    expect(recorded.steps.promptTokens).toBe(3 * 39);
    expect(recorded.info.stepGraphReplays).toBeGreaterThanOrEqual(30);
    const opByOp = await run(false);
    expect(opByOp.info.stepGraphReplays).toBe(0);
    expect(recorded.tokens).toEqual(opByOp.tokens);
  });

  test("a step's key is recorded at its second sighting, not its first", async () => {
    // A standard model (no cyclic group), so a prompt is one chunk, not token steps with keys of
    // their own. A prompt's last token is evaluated by the generation's first decode step (a
    // sequence is lazy by one token), so a generation of 1 token is one decode step (batch 1,
    // context bucket 0), and one of 6 tokens is 6.
    const dir = writeTinyModel({ numLayers: 5, hidden: 64, heads: 4, kvHeads: 2, vocab: 256, maxPositions: 1024, seed: 5 });
    const m = await loadModel(dir, { device: "cuda", dtype: "f32", prefixCache: 0 });
    try {
      const prompt = Array.from({ length: 8 }, (_, k) => (k * 31 + 3) % 256);
      const once = await m.generate(prompt, { maxNewTokens: 1, temperature: 0, ignoreEos: true });
      expect(once.tokens).toHaveLength(1);
      const afterOnce = m.nativeModel().memoryInfo();
      expect(afterOnce.stepGraphRecordings).toBe(0);  // seen once: run op by op, not recorded
      expect(afterOnce.stepGraphReplays).toBe(0);
      const again = await m.generate(prompt, { maxNewTokens: 6, temperature: 0, ignoreEos: true });
      expect(again.tokens.slice(0, 1)).toEqual(once.tokens);
      const afterAgain = m.nativeModel().memoryInfo();
      expect(afterAgain.stepGraphRecordings).toBe(1);  // the same key's second sighting
      expect(afterAgain.stepGraphs).toBe(1);
      expect(afterAgain.stepGraphReplays).toBeGreaterThanOrEqual(4);  // the 5 steps after it, replayed or run ahead
    } finally {
      await m.dispose();
    }
  });

  test("seeded sampling is the same replayed and op by op", async () => {
    const s = { temperature: 0.9, topP: 0.95, seed: 1234 };
    expect(await runAll(graphs, s)).toEqual(await runAll(eager, s));
  });
});
