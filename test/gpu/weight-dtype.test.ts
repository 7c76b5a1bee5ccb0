/**
 * The CUDA backend keeps every weight in its weight dtype (bf16 by default), so a checkpoint value
 * that is finite but past what that dtype holds is refused at load, naming the tensor, as on the
 * CPU (test/cpu/weight-dtype.test.ts); before, it loaded as infinity and the logits came out NaN.
 * Runs with `npm run test:gpu` on a machine with an NVIDIA GPU; elsewhere it says it skipped.
 */
import { loadModel, ModelLoadError } from "../../lib";
import type { DType } from "../../lib";
import { writeTinyModelWithValue } from "../helpers/tiny-model";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU weight dtype tests");

describeGpu("cuda: a weight past what the weight dtype holds", () => {
  test.each([
    [1e5, "f16", /up_proj\.weight.*rounds past the largest f16 number \(65504\) to infinity.*dtype "f32" or "bf16"/],
    [3.4e38, "auto", /up_proj\.weight.*rounds past the largest bf16 number.*dtype "f32"$/],
  ] as const)("%p with dtype %p is refused at load", async (value, dtype, message) => {
    const e = await loadModel(writeTinyModelWithValue(value), { device: "cuda", dtype }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ModelLoadError);
    expect((e as Error).message).toMatch(message);
  });

  test.each([
    [65504, "f16"],
    [1e5, "auto"],
  ] as [number, DType][])("%p with dtype %p loads and gives finite logits", async (value, dtype) => {
    const model = await loadModel(writeTinyModelWithValue(value), { device: "cuda", dtype, kvCacheMemory: 1 << 22 });
    try {
      const logits = await model.logits([1, 2, 3]);
      expect(logits.every(Number.isFinite)).toBe(true);
    } finally {
      await model.dispose();
    }
  });
});
