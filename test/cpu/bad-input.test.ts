/**
 * Bad input of every kind gets a typed error that names what is wrong; nothing crashes.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  DEFAULT_MODEL_DIR,
  ConfigError,
  KV_CACHE_DTYPES,
  KvCacheDtype,
  ContextOverflowError,
  DisposedError,
  evaluatePerplexity,
  InvalidInputError,
  InvalidOptionError,
  loadModel,
  LckvError,
  ModelLoadError,
  SafetensorsError,
  TokenOutOfRangeError,
  UnsupportedArchitectureError,
} from "../../lib";
import { tinyLlamaConfig, tinyLlamaTensors, writeShardedTinyModel, writeTinyModel } from "../helpers/tiny-model";

process.env.LCKV_QUIET = "1";
const load = (dir: string, opts = {}) => loadModel(dir, { device: "cpu", ...opts });

function writeConfig(dir: string, mutate: (c: Record<string, any>) => void): void {
  const c = tinyLlamaConfig() as Record<string, any>;
  mutate(c);
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(c));
}

describe("model files", () => {
  test("a directory that does not exist", async () => {
    await expect(load("/nonexistent/lckv-model")).rejects.toThrow(ModelLoadError);
    await expect(load("/nonexistent/lckv-model")).rejects.toThrow(/does not exist/);
  });

  test("a file where the model directory should be", async () => {
    const dir = writeTinyModel();
    const file = path.join(dir, "config.json");
    await expect(load(file)).rejects.toThrow(ModelLoadError);
    await expect(load(file)).rejects.toThrow(/config\.json is a file, not a model directory/);
  });

  test("missing config.json", async () => {
    const dir = writeTinyModel();
    fs.unlinkSync(path.join(dir, "config.json"));
    await expect(load(dir)).rejects.toThrow(/missing config\.json/);
  });

  test("missing weights", async () => {
    const dir = writeTinyModel();
    fs.unlinkSync(path.join(dir, "model.safetensors"));
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(ModelLoadError);
    expect(e.message).toMatch(/no model\.safetensors or model\.safetensors\.index\.json/);
  });

  test("config.json that is not JSON", async () => {
    const dir = writeTinyModel();
    fs.writeFileSync(path.join(dir, "config.json"), "{ not json");
    await expect(load(dir)).rejects.toThrow(/config\.json: not valid JSON/);
  });

  test("a missing tensor is named", async () => {
    const dir = writeTinyModel({}, { tensors: tinyLlamaTensors().filter((t) => t.name !== "model.layers.2.mlp.up_proj.weight") });
    await expect(load(dir)).rejects.toThrow(/missing tensor 'model\.layers\.2\.mlp\.up_proj\.weight'/);
  });
});

describe("safetensors headers that lie", () => {
  const st = (dir: string) => path.join(dir, "model.safetensors");

  test("file too short for a header", async () => {
    const dir = writeTinyModel();
    fs.writeFileSync(st(dir), Buffer.from([1, 2, 3]));
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect(e.file).toBe(st(dir));
    expect(e.message).toMatch(/too short/);
  });

  test("header length past the end of the file", async () => {
    const dir = writeTinyModel();
    const b = fs.readFileSync(st(dir));
    b.writeBigUInt64LE(BigInt(b.length + 100), 0);
    fs.writeFileSync(st(dir), b);
    await expect(load(dir)).rejects.toThrow(/header length \d+ runs past the end of the file/);
  });

  test("header that is not JSON", async () => {
    const dir = writeTinyModel();
    const b = fs.readFileSync(st(dir));
    b.write("#", 8);
    fs.writeFileSync(st(dir), b);
    await expect(load(dir)).rejects.toThrow(/header is not valid JSON/);
  });

  test("data offsets past the end of the data", async () => {
    const dir = writeTinyModel({}, { mutateHeader: (h) => (h["model.norm.weight"].data_offsets[1] += 1 << 20) });
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect(e.tensor).toBe("model.norm.weight");
    expect(e.message).toMatch(/past the end of the data section/);
  });

  test("begin after end", async () => {
    const dir = writeTinyModel({}, { mutateHeader: (h) => (h["model.norm.weight"].data_offsets = [40, 8]) });
    await expect(load(dir)).rejects.toThrow(/data_offsets must be \[begin, end\]/);
  });

  test("overlapping tensors", async () => {
    const dir = writeTinyModel({}, {
      mutateHeader: (h) => {
        const a = h["model.layers.0.input_layernorm.weight"].data_offsets;
        const b = h["model.layers.0.post_attention_layernorm.weight"];
        b.data_offsets = [a[0], a[1]];
      },
    });
    await expect(load(dir)).rejects.toThrow(/overlaps tensor/);
  });

  test("unknown dtype", async () => {
    const dir = writeTinyModel({}, { mutateHeader: (h) => (h["model.norm.weight"].dtype = "F12") });
    await expect(load(dir)).rejects.toThrow(/tensor 'model\.norm\.weight': unknown dtype "F12"/);
  });

  test("a known dtype that weights cannot use", async () => {
    const dir = writeTinyModel({}, { mutateHeader: (h) => (h["model.norm.weight"].dtype = "I32") });
    await expect(load(dir)).rejects.toThrow(/dtype I32 is not supported for weights/);
  });

  test("shape that does not match the bytes", async () => {
    const dir = writeTinyModel({}, { mutateHeader: (h) => (h["model.norm.weight"].shape = [33]) });
    await expect(load(dir)).rejects.toThrow(/shape \[33\] of F32 needs 132 bytes but data_offsets span 128/);
  });

  test("shape that does not match the config", async () => {
    const t = tinyLlamaTensors();
    const q = t.find((x) => x.name === "model.layers.1.self_attn.q_proj.weight")!;
    q.shape = [16, 64];
    const dir = writeTinyModel({}, { tensors: t });
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(SafetensorsError);
    expect(e.message).toMatch(/q_proj\.weight': shape \[16,64\] does not match \[32,32\] implied by config\.json/);
  });

  test("NaN in the weights", async () => {
    const t = tinyLlamaTensors();
    t.find((x) => x.name === "model.norm.weight")!.data[3] = NaN;
    const dir = writeTinyModel({}, { tensors: t });
    await expect(load(dir)).rejects.toThrow(/model\.norm\.weight.*NaN or infinite/);
  });

  test("the data is truncated after a valid header", async () => {
    const dir = writeTinyModel();
    const b = fs.readFileSync(st(dir));
    fs.writeFileSync(st(dir), b.subarray(0, b.length - 200));
    await expect(load(dir)).rejects.toThrow(SafetensorsError);
  });
});

describe("sharded checkpoints", () => {
  test("loads, and gives the same logits as the single file", async () => {
    const one = await load(writeTinyModel());
    const two = await load(writeShardedTinyModel());
    const ids = [1, 2, 3, 4, 5];
    expect(Array.from(await two.logits(ids))).toEqual(Array.from(await one.logits(ids)));
    await one.dispose();
    await two.dispose();
  });

  test("a shard that does not exist", async () => {
    const dir = writeShardedTinyModel();
    fs.unlinkSync(path.join(dir, "b.safetensors"));
    await expect(load(dir)).rejects.toThrow(/shard 'b\.safetensors' .* does not exist/);
  });

  test("a tensor listed in the wrong shard", async () => {
    const dir = writeShardedTinyModel();
    const idx = JSON.parse(fs.readFileSync(path.join(dir, "model.safetensors.index.json"), "utf8"));
    idx.weight_map["model.norm.weight"] = idx.weight_map["model.norm.weight"] === "a.safetensors" ? "b.safetensors" : "a.safetensors";
    fs.writeFileSync(path.join(dir, "model.safetensors.index.json"), JSON.stringify(idx));
    await expect(load(dir)).rejects.toThrow(/'model\.norm\.weight' is listed in '.\.safetensors' but that file does not hold it/);
  });
});

describe("config.json", () => {
  test.each([
    ["hidden_size", (c: any) => delete c.hidden_size, /field 'hidden_size': is missing/],
    ["num_hidden_layers", (c: any) => (c.num_hidden_layers = 0), /field 'num_hidden_layers': must be >= 1/],
    ["num_attention_heads", (c: any) => (c.num_attention_heads = 2.5), /field 'num_attention_heads': must be an integer/],
    ["num_key_value_heads", (c: any) => (c.num_key_value_heads = 3), /field 'num_key_value_heads': \(3\) must divide/],
    ["hidden_act", (c: any) => (c.hidden_act = "relu"), /field 'hidden_act'/],
    ["rope_scaling", (c: any) => (c.rope_scaling = { rope_type: "yarn", factor: 2 }), /rope_scaling.*'yarn' is not supported/],
    ["tie_word_embeddings", (c: any) => (c.tie_word_embeddings = "yes"), /field 'tie_word_embeddings': must be true or false/],
  ])("%s", async (field, mutate, msg) => {
    const dir = writeTinyModel();
    writeConfig(dir, mutate);
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.field).toBe(field);
    expect(e.message).toMatch(msg);
    expect(e.file).toBe(path.join(dir, "config.json"));
  });

  test("a number too large for a double (1e400, parsed as Infinity) is shown as Infinity, not as JSON's null", async () => {
    const dir = writeTinyModel();
    const file = path.join(dir, "config.json");
    const text = fs.readFileSync(file, "utf8");
    fs.writeFileSync(file, text.replace(/"hidden_size":\s*\d+/, '"hidden_size": 1e400'));
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.message).toMatch(/field 'hidden_size': must be an integer, got Infinity/);
  });

  test("an unsupported architecture names itself and the supported ones", async () => {
    const dir = writeTinyModel();
    writeConfig(dir, (c) => {
      c.model_type = "mamba";
      c.architectures = ["MambaForCausalLM"];
    });
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(UnsupportedArchitectureError);
    expect(e.architecture).toBe("MambaForCausalLM");
    expect(e.message).toMatch(/'MambaForCausalLM' is not supported; lckv runs: LlamaForCausalLM.*GPT2LMHeadModel/);
  });

  test("untied embeddings without lm_head", async () => {
    const dir = writeTinyModel();
    writeConfig(dir, (c) => (c.tie_word_embeddings = false));
    await expect(load(dir)).rejects.toThrow(/missing tensor 'lm_head\.weight'/);
  });
});

describe("layer_types", () => {
  test.each([
    ["wrong length", "0_1_1", /has 3 entries but the model has 4 layers/],
    ["out-of-range target", "0_7_7_7", /entry 1 targets layer 7, outside \[0, 3\]/],
    ["target that reads another layer", "0_2_3_3", /layer 1 targets layer 2, which does not compute its own K\/V/],
    ["not a number", "0_x_2_3", /entry 1 \('x'\) is not a layer index/],
  ])("%s", async (_name, lt, msg) => {
    const dir = writeTinyModel({ layerTypes: "0_3_3_3" });
    writeConfig(dir, (c) => {
      c.model_type = "lckv-llama";
      c.layer_types = lt;
    });
    const e = await load(dir).catch((x) => x);
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.field).toBe("layer_types");
    expect(e.message).toMatch(msg);
  });

  test("K/V projections that layer_types leaves unused load, with a notice naming their layers", () => {
    // A standard checkpoint (K/V on every layer) under a config that makes layers 1 and 2 read 0's and 3's.
    const standard = writeTinyModel();
    writeConfig(standard, (c) => {
      c.architectures = ["LCKVLlamaForCausalLM"];
      c.model_type = "lckv-llama";
      c.layer_types = "0_0_3_3";
    });
    const stderrOf = (d: string) => {
      const script = `require(${JSON.stringify(path.join(__dirname, "..", "..", "dist"))}).loadModel(${JSON.stringify(d)}, { device: "cpu" }).then((m) => m.dispose())`;
      const env: NodeJS.ProcessEnv = { ...process.env };
      delete env.LCKV_QUIET;
      const r = spawnSync(process.execPath, ["-e", script], { encoding: "utf8", env });
      expect(r.status).toBe(0);
      return r.stderr.split("\n").filter((l) => !l.startsWith("lckv: running on the CPU")).join("\n");
    };
    expect(stderrOf(standard)).toBe(`lckv: ${standard}: the K/V projections of layers 1, 2 are not used: layer_types makes those layers read another layer's K/V (a checkpoint trained with this layer_types has none)\n`);
    // A checkpoint made for its layer_types, and a standard one: nothing to say.
    expect(stderrOf(writeTinyModel({ layerTypes: "0_3_3_3" }))).toBe("");
    expect(stderrOf(writeTinyModel())).toBe("");
  });

  test("a target without k_proj/v_proj weights", async () => {
    // Weights made for 0_3_3_3 (k/v on layers 0 and 3) under a config that makes layer 2 a target.
    const dir = writeTinyModel({ layerTypes: "0_3_3_3" });
    writeConfig(dir, (c) => {
      c.model_type = "lckv-llama";
      c.layer_types = "0_2_2_3";
    });
    await expect(load(dir)).rejects.toThrow(/missing tensor 'model\.layers\.2\.self_attn\.k_proj\.weight' \(layer 2 is the K\/V target of layers \[1, 2\]/);
  });
});

describe("inputs and options", () => {
  let dir: string;
  beforeAll(() => {
    dir = writeTinyModel({ layerTypes: "0_3_3_3", maxPositions: 16 });
  });

  test("token ids outside the vocabulary", async () => {
    const m = await load(dir);
    for (const bad of [[1, 64], [-1]]) {
      const e = await m.generate(bad, { maxNewTokens: 1 }).catch((x) => x);
      expect(e).toBeInstanceOf(TokenOutOfRangeError);
      expect(e.message).toMatch(/outside the vocabulary \[0, 64\)/);
    }
    // 1.5 lies inside [0, 64): the error says what is wrong with it.
    for (const bad of [[1.5], [2, NaN]]) {
      const e = await m.generate(bad, { maxNewTokens: 1 }).catch((x) => x);
      expect(e).toBeInstanceOf(TokenOutOfRangeError);
      expect(e.message).toMatch(/token \d is (1\.5|NaN), not an integer: token ids are integers in \[0, 64\)/);
    }
    await expect(m.logits([3, 99])).rejects.toThrow(TokenOutOfRangeError);
    await m.dispose();
  });

  test("loadModel: an abort during the last weights is seen, a callback's own error comes back as thrown, and options must be an object", async () => {
    // Aborted from onProgress once every weight is in (a small model is one batch): AbortError,
    // not a model.
    const controller = new AbortController();
    const aborted = await load(dir, { signal: controller.signal, onProgress: (f: number) => f === 1 && controller.abort() }).catch((x) => x);
    expect(aborted).toBeInstanceOf(LckvError);
    expect(aborted.code).toBe("LCKV_ABORTED");
    const mine = new TypeError("the caller's bug");
    const thrown = await load(dir, { onProgress: (f: number) => { if (f === 1) throw mine; } }).catch((x) => x);
    expect(thrown).toBe(mine);
    for (const [options, what] of [[[], /option 'options': must be an object, got an array/], [{ device: null }, /option 'device': must be "auto", "cuda" or "cpu", got null/], [{ dtype: null }, /option 'dtype': .*got null/]] as const) {
      const e = await loadModel(dir, options as never).catch((x) => x);
      expect(e).toBeInstanceOf(InvalidOptionError);
      expect(e.message).toMatch(what);
    }
    // The process loads and runs models as before.
    const m = await load(dir);
    expect((await m.generate([1, 2], { maxNewTokens: 2, temperature: 0 })).tokens).toHaveLength(2);
    await m.dispose();
  });

  test("more threads than cores load, with a notice on stderr (none under LCKV_QUIET, none within the cores)", () => {
    const cores = os.availableParallelism();
    const notice = (threads: number, quiet: boolean) => {
      const script = `require(${JSON.stringify(path.join(__dirname, "..", "..", "dist"))}).loadModel(${JSON.stringify(dir)}, { device: "cpu", threads: ${threads} }).then((m) => m.dispose())`;
      const env: NodeJS.ProcessEnv = { ...process.env };
      if (quiet) env.LCKV_QUIET = "1";
      else delete env.LCKV_QUIET;
      const r = spawnSync(process.execPath, ["-e", script], { encoding: "utf8", env });
      expect(r.status).toBe(0);
      return r.stderr;
    };
    expect(notice(cores + 1, false)).toBe(`lckv: threads is ${cores + 1}, more than the ${cores} cores this process may use: the extra threads share them\n`);
    expect(notice(cores + 1, true)).toBe("");
    expect(notice(cores, false)).toBe("");
  });

  test("evaluatePerplexity: text instead of ids, ids outside the vocabulary and unknown options are refused by name", async () => {
    const m = await load(dir);
    try {
      const ids = [1, 5, 9, 3, 7, 2, 4, 6];
      const good = await evaluatePerplexity(m, ids, { window: 4 });
      expect(Number.isFinite(good.perplexity)).toBe(true);
      const text = await evaluatePerplexity(m, "The king" as unknown as number[]).catch((x) => x);
      expect(text).toBeInstanceOf(InvalidInputError);
      expect(text.message).toMatch(/perplexity takes an array of token ids .*got "The king"/);
      // A typed array of ids is one; a DataView over the same bytes is not (it has no length).
      expect((await evaluatePerplexity(m, Int32Array.from(ids) as unknown as number[], { window: 4 })).perplexity).toBe(good.perplexity);
      const view = await evaluatePerplexity(m, new DataView(Int32Array.from(ids).buffer) as unknown as number[]).catch((x) => x);
      expect(view).toBeInstanceOf(InvalidInputError);
      // The same words as every other input of ids (toTokenIds).
      for (const [bad, what] of [
        [[1, 64], /^perplexity input token 1 is 64, outside the vocabulary \[0, 64\)$/],
        [[1, 2.5], /^perplexity input token 1 is 2\.5, not an integer: token ids are integers in \[0, 64\)$/],
        [[-1, 2], /^perplexity input token 0 is -1, outside the vocabulary \[0, 64\)$/],
      ] as const) {
        const e = await evaluatePerplexity(m, bad as unknown as number[]).catch((x) => x);
        expect(e).toBeInstanceOf(TokenOutOfRangeError);
        expect(e.message).toMatch(what);
      }
      const typo = await evaluatePerplexity(m, ids, { windw: 4 } as never).catch((x) => x);
      expect(typo).toBeInstanceOf(InvalidOptionError);
      expect(typo.message).toMatch(/option 'windw': is not a perplexity option \(known: window, /);
      await expect(evaluatePerplexity(m, ids, { onWindow: 3 } as never)).rejects.toThrow(/option 'onWindow': must be a function, got 3/);
      await expect(evaluatePerplexity(m, ids, { window: "4" } as never)).rejects.toThrow(/option 'window': must be an integer in \[2, 16\], got "4"/);
      await expect(evaluatePerplexity(m, ids, null as never)).rejects.toThrow(/option 'options': must be an object, got null/);
      await expect(evaluatePerplexity(null as never, ids)).rejects.toThrow(/option 'model': must be a Model from loadModel\(\), got null/);
      // The model still scores as before.
      expect((await evaluatePerplexity(m, ids, { window: 4 })).perplexity).toBe(good.perplexity);
    } finally {
      await m.dispose();
    }
  });

  test("a prompt longer than the context", async () => {
    const m = await load(dir);
    const e = await m.generate(Array(17).fill(1)).catch((x) => x);
    expect(e).toBeInstanceOf(ContextOverflowError);
    expect(e.message).toMatch(/17 tokens but the context holds 16/);
    await m.dispose();
  });

  test("a text far longer than the context is refused from its first characters, as one a little longer is in full", async () => {
    const m = await load(DEFAULT_MODEL_DIR);
    try {
      const far = await m.generate("word ".repeat(200_000), { maxNewTokens: 1 }).catch((x) => x);
      expect(far).toBeInstanceOf(ContextOverflowError);
      expect(far.message).toMatch(/^prompt has more than 256 tokens \(\d+ in its first \d+ of 1000000 characters\), but the context holds 256$/);
      const near = await m.generate("word ".repeat(300), { maxNewTokens: 1 }).catch((x) => x);
      expect(near).toBeInstanceOf(ContextOverflowError);
      expect(near.message).toMatch(/^prompt has \d+ tokens but the context holds 256$/);
      // Within the context, text runs as before; and a sequence's room is what it has left.
      using seq = m.createSequence();
      await seq.append("word ".repeat(100));
      const left = m.maxContext - seq.length;
      const more = await seq.append("word ".repeat(200_000)).catch((x: unknown) => x);
      expect(more).toBeInstanceOf(ContextOverflowError);
      expect((more as Error).message).toContain(`more than ${left} tokens`);
      expect(seq.length).toBe(m.maxContext - left);
    } finally {
      await m.dispose();
    }
  });

  test("an empty prompt, and text without a tokenizer", async () => {
    const m = await load(dir);
    await expect(m.generate([])).rejects.toThrow(/prompt is empty/);
    await expect(m.generate("hello")).rejects.toThrow(/no tokenizer\.json/);
    await expect(m.generate({} as any)).rejects.toThrow(InvalidInputError);
    await m.dispose();
  });

  test.each([
    [{ maxNewTokens: -1 }, "maxNewTokens", /non-negative integer, got -1/],
    [{ maxNewTokens: 1.5 }, "maxNewTokens", /non-negative integer, got 1.5/],
    [{ maxNewTokens: "3" }, "maxNewTokens", /non-negative integer, got "3"/],
    [{ topP: 0 }, "topP", /in \(0, 1\]/],
    [{ topP: 1.5 }, "topP", /in \(0, 1\]/],
    [{ minP: -0.1 }, "minP", /in \[0, 1\]/],
    [{ temperature: -1 }, "temperature", />= 0/],
    [{ temperature: Infinity }, "temperature", /finite/],
    [{ topK: -2 }, "topK", /non-negative integer/],
    [{ topK: 2 ** 31 }, "topK", /at most 2147483647/],
    [{ prefillPasses: 2 ** 31 - 1 }, "prefillPasses", /at most 1024/],
    [{ repetitionPenalty: 0 }, "repetitionPenalty", /> 0/],
    [{ repetitionPenalty: 1e-40 }, "repetitionPenalty", /f32's normal range/],
    [{ seed: 0.5 }, "seed", /integer/],
    // An integer a double holds only approximately: the bound it passed, not "must be an integer".
    [{ seed: 2 ** 60 }, "seed", /must be an integer of at most 2\^53 - 1 in magnitude/],
    [{ maxNewTokens: 2 ** 60 }, "maxNewTokens", /must be a non-negative integer of at most 2\^53 - 1/],
    [{ maxNewTokens: -(2 ** 60) }, "maxNewTokens", /must be a non-negative integer, got/],
    [{ stop: [""] }, "stop", /non-empty/],
    [{ signal: {} }, "signal", /AbortSignal/],
    [{ prefill: "parallel" }, "prefill", /must be one of "fixed-point", "sequential", "iterative"/],
    [{ maxTokens: 3 }, "maxTokens", /is not a generate option/],
  ])("generate option %j", async (opts, option, msg) => {
    const m = await load(dir);
    const e = await m.generate([1, 2], opts as any).catch((x) => x);
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.option).toBe(option);
    expect(e.message).toMatch(msg);
    await m.dispose();
  });

  test.each([
    [{ device: "tpu" }, "device"],
    [{ dtype: "f8" }, "dtype"],
    [{ dtype: "F32" }, "dtype"],
    [{ maxContext: 0 }, "maxContext"],
    [{ maxContext: 17 }, "maxContext"],
    [{ kvCacheMemory: -5 }, "kvCacheMemory"],
    [{ threads: 1.5 }, "threads"],
    [{ threads: 100000 }, "threads"],
    [{ queueTimeout: 2 ** 31 }, "queueTimeout"],
    [{ maxBatch: 2 ** 32 }, "maxBatch"],
    [{ kvCacheMemory: 2 ** 52 }, "kvCacheMemory"],
    [{ cudaGraphs: "no" }, "cudaGraphs"],
    [{ runAhead: 1 }, "runAhead"],
    [{ contextSize: 8 }, "contextSize"],
    [{ kvCacheDtype: "int2" }, "kvCacheDtype"],
    [{ kvCacheDtype: "BF16" }, "kvCacheDtype"],
    [{ kvCacheDtype: 8 }, "kvCacheDtype"],
  ])("loadModel option %j", async (opts, option) => {
    const e = await load(dir, opts).catch((x) => x);
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.option).toBe(option);
  });

  test("a K/V cache type the model's head size cannot take names the option, the head size and what it needs", async () => {
    // Head size 44 / 2 = 22: even (bf16 takes it), not a multiple of 4 (fp8, int8) or 8 (int4).
    const odd = writeTinyModel({ hidden: 44, heads: 2, kvHeads: 1, intermediate: 43 });
    for (const [kvCacheDtype, multiple] of [["fp8", 4], ["int8", 4], ["int4", 8]] as const) {
      const e = await load(odd, { kvCacheDtype }).catch((x) => x);
      expect(e).toBeInstanceOf(InvalidOptionError);
      expect(e.option).toBe("kvCacheDtype");
      expect(e.message).toMatch(new RegExp(`${kvCacheDtype} needs a head size that is a multiple of ${multiple}, not 22 `));
      expect(e.message).toMatch(/this model takes "f32", "bf16"$/);
    }
    const m = await load(odd, { kvCacheDtype: "bf16" });
    expect((await m.generate([1, 2, 3], { maxNewTokens: 4, temperature: 0, ignoreEos: true })).tokens).toHaveLength(4);
    await m.dispose();
  });

  test("kvBytesPerTokenIn: null for a type the head size cannot take, a typed error for anything else", async () => {
    // Head size 22, 4 layers (all own K/V), 1 K/V head: K and V of 22 values a layer.
    const m = await load(writeTinyModel({ hidden: 44, heads: 2, kvHeads: 1, intermediate: 43 }), { kvCacheDtype: "f32" });
    expect(KV_CACHE_DTYPES.map((t) => m.kvBytesPerTokenIn(t))).toEqual([4 * 2 * 22 * 4, 4 * 2 * 22 * 2, null, null, null]);
    expect(m.kvBytesPerTokenIn("f32")).toBe(m.kvBytesPerToken);
    const bad = (() => {
      try {
        return m.kvBytesPerTokenIn("int3" as KvCacheDtype);
      } catch (e) {
        return e;
      }
    })();
    expect(bad).toBeInstanceOf(InvalidOptionError);
    expect((bad as InvalidOptionError).message).toMatch(/'dtype': must be one of "f32", "bf16", "fp8", "int8", "int4", got "int3"/);
    await m.dispose();
    // A disposed model is an error, not "this type does not apply".
    expect(() => m.kvBytesPerTokenIn("f32")).toThrow(DisposedError);
    expect(() => m.kvBytesPerTokenIn("int4")).toThrow(DisposedError);
  });

  test("a model directory that is not a string", async () => {
    const e = await loadModel(123 as any).catch((x) => x);
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.option).toBe("dir");
  });

  test("queueTimeout: Infinity is the documented default and may be passed", async () => {
    const m = await load(dir, { queueTimeout: Infinity });
    expect((await m.generate([1, 2], { maxNewTokens: 2 })).tokens).toHaveLength(2);
    await m.dispose();
  });

  test("append() and logits() take an options object of known keys", async () => {
    const m = await load(dir);
    const seq = m.createSequence();
    for (const [call, option] of [
      [() => seq.append([1, 2], null as any), "options"],
      [() => seq.append([1, 2], { prefil: "sequential" } as any), "prefil"],
      [() => m.logits([1, 2], 3 as any), "options"],
      [() => m.forward([1, 2], { passes: 2 } as any), "passes"],
    ] as const) {
      const e: any = await (call as () => Promise<unknown>)().catch((x) => x);
      expect(e).toBeInstanceOf(InvalidOptionError);
      expect(e.option).toBe(option);
    }
    expect(seq.length).toBe(0);
    seq.dispose();
    await m.dispose();
  });

  test("prefillPasses out of range on append() and logits() too", async () => {
    const m = await load(dir);
    const seq = m.createSequence();
    const e = await seq.append([1, 2, 3], { prefill: "iterative", prefillPasses: 2 ** 31 - 1 }).catch((x) => x);
    expect(e).toBeInstanceOf(InvalidOptionError);
    expect(e.option).toBe("prefillPasses");
    await expect(m.logits([1, 2, 3], { prefillPasses: 5000 })).rejects.toThrow(InvalidOptionError);
    seq.dispose();
    await m.dispose();
  });

  test("a prefill option the mode in force would ignore is refused, on every path (the command line's rule)", async () => {
    const m = await load(dir);
    try {
      const mode = m.generationDefaults().prefill;
      expect(mode).toBe("sequential");  // the CPU's default
      const seq = m.createSequence();
      for (const [call, what] of [
        [() => m.forward([1, 2, 3], { prefillPasses: 3 }), /option 'prefillPasses': applies to prefill "iterative" only, and the prefill is sequential/],
        [() => m.logits([1, 2, 3], { prefill: "fixed-point", prefillPasses: 3 }), /option 'prefillPasses': applies to prefill "iterative" only, and the prefill is fixed-point/],
        [() => seq.append([1, 2, 3], { prefill: "sequential", prefillTolerance: 0.1 }), /option 'prefillTolerance': applies to prefill "fixed-point" only, and the prefill is sequential/],
        [() => m.generate([1, 2, 3], { maxNewTokens: 1, prefill: "iterative", prefillTolerance: 0 }), /option 'prefillTolerance': applies to prefill "fixed-point" only, and the prefill is iterative/],
      ] as const) {
        const e = await (call as () => Promise<unknown>)().catch((x) => x);
        expect(e).toBeInstanceOf(InvalidOptionError);
        expect((e as Error).message).toMatch(what);
      }
      // Nothing ran: the sequence is as it was, and the options its mode takes still work.
      expect(seq.length).toBe(0);
      expect((await m.forward([1, 2, 3], { prefill: "iterative", prefillPasses: 2 })).passes).toBe(2);
      seq.dispose();
    } finally {
      await m.dispose();
    }
  });

  test("kvCacheMemory too small for one token", async () => {
    await expect(load(dir, { kvCacheMemory: 16 })).rejects.toThrow(/16 bytes hold no K\/V page/);
  });

  test("use after dispose", async () => {
    const m = await load(dir);
    await m.dispose();
    await expect(m.generate([1, 2])).rejects.toThrow(DisposedError);
    await expect(m.logits([1, 2])).rejects.toThrow(DisposedError);
    await m.dispose(); // twice is fine
  });

  test("a sequence reads as disposed once its model is", async () => {
    const m = await load(dir);
    const seq = m.createSequence();
    expect(seq.disposed).toBe(false);
    await m.dispose();
    expect(seq.disposed).toBe(true);
    await expect(seq.append([1, 2])).rejects.toThrow(DisposedError);
    // The error says the model went, not that the caller disposed the sequence it still holds.
    await expect(seq.append([1, 2])).rejects.toThrow(/^the model this sequence belongs to has been disposed$/);
    expect(() => seq.fork()).toThrow(/^the model this sequence belongs to has been disposed$/);
    const m2 = await load(dir);
    const own = m2.createSequence();
    own.dispose();
    await expect(own.append([1, 2])).rejects.toThrow(/^the sequence has been disposed$/);
    // Disposed between two tokens of its generation: the next step says so of the sequence.
    const gen = m2.createSequence();
    await gen.append([1, 2, 3]);
    const stream = gen.generate({ maxNewTokens: 12, ignoreEos: true });
    await stream.next();
    gen.dispose();
    await expect(stream.next()).rejects.toThrow(/^the sequence has been disposed$/);
    expect(m2.cacheStats().liveSequences).toBe(0);
    await m2.dispose();
  });

  test("a sequence disposed while its append() is in flight: DisposedError, and the call stops counting as in flight", async () => {
    const m = await load(dir);
    const inFlight = () => (m as unknown as { engine: { inFlight: number } }).engine.inFlight;
    const seq = m.createSequence();
    const appended = seq.append([5, 6, 7, 8]);
    seq.dispose();
    const e = await appended.catch((x) => x);
    expect(e).toBeInstanceOf(DisposedError);
    expect(e.message).toBe("the sequence has been disposed");
    expect(inFlight()).toBe(0);
    // A prompt alone afterwards is prefilled as one, by its own calls, not as rows of shared steps.
    await m.createSequence().append([1, 2, 3, 4, 5, 6]);
    expect(m.schedulerStats().promptTokens).toBe(0);
    // The model disposed instead: said of the model, as before the call.
    const other = m.createSequence();
    const pending = other.append([5, 6, 7, 8]);
    const disposed = m.dispose();
    await expect(pending).rejects.toThrow(/^the model this sequence belongs to has been disposed$/);
    await disposed;
  });

  test("a call the model's dispose() cuts short names the model, not a sequence the caller never had", async () => {
    const m = await load(dir);
    // Each has made its own sequence and reserved its pages when the model goes.
    const pending = [m.forward([1, 2, 3]), m.generate([1, 2, 3], { maxNewTokens: 2 }), m.streamMany([1, 2, 3], 2, { maxNewTokens: 2 })[0].next()];
    const disposed = m.dispose();
    for (const e of await Promise.all(pending.map((p) => p.catch((x) => x)))) {
      expect(e).toBeInstanceOf(DisposedError);
      expect(e.message).toBe("the model has been disposed");
    }
    await disposed;
  });

  test("dispose while a generation is in flight ends it with a typed error, not a crash", async () => {
    const m = await load(dir);
    const p = m.generate([1, 2, 3], { maxNewTokens: 12 }).catch((x) => x);
    await m.dispose();
    const r = await p;
    // Either the generation finished before dispose took effect, or it stopped with DisposedError.
    if (r instanceof Error) expect(r).toBeInstanceOf(LckvError);
    else expect(r.tokens.length).toBeGreaterThan(0);
  });
});
