/**
 * Log-probabilities in OpenAI's two shapes: chat's list of `{token, logprob, bytes, top_logprobs}`
 * and the legacy completions' parallel arrays (`tokens`, `token_logprobs`, `top_logprobs`,
 * `text_offset`). lckv reports token ids; each becomes the text it decodes to alone. Both report
 * the tokens of the text the answer returns (see ReportedTokens).
 */
import { TEXT_CONTEXT_TOKENS, TextStream } from "../textstream";
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

  constructor(readonly tokenizer: Tokenizer | undefined) {}

  text(id: number): string {
    let t = this.cache.get(id);
    if (t === undefined) {
      t = this.tokenizer ? this.tokenizer.decode([id]) : `<${id}>`;
      this.cache.set(id, t);
    }
    return t;
  }

  bytes(id: number): number[] {
    return this.tokenizer ? this.tokenizer.tokenBytes(id) : [...Buffer.from(this.text(id), "utf8")];
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

/** A token's entry, and the offset in the completion's text where the token's text begins. */
interface Placed<T> {
  entry: T;
  offset: number;
}

/**
 * Which tokens of a completion have their log-probabilities reported, and where each token's
 * text begins. lckv's chunks carry text as it is released: a tail that could begin a stop string
 * is held back until it cannot, and a stop string is cut with all that follows it. So the text
 * released so far lags the tokens, and the tokens that made up a stop string may have no text in
 * the answer at all. The offsets come from decoding the tokens again without stop strings, after
 * the same prompt tokens the generation decodes them after; an entry is handed out once some of
 * its token's text has been released, and never when a stop string cut the text before it, as
 * OpenAI reports the log-probabilities of the returned text only (a token the cut splits keeps
 * its entry: part of its text is there).
 */
class ReportedTokens<T> {
  private readonly decoded: TextStream;
  private readonly tokens: number[] = [];
  /** Characters of the completion's text released so far. */
  private released = 0;
  /** Entries whose token's text has not been released (yet), in order. */
  private waiting: Placed<T>[] = [];

  constructor(
    private readonly entry: (c: StreamChunk) => T | undefined,
    tokenizer: Tokenizer | undefined,
    prompt: readonly number[],
  ) {
    this.decoded = new TextStream((ids) => (tokenizer ? tokenizer.decode(ids) : ""), [], prompt.slice(-TEXT_CONTEXT_TOKENS));
  }

  /** A chunk of the completion: returns the entries that now have text in the answer, in order. */
  chunk(c: StreamChunk): Placed<T>[] {
    const entry = this.entry(c);
    if (c.token !== null) {
      const offset = this.decoded.value.length;
      this.tokens.push(c.token);
      this.decoded.push(this.tokens);
      if (entry !== undefined) this.waiting.push({ entry, offset });
    }
    this.released += c.text.length;
    let n = 0;
    while (n < this.waiting.length && this.waiting[n].offset < this.released) n++;
    return this.waiting.splice(0, n);
  }

  /**
   * The completion ended: the entries still waiting unless a stop string cut the text before
   * them. (Without a cut, those are tokens whose text is empty, at the text's end.)
   */
  end(): Placed<T>[] {
    this.decoded.flush();
    const left = this.waiting;
    this.waiting = [];
    return this.decoded.value.length > this.released ? [] : left;
  }
}

/** A completion's entries of chat's `logprobs.content`, as they come to have text in the answer. */
export class ChatLogprobs {
  readonly content: ChatTokenLogprob[] = [];
  private readonly reported: ReportedTokens<ChatTokenLogprob>;

  constructor(texts: TokenTexts, prompt: readonly number[]) {
    this.reported = new ReportedTokens((c) => chatLogprob(texts, c), texts.tokenizer, prompt);
  }

  /** A chunk of the completion; returns the entries it added (possibly none). */
  chunk(c: StreamChunk): ChatTokenLogprob[] {
    return this.add(this.reported.chunk(c));
  }

  /** The completion ended; returns the entries it added (possibly none). */
  end(): ChatTokenLogprob[] {
    return this.add(this.reported.end());
  }

  private add(placed: Placed<ChatTokenLogprob>[]): ChatTokenLogprob[] {
    const added = placed.map((p) => p.entry);
    this.content.push(...added);
    return added;
  }
}

/** A token's part of the completions endpoint's log-probabilities. */
interface CompletionTokenLogprob {
  token: string;
  logprob: number;
  top: Record<string, number>;
}

function completionLogprob(texts: TokenTexts, c: StreamChunk): CompletionTokenLogprob | undefined {
  if (c.token === null || c.logprob === undefined) return undefined;
  const top: Record<string, number> = {};
  for (const t of c.topLogprobs ?? []) top[texts.text(t.token)] = t.logprob;
  return { token: texts.text(c.token), logprob: c.logprob, top };
}

/** Gathers a completion's log-probabilities in the completions endpoint's shape, as they come to have text in the answer. */
export class CompletionLogprobsBuilder {
  readonly value: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  private readonly reported: ReportedTokens<CompletionTokenLogprob>;

  constructor(texts: TokenTexts, prompt: readonly number[]) {
    this.reported = new ReportedTokens((c) => completionLogprob(texts, c), texts.tokenizer, prompt);
  }

  /** A chunk of the completion; returns what it added, or undefined when nothing. */
  chunk(c: StreamChunk): CompletionLogprobs | undefined {
    return this.add(this.reported.chunk(c));
  }

  /** The completion ended; returns what it added, or undefined when nothing. */
  end(): CompletionLogprobs | undefined {
    return this.add(this.reported.end());
  }

  private add(placed: Placed<CompletionTokenLogprob>[]): CompletionLogprobs | undefined {
    if (placed.length === 0) return undefined;
    const added: CompletionLogprobs = {
      tokens: placed.map((p) => p.entry.token),
      token_logprobs: placed.map((p) => p.entry.logprob),
      top_logprobs: placed.map((p) => p.entry.top),
      text_offset: placed.map((p) => p.offset),
    };
    this.value.tokens.push(...added.tokens);
    this.value.token_logprobs.push(...added.token_logprobs);
    this.value.top_logprobs.push(...added.top_logprobs);
    this.value.text_offset.push(...added.text_offset);
    return added;
  }
}
