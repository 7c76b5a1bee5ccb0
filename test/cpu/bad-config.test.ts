/**
 * Config values and weight files that once crashed the process (V8 heap OOM, fatal invalid
 * size), loaded into NaN logits, or failed with a raw EISDIR: each now gets a typed error that
 * names the file and the field.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { ConfigError, LckvError, loadModel, ModelLoadError, parseLayerTypes, SafetensorsError } from "../../lib";
import { writeShardedTinyModel, writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";
const load = (dir: string) => loadModel(dir, { device: "cpu", kvCacheMemory: 1 << 20 });

/** Rewrites the config.json a tiny model was written with. */
function editConfig(dir: string, mutate: (c: Record<string, any>) => void): void {
  const file = path.join(dir, "config.json");
  const c = JSON.parse(fs.readFileSync(file, "utf8"));
  mutate(c);
  fs.writeFileSync(file, JSON.stringify(c));
}

async function expectConfigError(dir: string, field: string, msg: RegExp): Promise<void> {
  const e = await load(dir).catch((x) => x);
  expect(e).toBeInstanceOf(ConfigError);
  expect(e.field).toBe(field);
  expect(e.file).toBe(path.join(dir, "config.json"));
  expect(e.message).toContain(`field '${field}'`);
  expect(e.message).toMatch(msg);
}

describe("config.json integers have upper bounds", () => {
  test.each([
    // range(numLayers) and new Set() of 1e9 entries exhausted the V8 heap.
    ["num_hidden_layers 1e9", "num_hidden_layers", (c: any) => (c.num_hidden_layers = 1e9), /must be <= 4096, got 1000000000/],
    // 20M layers gave a plain RangeError ("Set maximum size exceeded").
    ["num_hidden_layers 20M", "num_hidden_layers", (c: any) => (c.num_hidden_layers = 20_000_000), /must be <= 4096/],
    // The RoPE table has head_dim/2 entries: "Fatal JavaScript invalid size error".
    ["head_dim 1e9", "head_dim", (c: any) => (c.head_dim = 1e9), /must be <= 1048576, got 1000000000/],
    [
      "hidden_size 2**40",
      "hidden_size",
      (c: any) => Object.assign(c, { hidden_size: 2 ** 40, num_attention_heads: 1, num_key_value_heads: 1 }),
      /must be <= 1048576/,
    ],
    // The native side takes int32; 2**31 used to reach it and come back as "plan.window must be >= 0".
    ["mistral sliding_window 2**31", "sliding_window", (c: any) => Object.assign(c, { model_type: "mistral", sliding_window: 2 ** 31 }), /must be <= 2147483647/],
    ["max_position_embeddings 3e9", "max_position_embeddings", (c: any) => (c.max_position_embeddings = 3e9), /must be <= 2147483647/],
    ["bos_token_id 2**31", "bos_token_id", (c: any) => (c.bos_token_id = 2 ** 31), /must be <= 2147483647/],
  ])("%s", async (_name, field, mutate, msg) => {
    const dir = writeTinyModel();
    editConfig(dir, mutate);
    await expectConfigError(dir, field, msg);
  });

  test("an end or start token past vocab_size, in config.json or generation_config.json, is refused by file and field", async () => {
    for (const [file, field, value] of [
      ["config.json", "eos_token_id", [2, 99999]],
      ["config.json", "bos_token_id", 64],
      ["generation_config.json", "eos_token_id", 99999],
      ["generation_config.json", "bos_token_id", [64]],
    ] as const) {
      const dir = writeTinyModel({ vocab: 64 });
      const p = path.join(dir, file);
      const json = fs.existsSync(p) ? JSON.parse(fs.readFileSync(p, "utf8")) : {};
      fs.writeFileSync(p, JSON.stringify({ ...json, [field]: value }));
      const e = await load(dir).catch((x) => x);
      expect(e).toBeInstanceOf(ConfigError);
      expect(e.file).toBe(p);
      expect(e.field).toBe(field);
      expect(e.message).toMatch(/holds (99999|64), outside the vocabulary \[0, 64\) of config\.json's vocab_size/);
    }
  });

  test("eos_token_id past int32", async () => {
    const dir = writeTinyModel();
    editConfig(dir, (c) => (c.eos_token_id = [2, 2 ** 31]));
    await expectConfigError(dir, "eos_token_id", /must be a token id/);
  });

  // forward_passes 3e9 loaded, then every forward failed in the addon ("'passes' must be a 32-bit integer").
  test.each([
    ["forward_passes", 3e9],
    ["forward_passes", 1025],
    ["backward_passes", 2 ** 31],
  ])("LCKV %s %d", async (field, v) => {
    const dir = writeTinyModel({ layerTypes: "0_3_3_3" });
    editConfig(dir, (c) => (c[field] = v));
    await expectConfigError(dir, field, /must be <= 1024/);
  });

  test("values at the bounds still load (mistral sliding_window 2**31 - 1)", async () => {
    const dir = writeTinyModel();
    editConfig(dir, (c) => Object.assign(c, { model_type: "mistral", sliding_window: 2 ** 31 - 1 }));
    const m = await load(dir);
    expect(m.config.slidingWindows.every((w) => w === 2 ** 31 - 1)).toBe(true);
    const logits = await m.logits([1, 2, 3]);
    expect(Array.from(logits).every((x) => Number.isFinite(x))).toBe(true);
    await m.dispose();
  });

  test("parseLayerTypes bounds the layer count for direct callers too", () => {
    const e = (() => {
      try {
        parseLayerTypes(undefined, 1e9, "config.json");
      } catch (x) {
        return x as ConfigError;
      }
    })();
    expect(e).toBeInstanceOf(ConfigError);
    expect(e!.field).toBe("num_hidden_layers");
    expect(e!.message).toMatch(/config\.json: field 'num_hidden_layers': must be an integer in \[1, 4096\], got 1000000000/);
  });
});

describe("config.json numbers that would give NaN", () => {
  test.each([
    ["rope_theta 0", "rope_theta", (c: any) => (c.rope_theta = 0), /must be > 0, got 0/],
    ["rope_theta negative", "rope_theta", (c: any) => (c.rope_theta = -10000), /must be > 0, got -10000/],
    // Positive, but 1 / theta**x overflows f32.
    ["rope_theta 1e-300", "rope_theta", (c: any) => (c.rope_theta = 1e-300), /outside f32's range/],
    ["rope_parameters.rope_theta 0", "rope_parameters.rope_theta", (c: any) => (c.rope_parameters = { rope_type: "default", rope_theta: 0 }), /must be > 0/],
    ["linear factor 0", "rope_scaling.factor", (c: any) => (c.rope_scaling = { type: "linear", factor: 0 }), /must be > 0, got 0/],
    ["linear factor negative", "rope_scaling.factor", (c: any) => (c.rope_scaling = { type: "linear", factor: -2 }), /must be > 0, got -2/],
    ["linear factor 1e-300", "rope_scaling.factor", (c: any) => (c.rope_scaling = { type: "linear", factor: 1e-300 }), /outside f32's range/],
    [
      "llama3 high_freq_factor == low_freq_factor",
      "rope_scaling.high_freq_factor",
      (c: any) => (c.rope_scaling = { rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 1, original_max_position_embeddings: 64 }),
      /\(1\) must be greater than low_freq_factor \(1\)/,
    ],
    [
      "llama3 low_freq_factor 0",
      "rope_scaling.low_freq_factor",
      (c: any) => (c.rope_scaling = { rope_type: "llama3", factor: 8, low_freq_factor: 0, high_freq_factor: 4, original_max_position_embeddings: 64 }),
      /must be > 0/,
    ],
    [
      "llama3 original_max_position_embeddings 0",
      "rope_scaling.original_max_position_embeddings",
      (c: any) => (c.rope_scaling = { rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 0 }),
      /must be > 0/,
    ],
    [
      "llama3 in rope_parameters, factor 0",
      "rope_parameters.factor",
      (c: any) => (c.rope_parameters = { rope_type: "llama3", rope_theta: 10000, factor: 0, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 }),
      /must be > 0/,
    ],
    ["rms_norm_eps negative", "rms_norm_eps", (c: any) => (c.rms_norm_eps = -1), /must be >= 0, got -1/],
    // Infinite as the f32 the engine takes: every hidden state normed to 0, every logit the same.
    ["rms_norm_eps past f32", "rms_norm_eps", (c: any) => (c.rms_norm_eps = 1e39), /must fit an f32 \(at most 3\.4028234663852886e\+38\), got 1e\+39/],
  ])("%s", async (_name, field, mutate, msg) => {
    const dir = writeTinyModel();
    editConfig(dir, mutate);
    await expectConfigError(dir, field, msg);
  });

  test("GPT-2: layer_norm_epsilon negative and n_layer past the bound", async () => {
    const gpt2 = { architectures: ["GPT2LMHeadModel"], model_type: "gpt2", n_layer: 2, n_embd: 32, n_head: 4, vocab_size: 64, layer_norm_epsilon: -1e-5 };
    const dir = writeTinyModel();
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(gpt2));
    await expectConfigError(dir, "layer_norm_epsilon", /must be >= 0/);
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...gpt2, layer_norm_epsilon: 1e-5, n_layer: 1e9 }));
    await expectConfigError(dir, "n_layer", /must be <= 4096/);
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...gpt2, layer_norm_epsilon: 1e39 }));
    await expectConfigError(dir, "layer_norm_epsilon", /must fit an f32/);
    // transformers ties GPT-2's head to wte only when asked; lckv's GPT-2 reads it from wte alone.
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...gpt2, layer_norm_epsilon: 1e-5, tie_word_embeddings: false }));
    await expectConfigError(dir, "tie_word_embeddings", /is not supported for GPT-2 \(must be true: the LM head is wte\)/);
  });

  test("rms_norm_eps 0 and a valid llama3 scaling still load, with finite logits", async () => {
    const dir = writeTinyModel();
    editConfig(dir, (c) => {
      c.rms_norm_eps = 0;
      c.rope_scaling = { rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 };
    });
    const m = await load(dir);
    const logits = await m.logits([1, 2, 3]);
    expect(Array.from(logits).every((x) => Number.isFinite(x))).toBe(true);
    await m.dispose();
  });
});

describe("weight files", () => {
  const st = (dir: string) => path.join(dir, "model.safetensors");
  function setShard(dir: string, tensor: string, shard: string): void {
    const ip = path.join(dir, "model.safetensors.index.json");
    const idx = JSON.parse(fs.readFileSync(ip, "utf8"));
    idx.weight_map[tensor] = shard;
    fs.writeFileSync(ip, JSON.stringify(idx));
  }

  test("model.safetensors is a directory", async () => {
    const dir = writeTinyModel();
    fs.rmSync(st(dir));
    fs.mkdirSync(st(dir));
    const e = await load(dir).catch((x) => x);
    // Was a raw EISDIR Error from fs.readSync.
    expect(e).toBeInstanceOf(LckvError);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect(e.code).toBe("LCKV_SAFETENSORS");
    expect(e.file).toBe(st(dir));
    expect(e.message).toBe(`${st(dir)}: is not a regular file`);
  });

  test.each([[""], ["."], [".."], ["../a.safetensors"], ["sub\\a.safetensors"], ["a\u0000.safetensors"]])(
    "weight_map shard name %j",
    async (shard) => {
      const dir = writeShardedTinyModel();
      setShard(dir, "model.norm.weight", shard);
      const e = await load(dir).catch((x) => x);
      expect(e).toBeInstanceOf(ModelLoadError);
      expect(e.file).toBe(path.join(dir, "model.safetensors.index.json"));
      expect(e.message).toContain(`weight_map['model.norm.weight'] must be a file name in the model directory, got ${JSON.stringify(shard)}`);
    },
  );

  test("a shard that is a directory", async () => {
    const dir = writeShardedTinyModel();
    fs.mkdirSync(path.join(dir, "c.safetensors"));
    setShard(dir, "model.norm.weight", "c.safetensors");
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect(e.file).toBe(path.join(dir, "c.safetensors"));
    expect(e.message).toMatch(/c\.safetensors: is not a regular file/);
  });

  test("a model file that is a symbolic link leading nowhere is named, not taken for absent", async () => {
    // A download that never finished leaves links to missing blobs; a loop is the other way to nowhere.
    for (const file of ["tokenizer.json", "generation_config.json", "config.json", "model.safetensors"]) {
      const dir = writeTinyModel();
      const p = path.join(dir, file);
      fs.rmSync(p, { force: true });
      fs.symlinkSync(path.join(dir, "missing-blob"), p);
      const e = await load(dir).catch((x) => x);
      expect(e).toBeInstanceOf(ModelLoadError);
      expect(e.file).toBe(p);
      expect(e.message).toMatch(new RegExp(`^${p.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} is a symbolic link that leads nowhere \\(ENOENT`));
    }
    const dir = writeTinyModel();
    const p = path.join(dir, "tokenizer.json");
    fs.rmSync(p, { force: true });
    fs.symlinkSync(p, p);
    const loop = await load(dir).catch((x) => x);
    expect(loop).toBeInstanceOf(ModelLoadError);
    expect(loop.message).toMatch(/tokenizer\.json is a symbolic link that leads nowhere \(ELOOP/);
  });

  test("model.safetensors comes before an index beside it, as transformers takes it: a stale index does not stop the load", async () => {
    const dir = writeShardedTinyModel();
    setShard(dir, "model.norm.weight", "gone.safetensors");
    const stale = await load(dir).catch((x) => x);
    expect(stale).toBeInstanceOf(ModelLoadError);
    // The merged file beside it is what loads.
    fs.copyFileSync(st(writeTinyModel()), st(dir));
    const m = await load(dir);
    expect((await m.generate([1, 2, 3], { maxNewTokens: 2, temperature: 0, ignoreEos: true })).tokens).toHaveLength(2);
    await m.dispose();
  });

  test("model.safetensors.index.json is a directory", async () => {
    const dir = writeTinyModel();
    fs.rmSync(st(dir));
    fs.mkdirSync(path.join(dir, "model.safetensors.index.json"));
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(ModelLoadError);
    expect(e.file).toBe(path.join(dir, "model.safetensors.index.json"));
    expect(e.message).toMatch(/cannot read .*model\.safetensors\.index\.json: EISDIR/);
  });

  test("invalid UTF-8 in the header is reported, not decoded into a missing tensor", async () => {
    const dir = writeTinyModel();
    const b = fs.readFileSync(st(dir));
    // Corrupt the first byte of a tensor name inside the header.
    const at = b.indexOf("model.norm.weight");
    expect(at).toBeGreaterThan(8);
    b[at] = 0xff;
    fs.writeFileSync(st(dir), b);
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect(e.file).toBe(st(dir));
    expect(e.message).toBe(`${st(dir)}: header is not valid UTF-8`);
  });
});
