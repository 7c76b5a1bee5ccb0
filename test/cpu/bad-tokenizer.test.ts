/**
 * Malformed tokenizer input and generation_config.json get typed errors naming the file, field
 * or argument: chat templates are checked at load and fail typed at render, decode() checks its
 * ids, and generation_config.json's sampling fields are validated.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { ConfigError, ContextOverflowError, DEFAULT_MODEL_DIR, InvalidInputError, LckvError, loadModel, Tokenizer } from "../../lib";
import { parseGenerationConfig } from "../../lib/generation-config";
import { testTempDir } from "../helpers/temp-dir";

process.env.LCKV_QUIET = "1";
const baseTokenizerConfig = JSON.parse(fs.readFileSync(path.join(DEFAULT_MODEL_DIR, "tokenizer_config.json"), "utf8"));
const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

/** A copy of the default model whose tokenizer_config.json has this chat_template. */
function modelWithTemplate(chatTemplate: unknown): string {
  const dir = testTempDir("lckv-bad-tok-");
  dirs.push(dir);
  for (const f of ["config.json", "generation_config.json", "tokenizer.json"]) {
    fs.copyFileSync(path.join(DEFAULT_MODEL_DIR, f), path.join(dir, f));
  }
  fs.symlinkSync(path.resolve(DEFAULT_MODEL_DIR, "model.safetensors"), path.join(dir, "model.safetensors"));
  fs.writeFileSync(path.join(dir, "tokenizer_config.json"), JSON.stringify({ ...baseTokenizerConfig, chat_template: chatTemplate }));
  return dir;
}

/** The error fn throws (failing the test when it throws none). */
function thrown(fn: () => unknown): any {
  try {
    fn();
  } catch (e) {
    return e;
  }
  throw new Error("expected an error, none was thrown");
}

const CHAT = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
const hello = [{ role: "user", content: "Hello" }];

describe("chat_template in tokenizer_config.json", () => {
  test("a well-formed template (string, or a list with a default) loads and renders", () => {
    const t = Tokenizer.fromDirectory(modelWithTemplate(CHAT))!;
    expect(t.applyChatTemplate(hello)).toBe("<|user|>Hello<|assistant|>");
    const listed = Tokenizer.fromDirectory(modelWithTemplate([{ name: "tool_use", template: "x" }, { name: "default", template: CHAT }]))!;
    expect(listed.chatTemplate).toBe(CHAT);
    expect(listed.applyChatTemplate(hello, { addGenerationPrompt: false })).toBe("<|user|>Hello");
  });

  test("a template with a syntax error is a ConfigError at load, naming the file and field", () => {
    for (const bad of ["{% for m in messages %}{{ m.content ", "{% for m in messages %}{{ m.content }"]) {
      const dir = modelWithTemplate(bad);
      const e = thrown(() => Tokenizer.fromDirectory(dir));
      expect(e).toBeInstanceOf(ConfigError);
      expect(e.file).toBe(path.join(dir, "tokenizer_config.json"));
      expect(e.field).toBe("chat_template");
      expect(e.message).toMatch(/tokenizer_config\.json: field 'chat_template': the Jinja template does not parse/);
    }
  });

  test("a chat_template of the wrong shape is a ConfigError naming the entry", () => {
    const cases: [unknown, string, RegExp][] = [
      [5, "chat_template", /must be a string or a list of \{name, template\}, got 5/],
      [{ default: CHAT }, "chat_template", /must be a string or a list/],
      [[null, 5, { name: "default", template: 7 }], "chat_template[0]", /must be \{name: string, template: string\}, got null/],
      [[{ name: "default", template: 7 }], "chat_template[0]", /got \{"name":"default","template":7\}/],
      [[{ name: "default", template: CHAT }, "x"], "chat_template[1]", /must be \{name: string, template: string\}/],
      [[{ template: CHAT }], "chat_template[0]", /must be \{name: string, template: string\}/],
    ];
    for (const [ct, field, msg] of cases) {
      const e = thrown(() => Tokenizer.fromDirectory(modelWithTemplate(ct)));
      expect(e).toBeInstanceOf(ConfigError);
      expect(e.field).toBe(field);
      expect(e.message).toMatch(msg);
    }
  });

  test("a list without a template named default: chat is refused saying so, not that there is no chat_template", () => {
    const dir = modelWithTemplate([{ name: "tool_use", template: CHAT }, { name: "rag", template: CHAT }]);
    const e = thrown(() => Tokenizer.fromDirectory(dir)!.applyChatTemplate(hello));
    expect(e.code).toBe("LCKV_NO_CHAT_TEMPLATE");
    expect(e.message).toContain(`${path.join(dir, "tokenizer_config.json")}'s chat_template lists templates named "tool_use", "rag", none of them "default"`);
  });

  test("every named template in a list is parsed at load, not only the default", () => {
    const e = thrown(() => Tokenizer.fromDirectory(modelWithTemplate([{ name: "default", template: CHAT }, { name: "rag", template: "{% if %}" }])));
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.field).toBe("chat_template[1].template");
  });

  test("loadModel rejects a broken template with the ConfigError", async () => {
    await expect(loadModel(modelWithTemplate("{{ messages "), { device: "cpu" })).rejects.toThrow(ConfigError);
  });

  test("a template's raise_exception() is an InvalidInputError keeping its message", () => {
    const t = Tokenizer.fromDirectory(modelWithTemplate("{% if messages[0].role != 'system' %}{{ raise_exception('roles must alternate') }}{% endif %}ok"))!;
    expect(t.applyChatTemplate([{ role: "system", content: "be brief" }])).toBe("ok");
    const e = thrown(() => t.applyChatTemplate(hello));
    expect(e).toBeInstanceOf(InvalidInputError);
    expect(e.code).toBe("LCKV_INVALID_INPUT");
    expect(e.message).toMatch(/chat template rejected the messages: roles must alternate/);
  });

  test("any other failure while rendering is an InvalidInputError too", () => {
    const t = Tokenizer.fromDirectory(modelWithTemplate("{{ messages[0].content.nope() }}"))!;
    const e = thrown(() => t.applyChatTemplate(hello));
    expect(e).toBeInstanceOf(InvalidInputError);
    expect(e.message).toMatch(/chat template rejected the messages: .+/);
  });

  test("messages of the wrong shape are an InvalidInputError naming the message and field at fault", () => {
    const t = Tokenizer.fromDirectory(modelWithTemplate(CHAT))!;
    const cases: [unknown, RegExp][] = [
      ["Hello", /array of \{ role: string, content: string \}, got "Hello"/],
      [[null], /messages\[0\] is null/],
      [[{ role: "user", content: "a" }, { content: "b" }], /messages\[1\]\.role must be a string, got undefined/],
      [[{ role: "user", content: [{ type: "text", text: "hi" }] }], /messages\[0\]\.content must be a string, got \[\{"type":"text"/],
      [[{ role: "user", content: "a" }, { role: "assistant", content: 5 }], /messages\[1\]\.content must be a string, got 5/],
      // Nothing to answer (the server refuses an empty messages array too).
      [[], /with at least one message; got an empty array/],
    ];
    for (const [messages, msg] of cases) {
      const e = thrown(() => t.applyChatTemplate(messages as never));
      expect(e).toBeInstanceOf(InvalidInputError);
      expect(e.code).toBe("LCKV_INVALID_INPUT");
      expect(e.message).toMatch(msg);
    }
  });

  test("chat() on a model whose template raises rejects with the InvalidInputError", async () => {
    const model = await loadModel(modelWithTemplate("{{ raise_exception('roles must alternate') }}"), { device: "cpu" });
    try {
      await expect(model.chat(hello, { maxNewTokens: 2 })).rejects.toThrow(InvalidInputError);
      await expect(model.chat(hello, { maxNewTokens: 2 })).rejects.toThrow(/roles must alternate/);
    } finally {
      await model.dispose();
    }
  });
});

describe("a chat template in a file of its own", () => {
  /** A copy of the default model whose tokenizer_config.json has `config`'s fields, with these files beside it. */
  function modelWithFiles(config: Record<string, unknown>, files: Record<string, string>): string {
    const dir = modelWithTemplate(undefined);
    fs.writeFileSync(path.join(dir, "tokenizer_config.json"), JSON.stringify({ ...baseTokenizerConfig, ...config }));
    for (const [name, text] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), text);
    return dir;
  }

  test("chat_template.jinja (as newer Hugging Face repos ship it) is the template, over one in tokenizer_config.json", async () => {
    const t = Tokenizer.fromDirectory(modelWithFiles({}, { "chat_template.jinja": CHAT }))!;
    expect(t.chatTemplate).toBe(CHAT);
    expect(t.applyChatTemplate(hello)).toBe("<|user|>Hello<|assistant|>");
    // transformers lets the file replace the config's template.
    const both = Tokenizer.fromDirectory(modelWithFiles({ chat_template: "old" }, { "chat_template.jinja": CHAT }))!;
    expect(both.applyChatTemplate(hello)).toBe("<|user|>Hello<|assistant|>");
    const model = await loadModel(modelWithFiles({}, { "chat_template.jinja": CHAT }), { device: "cpu" });
    try {
      const r = await model.chat(hello, { maxNewTokens: 2 });
      expect(r.usage.promptTokens).toBe(model.tokenizer!.encodeChat(hello).length);
    } finally {
      await model.dispose();
    }
  });

  test("chat_template.json's chat_template serves where neither tokenizer_config.json nor chat_template.jinja has one", () => {
    const t = Tokenizer.fromDirectory(modelWithFiles({}, { "chat_template.json": JSON.stringify({ chat_template: CHAT }) }))!;
    expect(t.applyChatTemplate(hello)).toBe("<|user|>Hello<|assistant|>");
    const config = Tokenizer.fromDirectory(modelWithFiles({ chat_template: CHAT }, { "chat_template.json": JSON.stringify({ chat_template: "other" }) }))!;
    expect(config.applyChatTemplate(hello)).toBe("<|user|>Hello<|assistant|>");
  });

  test("a template file that does not parse is a ConfigError naming it", () => {
    const dir = modelWithFiles({}, { "chat_template.jinja": "{% for m in messages %}" });
    const e = thrown(() => Tokenizer.fromDirectory(dir));
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.file).toBe(path.join(dir, "chat_template.jinja"));
    expect(e.message).toMatch(/the Jinja template does not parse/);
    // One that raises while rendering names its file too, where the template came from.
    const raising = modelWithFiles({ chat_template: CHAT }, { "chat_template.jinja": "{{ raise_exception('no system role') }}" });
    const r = thrown(() => Tokenizer.fromDirectory(raising)!.applyChatTemplate(hello));
    expect(r).toBeInstanceOf(InvalidInputError);
    expect(r.message).toBe(`the chat template rejected the messages: no system role (template in ${path.join(raising, "chat_template.jinja")})`);
    const json = modelWithFiles({}, { "chat_template.json": JSON.stringify({ chat_template: 5 }) });
    const j = thrown(() => Tokenizer.fromDirectory(json));
    expect(j).toBeInstanceOf(ConfigError);
    expect(j.file).toBe(path.join(json, "chat_template.json"));
    expect(j.field).toBe("chat_template");
  });

  test("a model with no template anywhere says where it looked", () => {
    const dir = modelWithFiles({}, {});
    const e = thrown(() => Tokenizer.fromDirectory(dir)!.applyChatTemplate(hello));
    expect(e.code).toBe("LCKV_NO_CHAT_TEMPLATE");
    expect(e.message).toContain(`no chat_template in ${path.join(dir, "tokenizer_config.json")}`);
    expect(e.message).toContain("chat_template.jinja");
  });
});

describe("special tokens in special_tokens_map.json", () => {
  test("bos_token and eos_token come from special_tokens_map.json where tokenizer_config.json lacks them, as transformers reads them", () => {
    const dir = modelWithTemplate("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}");
    const config = { ...baseTokenizerConfig, chat_template: "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}" };
    delete config.bos_token;
    delete config.eos_token;
    fs.writeFileSync(path.join(dir, "tokenizer_config.json"), JSON.stringify(config));
    fs.writeFileSync(path.join(dir, "special_tokens_map.json"), JSON.stringify({ bos_token: { content: "<|bos|>", lstrip: false }, eos_token: "<|eos|>" }));
    const t = Tokenizer.fromDirectory(dir)!;
    expect([t.bosToken, t.bosTokenId, t.eosToken, t.eosTokenId]).toEqual(["<|bos|>", 0, "<|eos|>", 1]);
    expect(t.applyChatTemplate(hello)).toBe("<|bos|>Hello<|eos|>");
  });

  test("a template sees every special token transformers hands it (pad_token, unk_token, ...), from either file; one the model lacks is undefined", () => {
    const template =
      "{{ bos_token }}|{{ pad_token }}|{{ unk_token }}|{{ sep_token }}|{{ cls_token }}|{{ mask_token }}|{% if mask_token is defined %}M{% else %}no mask{% endif %}|{% for m in messages %}{{ m.content }}{% endfor %}";
    const dir = modelWithTemplate(template);
    fs.writeFileSync(path.join(dir, "tokenizer_config.json"), JSON.stringify({ ...baseTokenizerConfig, chat_template: template, pad_token: "<|pad|>" }));
    fs.writeFileSync(path.join(dir, "special_tokens_map.json"), JSON.stringify({ unk_token: { content: "<|unk|>" }, sep_token: "<|sep|>" }));
    const t = Tokenizer.fromDirectory(dir)!;
    expect(t.applyChatTemplate(hello)).toBe(`${t.bosToken}|<|pad|>|<|unk|>|<|sep|>|||no mask|Hello`);
  });
});

describe("a conversation far longer than the context", () => {
  test("is refused from its rendered text's first characters, by chat(), a chat session and the server's route", async () => {
    const model = await loadModel(modelWithTemplate(CHAT), { device: "cpu" });
    try {
      const long = [{ role: "user", content: "word ".repeat(200_000) }];
      const far = /has more than \d+ tokens \(\d+ in its first \d+ of \d+ characters\)/;
      const e = await model.chat(long, { maxNewTokens: 1 }).catch((x) => x);
      expect(e).toBeInstanceOf(ContextOverflowError);
      expect(e.message).toMatch(far);
      expect(() => model.chatTokenIds(long)).toThrow(far);
      using session = model.createChatSession();
      const s = await session.send(long[0].content).next().catch((x) => x);
      expect(s).toBeInstanceOf(ContextOverflowError);
      expect(s.message).toMatch(/^conversation has more than/);
      // A conversation within the context renders as before.
      expect(model.chatTokenIds(hello)).toEqual(model.tokenizer!.encodeChat(hello));
    } finally {
      await model.dispose();
    }
  });

  test("more messages than the context holds tokens are served where they render to fewer (a template with no markup), refused where they render to more", async () => {
    const model = await loadModel(modelWithTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"), { device: "cpu" });
    try {
      const ctx = model.maxContext;
      const few = Array.from({ length: ctx + 44 }, (_, i) => ({ role: "user", content: i % 2 === 0 ? " th" : "e" }));
      const ids = model.chatTokenIds(few);
      expect(ids.length).toBeLessThan(ctx);
      expect(ids).toEqual(model.tokenizer!.encode(`${few.map((m) => m.content).join("")}`, { addSpecialTokens: true }));
      const many = Array.from({ length: 4 * ctx }, () => ({ role: "user", content: " the" }));
      const e = thrown(() => model.chatTokenIds(many));
      expect(e).toBeInstanceOf(ContextOverflowError);
      expect(e.inputTokens.atLeast).toBe(true);
      expect(e.inputTokens.count).toBeGreaterThan(ctx);
    } finally {
      await model.dispose();
    }
  });
});

describe("a model without a chat template", () => {
  test("chat() names the file that lacks it and what to use instead, in the API, the CLI's and the server's terms", async () => {
    const model = await loadModel(DEFAULT_MODEL_DIR, { device: "cpu" });
    try {
      const e = await model.chat(hello, { maxNewTokens: 2 }).catch((x) => x);
      expect(e).toBeInstanceOf(InvalidInputError);
      expect(e.code).toBe("LCKV_NO_CHAT_TEMPLATE");
      expect(e.message).toContain(`no chat_template in ${path.join(DEFAULT_MODEL_DIR, "tokenizer_config.json")}`);
      expect(e.message).toMatch(/generate\(\).*lckv generate.*\/v1\/completions/);
      // A chat session fails when it is made, not at its first send(), and holds no sequence.
      const live = model.cacheStats().liveSequences;
      expect(() => model.createChatSession()).toThrow(expect.objectContaining({ code: "LCKV_NO_CHAT_TEMPLATE" }));
      expect(model.cacheStats().liveSequences).toBe(live);
    } finally {
      await model.dispose();
    }
  });
});

describe("tokenizer.decode", () => {
  const t = Tokenizer.fromDirectory(DEFAULT_MODEL_DIR)!;

  test("tokenBytes: a token that holds part of a character gives its own bytes (byte-level BPE)", () => {
    for (const text of ["😀", "héllo wörld", "日本語のテキスト", "plain words"]) {
      const ids = t.encode(text, { addSpecialTokens: false });
      const bytes = ids.flatMap((id) => t.tokenBytes(id));
      expect(Buffer.from(bytes).toString("utf8")).toBe(text);
    }
    // An emoji's four bytes come as tokens of their own here: none is U+FFFD's bytes.
    const emoji = t.encode("😀", { addSpecialTokens: false });
    expect(emoji.map((id) => t.tokenBytes(id))).toEqual([[240], [159], [152], [128]]);
    // A special token decodes to nothing, and so are its bytes.
    expect(t.tokenBytes(t.eosTokenId!)).toEqual([]);
    // What is no token id is said so by this method's name.
    for (const bad of [NaN, -1, 1.5]) expect(() => t.tokenBytes(bad)).toThrow(/^tokenizer\.tokenBytes expects a token id \(a non-negative integer\), got (NaN|-1|1\.5)$/);
  });

  test("tokenBytes: SentencePiece pieces keep their word's space, and <0xNN> pieces are their byte", () => {
    // Llama's tokenizer.json shape: BPE with byte fallback, ▁ for a space, a decoder that strips
    // the space starting a text (so a word decoded alone loses its own).
    const vocab: Record<string, number> = { "<unk>": 0, "<s>": 1, "</s>": 2 };
    for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`] = 3 + b;
    for (const p of ["▁", "a", "b", "▁a", "ab"]) vocab[p] = Object.keys(vocab).length;
    const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
    const dir = testTempDir("lckv-sp-");
    dirs.push(dir);
    fs.writeFileSync(
      path.join(dir, "tokenizer.json"),
      JSON.stringify({
        version: "1.0",
        added_tokens: [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        normalizer: { type: "Sequence", normalizers: [{ type: "Prepend", prepend: "▁" }, { type: "Replace", pattern: { String: " " }, content: "▁" }] },
        pre_tokenizer: null,
        post_processor: null,
        decoder: {
          type: "Sequence",
          decoders: [{ type: "Replace", pattern: { String: "▁" }, content: " " }, { type: "ByteFallback" }, { type: "Fuse" }, { type: "Strip", content: " ", start: 1, stop: 0 }],
        },
        model: { type: "BPE", dropout: null, unk_token: "<unk>", fuse_unk: true, byte_fallback: true, vocab, merges: ["▁ a", "a b"] },
      }),
    );
    fs.writeFileSync(path.join(dir, "tokenizer_config.json"), JSON.stringify({ bos_token: "<s>", eos_token: "</s>" }));
    const sp = Tokenizer.fromDirectory(dir)!;
    for (const text of ["ab é", "a😀b a"]) {
      const ids = sp.encode(text, { addSpecialTokens: false });
      expect(sp.decode(ids)).toBe(text);
      // The tokens' bytes join into the text with the space its first piece carries (the
      // normalizer's ▁), however the text splits.
      expect(Buffer.from(ids.flatMap((id) => sp.tokenBytes(id))).toString("utf8")).toBe(" " + text);
    }
    // é is not in the vocabulary: its two bytes come as <0xC3> <0xA9>, each alone U+FFFD as text.
    const e = sp.encode("é", { addSpecialTokens: false });
    expect(e.map((id) => sp.tokenBytes(id))).toEqual([[0x20], [0xc3], [0xa9]]);
    expect(sp.decode([e[1]])).toBe("\ufffd");
    // A word's piece keeps its space; decoded alone, its text does not.
    const word = vocab["▁a"];
    expect(sp.tokenBytes(word)).toEqual([0x20, 0x61]);
    expect(sp.decode([word])).toBe("a");
    expect(sp.tokenBytes(sp.eosTokenId!)).toEqual([]);
  });

  test("an empty list decodes to the empty string", () => {
    expect(t.decode([])).toBe("");
    expect(t.decode([], { skipSpecialTokens: false })).toBe("");
  });

  test("token ids still decode as before, from an array or an integer typed array", () => {
    const ids = t.encode("Once upon a time", { addSpecialTokens: false });
    expect(t.decode(ids)).toBe("Once upon a time");
    expect(t.decode(Int32Array.from(ids) as unknown as number[])).toBe("Once upon a time");
  });

  test("ids that are not a list of non-negative integers are an InvalidInputError saying what was expected", () => {
    const cases: [unknown, RegExp][] = [
      ["abc", /got a string/],
      [null, /got null/],
      [undefined, /got undefined/],
      [5, /got 5/],
      [{ 0: 1, length: 1 }, /got \{/],
      [[1, 2.5], /got 2\.5 at index 1/],
      [[1, -1], /got -1 at index 1/],
      [[NaN], /at index 0/],
      [[1, "2"], /got "2" at index 1/],
      [[1, undefined], /at index 1/],
    ];
    for (const [ids, msg] of cases) {
      const e = thrown(() => t.decode(ids as number[]));
      expect(e).toBeInstanceOf(InvalidInputError);
      expect(e.message).toMatch(/tokenizer\.decode expects an array of token ids \(non-negative integers\)/);
      expect(e.message).toMatch(msg);
    }
  });
});

describe("generation_config.json (parseGenerationConfig)", () => {
  const file = "/models/x/generation_config.json";
  const parse = (raw: unknown) => parseGenerationConfig(raw, file);
  const fieldError = (raw: unknown, field: string, msg: RegExp) => {
    const e = thrown(() => parse(raw));
    expect(e).toBeInstanceOf(ConfigError);
    expect(e).toBeInstanceOf(LckvError);
    expect(e.file).toBe(file);
    expect(e.field).toBe(field);
    expect(e.message).toContain(`${file}: field '${field}': `);
    expect(e.message).toMatch(msg);
  };

  test("the shipped default's generation_config.json, an empty one, and unknown keys pass", () => {
    const shipped = JSON.parse(fs.readFileSync(path.join(DEFAULT_MODEL_DIR, "generation_config.json"), "utf8"));
    expect(parse(shipped)).toEqual(shipped);
    expect(parse({})).toEqual({});
    const hf = { _from_model_config: true, transformers_version: "4.44.0", max_length: 4096, num_beams: 1, do_sample: false, eos_token_id: [1, 2], pad_token_id: 0 };
    expect(parse(hf)).toEqual(hf);
  });

  test("null means absent for every field", () => {
    const nulls = { do_sample: null, max_new_tokens: null, temperature: null, top_k: null, top_p: null, min_p: null, repetition_penalty: null, eos_token_id: null, bos_token_id: null, pad_token_id: null };
    expect(parse(nulls)).toEqual(nulls);
  });

  test("boundary values that are valid pass", () => {
    expect(() => parse({ temperature: 0, top_k: 0, top_p: 1, min_p: 0, max_new_tokens: 1, repetition_penalty: 0.5 })).not.toThrow();
    expect(() => parse({ top_k: 2 ** 31 - 1, top_p: 1e-9, min_p: 1, eos_token_id: 0, bos_token_id: [0] })).not.toThrow();
  });

  test("a root that is not an object", () => {
    fieldError(null, "(root)", /must be a JSON object, got null/);
    fieldError([1, 2], "(root)", /must be a JSON object, got an array/);
    fieldError(5, "(root)", /must be a JSON object, got 5/);
    fieldError("x", "(root)", /must be a JSON object/);
  });

  test("do_sample must be a boolean", () => {
    fieldError({ do_sample: "true" }, "do_sample", /must be true or false, got "true"/);
    fieldError({ do_sample: 1 }, "do_sample", /must be true or false, got 1/);
  });

  test("max_new_tokens must be a positive integer", () => {
    fieldError({ max_new_tokens: 0 }, "max_new_tokens", /must be an integer in \[1, 2147483647\], got 0/);
    fieldError({ max_new_tokens: -5 }, "max_new_tokens", /got -5/);
    fieldError({ max_new_tokens: 2.5 }, "max_new_tokens", /got 2\.5/);
    fieldError({ max_new_tokens: "64" }, "max_new_tokens", /must be a finite number, got "64"/);
    fieldError({ max_new_tokens: 2 ** 31 }, "max_new_tokens", /got 2147483648/);
  });

  test("temperature must be finite and >= 0", () => {
    fieldError({ temperature: -0.1 }, "temperature", /must be >= 0, got -0\.1/);
    fieldError({ temperature: Infinity }, "temperature", /must be a finite number/);
    fieldError({ temperature: NaN }, "temperature", /must be a finite number/);
    fieldError({ temperature: "hot" }, "temperature", /must be a finite number, got "hot"/);
  });

  test("top_k must be a non-negative integer within int32", () => {
    fieldError({ top_k: -1 }, "top_k", /must be an integer in \[0, 2147483647\], got -1/);
    fieldError({ top_k: 2 ** 31 }, "top_k", /got 2147483648/);
    fieldError({ top_k: 1.5 }, "top_k", /got 1\.5/);
  });

  test("top_p must be in (0, 1] and min_p in [0, 1]", () => {
    fieldError({ top_p: 0 }, "top_p", /must be in \(0, 1\], got 0/);
    fieldError({ top_p: 1.01 }, "top_p", /got 1\.01/);
    fieldError({ top_p: -0.5 }, "top_p", /got -0\.5/);
    fieldError({ min_p: -0.01 }, "min_p", /must be in \[0, 1\], got -0\.01/);
    fieldError({ min_p: 2 }, "min_p", /got 2/);
    fieldError({ min_p: true }, "min_p", /must be a finite number, got true/);
  });

  test("repetition_penalty must be finite and > 0", () => {
    fieldError({ repetition_penalty: 0 }, "repetition_penalty", /must be > 0, got 0/);
    fieldError({ repetition_penalty: -1.1 }, "repetition_penalty", /got -1\.1/);
    fieldError({ repetition_penalty: Infinity }, "repetition_penalty", /must be a finite number/);
    fieldError({ repetition_penalty: 1e-40 }, "repetition_penalty", /f32's normal range/);
  });

  test("eos/bos/pad_token_id must be a token id or a list of token ids", () => {
    for (const k of ["eos_token_id", "bos_token_id", "pad_token_id"]) {
      fieldError({ [k]: "1" }, k, /must be a token id \(a non-negative integer\) or a list of token ids, got "1"/);
      fieldError({ [k]: 1.5 }, k, /got 1\.5/);
      if (k !== "pad_token_id") fieldError({ [k]: -1 }, k, /got -1/);
      fieldError({ [k]: [1, "2"] }, k, /got \[1,"2"\]/);
      fieldError({ [k]: [1, null] }, k, /got \[1,null\]/);
      fieldError({ [k]: { id: 1 } }, k, /got \{"id":1\}/);
    }
  });

  test("pad_token_id may be negative (older Llama files use -1; lckv never reads it)", () => {
    expect(parse({ pad_token_id: -1 })).toEqual({ pad_token_id: -1 });
  });

  test("a long bad value is cut short in the message", () => {
    const e = thrown(() => parse({ eos_token_id: [...Array(500).fill(1), -1] }));
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.message.length).toBeLessThan(250);
    expect(e.message).toMatch(/\.\.\.$/);
  });
});

test("loadModel checks generation_config.json: a bad field is a ConfigError naming the file and the field", async () => {
  const dir = modelWithTemplate(undefined);
  fs.writeFileSync(path.join(dir, "generation_config.json"), JSON.stringify({ do_sample: true, temperature: -1 }));
  const e = await loadModel(dir, { device: "cpu" }).then(
    () => null,
    (err) => err,
  );
  expect(e).toBeInstanceOf(ConfigError);
  expect(e.message).toContain(path.join(dir, "generation_config.json"));
  expect(e.message).toContain("'temperature'");
});
