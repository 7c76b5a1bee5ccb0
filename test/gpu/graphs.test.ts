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
    expect(g.stepGraphReplays).toBeGreaterThan(200);
    expect(e.stepGraphs).toBe(0);
    expect(e.stepGraphReplays).toBe(0);
  });

  test("seeded sampling is the same replayed and op by op", async () => {
    const s = { temperature: 0.9, topP: 0.95, seed: 1234 };
    expect(await runAll(graphs, s)).toEqual(await runAll(eager, s));
  });
});
