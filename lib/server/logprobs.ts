/**
 * Log-probabilities in OpenAI's two shapes: chat's list of `{token, logprob, bytes, top_logprobs}`
 * and the legacy completions' parallel arrays (`tokens`, `token_logprobs`, `top_logprobs`,
 * `text_offset`). lckv reports token ids; each becomes the text it decodes to alone.
 */
import type { Tokenizer } from "../tokenizer";
import type { StreamChunk } from "../types";

export interface ChatTokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top_logprobs: { token: string; logprob: number; bytes: number[] }[];
}

export interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: number[];
  top_logprobs: Record<string, number>[];
  text_offset: number[];
}

/** Token id -> text, decoded once per id. */
export class TokenTexts {
  private readonly cache = new Map<number, string>();

  constructor(private readonly tokenizer: Tokenizer | undefined) {}

  text(id: number): string {
    let t = this.cache.get(id);
    if (t === undefined) {
      t = this.tokenizer ? this.tokenizer.decode([id]) : `<${id}>`;
      this.cache.set(id, t);
    }
    return t;
  }

  bytes(id: number): number[] {
    return [...Buffer.from(this.text(id), "utf8")];
  }
}

/** A chunk's entry of chat's `logprobs.content`, or undefined when it carries none. */
export function chatLogprob(texts: TokenTexts, c: StreamChunk): ChatTokenLogprob | undefined {
  if (c.token === null || c.logprob === undefined) return undefined;
  return {
    token: texts.text(c.token),
    logprob: c.logprob,
    bytes: texts.bytes(c.token),
    top_logprobs: (c.topLogprobs ?? []).map((t) => ({ token: texts.text(t.token), logprob: t.logprob, bytes: texts.bytes(t.token) })),
  };
}

/** Gathers a completion's log-probabilities in the completions endpoint's shape. */
export class CompletionLogprobsBuilder {
  readonly value: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };

  constructor(private readonly texts: TokenTexts) {}

  /** Adds a chunk's token; `offset` is where its text starts in the completion. Returns what it added. */
  add(c: StreamChunk, offset: number): CompletionLogprobs | undefined {
    if (c.token === null || c.logprob === undefined) return undefined;
    const top: Record<string, number> = {};
    for (const t of c.topLogprobs ?? []) top[this.texts.text(t.token)] = t.logprob;
    const one = { tokens: [this.texts.text(c.token)], token_logprobs: [c.logprob], top_logprobs: [top], text_offset: [offset] };
    this.value.tokens.push(...one.tokens);
    this.value.token_logprobs.push(...one.token_logprobs);
    this.value.top_logprobs.push(...one.top_logprobs);
    this.value.text_offset.push(...one.text_offset);
    return one;
  }
}
