/**
 * Tokenization through @huggingface/tokenizers, and chat templates through @huggingface/jinja.
 * This file only adapts them to lckv's API: it does not implement any tokenizer itself.
 */
import * as path from "node:path";
import { Template } from "@huggingface/jinja";
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { ConfigError, InvalidInputError, ModelLoadError } from "./errors";
import { modelFileExists, readJson, readJsonObject, readModelText } from "./model-files";
import { brief, describe } from "./options";

export interface ChatMessage {
  role: "system" | "user" | "assistant" | string;
  content: string;
}

/** The special tokens transformers hands a chat template by name (its special_tokens_map). */
const TEMPLATE_SPECIAL_TOKENS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] as const;

function tokenText(v: unknown): string | undefined {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") return (v as { content: string }).content;
  return undefined;
}

export class Tokenizer {
  readonly bosToken?: string;
  readonly eosToken?: string;
  readonly bosTokenId?: number;
  readonly eosTokenId?: number;
  readonly chatTemplate?: string;
  /** tokenizer_config.json's path (where a chat template would be). */
  private readonly configFile: string;
  /** The model directory (where chat_template.jinja would be). */
  private readonly templateDir: string;
  /** The file the chat template was read from. */
  private readonly templateSource: string;
  /** A list of named templates none of which is "default": their names. */
  private readonly templateNames?: string[];
  private readonly hf: HfTokenizer;
  private readonly template?: Template;
  /**
   * How a vocabulary piece stands for bytes (tokenBytes): GPT-2's byte-level alphabet; or its
   * text with SentencePiece's word mark (▁) for a space, and <0xNN> pieces for single bytes
   * where the decoder falls back to bytes; or, for other decoders, its text as decoded alone.
   */
  private readonly pieceBytes: { byteLevel: boolean; byteFallback: boolean; spaceMark?: string };
  /** Special added tokens: their bytes are their text's, as decode() gives it (none). */
  private readonly specialIds: Set<number>;
  /** The special tokens a chat template sees by name (those the model sets), as transformers gives them. */
  private readonly templateSpecials: Record<string, string>;

  /**
   * `templateFile`: a chat template read from a file of its own (chat_template.jinja, or
   * chat_template.json's chat_template), which replaces or stands in for config's.
   */
  private constructor(
    hf: HfTokenizer,
    config: Record<string, unknown>,
    file: string,
    json: Record<string, unknown> = {},
    templateFile?: { file: string; field: string; source: unknown; overrides: boolean },
  ) {
    this.hf = hf;
    const decoders = decoderTypes(json.decoder);
    this.pieceBytes = { byteLevel: decoders.includes("ByteLevel"), byteFallback: decoders.includes("ByteFallback"), spaceMark: spaceMark(json.decoder) };
    this.specialIds = new Set([...hf.get_added_tokens_decoder()].filter(([, t]) => t.special).map(([id]) => id));
    this.configFile = file;
    this.templateSource = file;
    this.bosToken = tokenText(config.bos_token);
    this.eosToken = tokenText(config.eos_token);
    // Only those the model sets, as transformers' special_tokens_map: `pad_token is defined` is
    // false for a model without one (and an undefined token renders as nothing).
    this.templateSpecials = Object.fromEntries(TEMPLATE_SPECIAL_TOKENS.flatMap((k) => (tokenText(config[k]) === undefined ? [] : [[k, tokenText(config[k])!]])));
    this.bosTokenId = this.bosToken !== undefined ? this.tokenToId(this.bosToken) : undefined;
    this.eosTokenId = this.eosToken !== undefined ? this.tokenToId(this.eosToken) : undefined;
    this.templateDir = path.dirname(file);
    let ct = config.chat_template;
    if (templateFile && (templateFile.overrides || ct === undefined || ct === null)) {
      if (typeof templateFile.source !== "string") {
        throw new ConfigError(templateFile.file, templateFile.field, `must be a string, got ${brief(templateFile.source)}`);
      }
      this.template = compileTemplate(templateFile.source, templateFile.file, templateFile.field);
      this.chatTemplate = templateFile.source;
      this.templateSource = templateFile.file;
      ct = undefined;
    }
    if (typeof ct === "string") {
      this.template = compileTemplate(ct, file, "chat_template");
      this.chatTemplate = ct;
    } else if (Array.isArray(ct)) {
      // Every named template is checked, not only "default": the file is broken either way, and
      // saying so at load beats failing on the day a caller picks another one.
      const compiled = ct.map((t, i) => {
        const entry = t as { name?: unknown; template?: unknown } | null;
        if (!entry || typeof entry !== "object" || Array.isArray(entry) || typeof entry.name !== "string" || typeof entry.template !== "string") {
          throw new ConfigError(file, `chat_template[${i}]`, `must be {name: string, template: string}, got ${brief(t)}`);
        }
        return { name: entry.name, source: entry.template, template: compileTemplate(entry.template, file, `chat_template[${i}].template`) };
      });
      const def = compiled.find((t) => t.name === "default");
      if (!def && compiled.length > 0) this.templateNames = compiled.map((t) => t.name);
      if (def?.source) {
        this.chatTemplate = def.source;
        this.template = def.template;
      }
    } else if (ct !== undefined && ct !== null) {
      throw new ConfigError(file, "chat_template", `must be a string or a list of {name, template}, got ${brief(ct)}`);
    }
  }

  /** Loads tokenizer.json (+ tokenizer_config.json when present) from a model directory. */
  static fromDirectory(dir: string): Tokenizer | undefined {
    const tj = path.join(dir, "tokenizer.json");
    if (!modelFileExists(tj)) return undefined;
    const tc = path.join(dir, "tokenizer_config.json");
    const json = readJson(tj);
    const config = modelFileExists(tc) ? readJsonObject(tc) : {};
    let hf: HfTokenizer;
    try {
      hf = new HfTokenizer(json as object, config);
    } catch (e) {
      throw new ModelLoadError(`${tj}: the tokenizer could not be built (${(e as Error).message})`, tj);
    }
    const specials = specialTokensMap(dir);
    return new Tokenizer(hf, { ...config, ...specials }, tc, json as Record<string, unknown>, templateFile(dir));
  }

  /** Text -> token ids. Special tokens (e.g. BOS) are added as the tokenizer's post-processor says. */
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== "string") throw new InvalidInputError("tokenizer.encode expects a string");
    return this.hf.encode(text, { add_special_tokens: options?.addSpecialTokens ?? true }).ids;
  }

  /** Token ids -> text; special tokens are skipped unless asked for. */
  decode(ids: readonly number[], options: { skipSpecialTokens?: boolean } = {}): string {
    // Checked here: the tokenizers library rejects these with a plain Error (and an empty list
    // too, which is simply no text).
    const list = Array.isArray(ids) || (ArrayBuffer.isView(ids) && !(ids instanceof DataView)) ? (ids as ArrayLike<unknown>) : undefined;
    const bad = list ? Array.prototype.findIndex.call(list, (x: unknown) => !isTokenId(x)) : -1;
    if (!list || bad >= 0) {
      const got = !list ? (typeof ids === "string" ? "a string (tokenizer.encode takes text)" : brief(ids)) : `${brief(list[bad])} at index ${bad}`;
      throw new InvalidInputError(`tokenizer.decode expects an array of token ids (non-negative integers), got ${got}`);
    }
    if (ids.length === 0) return "";
    return this.hf.decode([...ids], { skip_special_tokens: options?.skipSpecialTokens ?? true });
  }

  /**
   * The bytes a token stands for (OpenAI's logprobs `bytes`): a token that holds part of a
   * character (byte-level BPE, SentencePiece's <0xNN> byte fallback) gives its own bytes, not
   * the replacement character its text alone decodes to; and a SentencePiece word's leading
   * space is its own, which its text decoded alone loses (the decoder strips the space that
   * starts a text), so that a completion's tokens' bytes join into its text.
   */
  tokenBytes(id: number): number[] {
    if (!isTokenId(id)) throw new InvalidInputError(`tokenizer.tokenBytes expects a token id (a non-negative integer), got ${describe(id)}`);
    const piece = this.specialIds.has(id) ? undefined : this.hf.id_to_token(id);
    if (piece !== undefined) {
      const { byteLevel, byteFallback, spaceMark } = this.pieceBytes;
      if (byteLevel) {
        const bytes = [...piece].map((c) => BYTE_OF_CHAR.get(c));
        if (bytes.every((b) => b !== undefined)) return bytes as number[];
      }
      const m = byteFallback ? /^<0x([0-9A-Fa-f]{2})>$/.exec(piece) : null;
      if (m) return [parseInt(m[1], 16)];
      if (spaceMark) return [...Buffer.from(piece.split(spaceMark).join(" "), "utf8")];
    }
    return [...Buffer.from(this.decode([id]), "utf8")];
  }

  tokenToId(token: string): number | undefined {
    const ids = this.hf.encode(token, { add_special_tokens: false }).ids;
    return ids.length === 1 ? ids[0] : undefined;
  }

  /**
   * The token ids of a chat prompt: the messages through the chat template, ready for the
   * assistant's reply. The template holds any BOS itself, so no special tokens are added again.
   */
  encodeChat(messages: readonly ChatMessage[]): number[] {
    return this.encode(this.applyChatTemplate(messages, { addGenerationPrompt: true }), { addSpecialTokens: false });
  }

  /** Throws LCKV_NO_CHAT_TEMPLATE unless the tokenizer has a chat template. */
  requireChatTemplate(): void {
    if (!this.chatTemplate) {
      // Said so that it holds wherever chat was asked for: the API, lckv chat, /v1/chat/completions.
      const why = this.templateNames
        ? `${this.configFile}'s chat_template lists templates named ${this.templateNames.map((n) => JSON.stringify(n)).join(", ")}, none of them "default"`
        : `no chat_template in ${this.configFile}, and no chat_template.jinja in ${this.templateDir}`;
      throw new InvalidInputError(
        `this model has no chat template (${why}): give it plain text instead ` +
          "(generate() or stream(), lckv generate, POST /v1/completions)",
        "LCKV_NO_CHAT_TEMPLATE",
      );
    }
  }

  /** Renders messages with the tokenizer's chat template. */
  applyChatTemplate(messages: readonly ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): string {
    this.requireChatTemplate();
    checkChatMessages(messages);
    try {
      return this.template!.render({
        messages,
        add_generation_prompt: options?.addGenerationPrompt ?? true,
        ...this.templateSpecials,
      });
    } catch (e) {
      // The template parsed at load, so what fails now is these messages: a template's
      // raise_exception() (e.g. "roles must alternate") or an expression the messages break.
      throw new InvalidInputError(`the chat template rejected the messages: ${(e as Error)?.message ?? String(e)} (template in ${this.templateSource})`);
    }
  }
}

/**
 * A chat template in a file of its own, as newer Hugging Face repos ship it: chat_template.jinja
 * (transformers reads it in place of tokenizer_config.json's chat_template), else
 * chat_template.json's chat_template (a processor's file; it serves only where
 * tokenizer_config.json has none).
 */
function templateFile(dir: string): { file: string; field: string; source: unknown; overrides: boolean } | undefined {
  const jinja = path.join(dir, "chat_template.jinja");
  if (modelFileExists(jinja)) {
    return { file: jinja, field: "(template)", source: readModelText(jinja), overrides: true };
  }
  const json = path.join(dir, "chat_template.json");
  if (modelFileExists(json)) {
    const source = readJsonObject(json).chat_template;
    if (source !== undefined && source !== null) return { file: json, field: "chat_template", source, overrides: false };
  }
  return undefined;
}

/**
 * The special tokens of special_tokens_map.json, where it has them: transformers lets its values
 * replace tokenizer_config.json's, and older repos keep them there alone (a template's
 * {{ bos_token }} rendered as nothing without them).
 */
function specialTokensMap(dir: string): Record<string, unknown> {
  const file = path.join(dir, "special_tokens_map.json");
  if (!modelFileExists(file)) return {};
  const map = readJsonObject(file);
  const out: Record<string, unknown> = {};
  for (const key of TEMPLATE_SPECIAL_TOKENS) {
    const v = map[key];
    if (tokenText(v) !== undefined) out[key] = v;
  }
  return out;
}

/** Names the first message that is not { role: string, content: string }, and what it holds instead. */
function checkChatMessages(messages: unknown): void {
  const shape = "chat messages must be an array of { role: string, content: string }";
  if (!Array.isArray(messages)) throw new InvalidInputError(`${shape}, got ${brief(messages)}`);
  // Nothing to answer: the template would render its generation prompt alone.
  if (messages.length === 0) throw new InvalidInputError(`${shape}, with at least one message; got an empty array`);
  messages.forEach((m: unknown, i) => {
    if (!m || typeof m !== "object" || Array.isArray(m)) throw new InvalidInputError(`${shape}: messages[${i}] is ${brief(m)}`);
    for (const field of ["role", "content"] as const) {
      const v = (m as Record<string, unknown>)[field];
      if (typeof v !== "string") throw new InvalidInputError(`${shape}: messages[${i}].${field} must be a string, got ${brief(v)}`);
    }
  });
}

/** Parses a chat template now, so that a broken one is an error at load, not at the first chat(). */
function compileTemplate(source: string, file: string, field: string): Template {
  try {
    return new Template(source);
  } catch (e) {
    throw new ConfigError(file, field, `the Jinja template does not parse: ${(e as Error)?.message ?? String(e)}`);
  }
}

function isTokenId(x: unknown): boolean {
  return typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
}


/** GPT-2's byte-level alphabet: the character that stands for each byte, inverted. */
const BYTE_OF_CHAR: Map<string, number> = (() => {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const m = new Map<string, number>();
  let extra = 0;
  for (let b = 0; b < 256; b++) m.set(String.fromCodePoint(printable(b) ? b : 256 + extra++), b);
  return m;
})();

/**
 * The character a SentencePiece decoder turns into a space: a Replace step's pattern whose
 * content is " ", or Metaspace's replacement (undefined for other decoders).
 */
function spaceMark(decoder: unknown): string | undefined {
  if (!decoder || typeof decoder !== "object") return undefined;
  const d = decoder as { type?: unknown; decoders?: unknown; pattern?: { String?: unknown }; content?: unknown; replacement?: unknown };
  if (Array.isArray(d.decoders)) return d.decoders.map(spaceMark).find((m) => m !== undefined);
  if (d.type === "Replace" && d.content === " " && typeof d.pattern?.String === "string" && d.pattern.String !== "") return d.pattern.String;
  if (d.type === "Metaspace" && typeof d.replacement === "string" && d.replacement !== "") return d.replacement;
  return undefined;
}

/** The types of a tokenizer.json decoder, a Sequence's included. */
function decoderTypes(decoder: unknown): string[] {
  if (!decoder || typeof decoder !== "object") return [];
  const d = decoder as { type?: unknown; decoders?: unknown };
  const inner = Array.isArray(d.decoders) ? d.decoders.flatMap(decoderTypes) : [];
  return typeof d.type === "string" ? [d.type, ...inner] : inner;
}
