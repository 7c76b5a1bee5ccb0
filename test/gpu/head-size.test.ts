/**
 * A head size the CUDA kernels lack is refused when the model loads, by a typed error that names
 * config.json's head_dim (no K/V type runs it) or the kvCacheDtype option (some types do) and says
 * what is supported; before, it loaded and failed at the first attention launch.
 * Runs with `npm run test:gpu` on a machine with an NVIDIA GPU; elsewhere it says it skipped.
 */
import { ConfigError, InvalidOptionError, KV_CACHE_DTYPES, loadModel } from "../../lib";
import type { KvCacheDtype, LckvError } from "../../lib";
import { loadAddon } from "../../lib/native";
import type { NativeModelDescription } from "../../lib/native";
import { writeTinyModel } from "../helpers/tiny-model";
import { describeIfGpu } from "../helpers/device";

process.env.LCKV_QUIET = "1";
const describeGpu = describeIfGpu("GPU head size tests");
const greedy = { maxNewTokens: 6, temperature: 0, ignoreEos: true };
const prompt = [3, 14, 15, 9, 26];

async function loadError(dir: string, kvCacheDtype?: KvCacheDtype): Promise<LckvError> {
  const m = await loadModel(dir, { device: "cuda", kvCacheDtype }).catch((e: LckvError) => e);
  if (!(m instanceof Error)) {
    await m.dispose();
    throw new Error(`a model of ${dir} with kvCacheDtype ${kvCacheDtype} was expected to fail to load, but loaded`);
  }
  return m;
}

describeGpu("cuda: head sizes", () => {
  test.each([undefined, ...KV_CACHE_DTYPES])(
    "head size 256 (kvCacheDtype %p): a ConfigError at load naming head_dim and the largest head size",
    async (kvCacheDtype) => {
      // One head of 256: every type's layout takes it, the CUDA kernels do not (at most 128).
      const e = await loadError(writeTinyModel({ hidden: 256, heads: 1, kvHeads: 1, intermediate: 64 }), kvCacheDtype);
      expect(e).toBeInstanceOf(ConfigError);
      expect((e as ConfigError).field).toBe("head_dim");
      expect(e.message).toMatch(/head size 256 cannot run on cuda: the CUDA attention kernels take head sizes 1 to 128, not 256/);
    },
  );

  test("head size 128, the largest the kernels take, loads in every type and generates what the CPU does in f32", async () => {
    const dir = writeTinyModel({ hidden: 128, heads: 1, kvHeads: 1, intermediate: 64 });
    const cpu = await loadModel(dir, { device: "cpu", dtype: "f32", kvCacheDtype: "f32" });
    const want = (await cpu.generate(prompt, greedy)).tokens;
    await cpu.dispose();
    for (const kvCacheDtype of KV_CACHE_DTYPES) {
      const m = await loadModel(dir, { device: "cuda", dtype: "f32", kvCacheDtype });
      try {
        const got = (await m.generate(prompt, greedy)).tokens;
        expect(got).toHaveLength(greedy.maxNewTokens);
        if (kvCacheDtype === "f32") expect(got).toEqual(want);
        expect(KV_CACHE_DTYPES.map((t) => m.kvBytesPerTokenIn(t) !== null)).toEqual([true, true, true, true, true]);
      } finally {
        await m.dispose();
      }
    }
  });

  test("a type the head size cannot take is refused as kvCacheDtype, naming the types that run", async () => {
    // Head size 22: even (bf16 takes it), not a multiple of 4 (fp8, int8) or 8 (int4).
    const dir = writeTinyModel({ hidden: 44, heads: 2, kvHeads: 1, intermediate: 43 });
    for (const kvCacheDtype of ["fp8", "int8", "int4"] as const) {
      const e = await loadError(dir, kvCacheDtype);
      expect(e).toBeInstanceOf(InvalidOptionError);
      expect((e as InvalidOptionError).option).toBe("kvCacheDtype");
      expect(e.message).toMatch(/a multiple of \d, not 22 .*; this model takes "f32", "bf16"$/);
    }
  });

  test("a K/V pool of int4 pages smaller than the kernels read is refused when it is created, not at the first step", () => {
    // The library makes pages of KV_PAGE_TOKENS (16); the addon takes any power of two the
    // layout allows (4 and up for int4), and the CUDA decode kernels read 16 and up.
    const desc: NativeModelDescription = {
      style: "gpt2", numLayers: 1, hidden: 8, numHeads: 1, numKvHeads: 1, headDim: 8, intermediate: 8, vocab: 8, maxPositions: 64,
      normEps: 1e-5, tiedEmbeddings: true, attentionBias: true, mlpBias: true, ropeInvFreq: [],
      plan: { target: [0], strict: [0], window: [0], kvLayers: [0], cyclicLow: -1, cyclicHigh: -1 },
    };
    const addon = loadAddon();
    for (const pageTokens of [4, 8]) {
      const m = new addon.NativeModel(desc, { backend: "cuda" });
      expect(() => m.createPool(4, pageTokens, "int4")).toThrow(
        new RegExp(`the CUDA attention kernels read int4 pages of at least 16 tokens, not ${pageTokens}$`),
      );
      expect(() => m.createSequence(8)).toThrow(/no K\/V pool/);  // nothing half-made
      m.createPool(4, 16, "int4");  // the refusal left the model able to take a pool
      expect(m.poolStats().pageTokens).toBe(16);
      m.dispose();
    }
    const m = new addon.NativeModel(desc, { backend: "cuda" });
    m.createPool(4, 8, "bf16");  // a type without channel keys reads any page size
    m.dispose();
  });
});
