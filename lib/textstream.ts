/**
 * Turns a growing list of token ids into text deltas. Holds back text that may still change:
 * an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could begin a stop string.
 *
 * Decoding is incremental (as Hugging Face's text-generation-inference does it): each push
 * decodes only the ids since the last complete character, plus the few before them as context
 * (a token's leading space or merged bytes can depend on its neighbours), and takes the
 * difference. Decoding every id so far at every token made a long generation quadratic.
 *
 * The first generated ids are decoded after the last few ids of the prompt (`context`), so a
 * tokenizer whose decoder strips the text's leading space (SentencePiece: "▁there" alone is
 * "there") still gives " there" after "Once upon a time".
 */

/**
 * Tokens before the generated ones that a generation decodes as context (as in TGI); whatever
 * decodes a generation's tokens again (the server's log-probability offsets) takes as many.
 */
export const TEXT_CONTEXT_TOKENS = 5;

export class TextStream {
  private emitted = 0; // chars of `text` handed out
  private text = ""; // the text of ids[0, readOffset)
  private pending = ""; // the text after it while it ends in an incomplete character
  private readonly ids: number[]; // the context, then the generated ids
  private readonly contextLength: number;
  private prefixOffset = 0; // ids[prefixOffset, readOffset) are decoded again as context
  private readOffset: number;
  private readonly longestStop: number;
  stopped = false;

  constructor(
    private readonly decode: (ids: number[]) => string,
    private readonly stops: readonly string[],
    context: readonly number[] = [],
  ) {
    this.longestStop = Math.max(0, ...stops.map((s) => s.length));
    this.ids = [...context];
    this.readOffset = this.ids.length;
    this.contextLength = this.ids.length;
  }

  /** Call with all generated ids so far; returns the new text that is safe to emit. */
  push(generated: readonly number[]): string {
    if (this.stopped) return "";
    for (let i = this.ids.length - this.contextLength; i < generated.length; i++) this.ids.push(generated[i]);
    const ids = this.ids;
    const before = this.text.length;
    const context = this.decodeSome(ids.slice(this.prefixOffset, this.readOffset));
    const window = this.decodeSome(ids.slice(this.prefixOffset));
    if (window.length > context.length && !window.endsWith("\ufffd")) {
      this.text += window.slice(context.length);
      this.pending = "";
      this.prefixOffset = this.readOffset;
      this.readOffset = ids.length;
    } else {
      this.pending = window.slice(context.length);
    }
    // A stop string can only begin where it would overlap the new text.
    let limit = this.cutAtStop(Math.max(0, before - this.longestStop + 1));
    if (!this.stopped) {
      // Keep back a replacement character at the end and any suffix that begins a stop string.
      while (limit > 0 && this.text.charCodeAt(limit - 1) === 0xfffd) limit--;
      let held = 0;
      for (const s of this.stops) {
        for (let k = Math.min(s.length - 1, limit); k > held; k--) {
          if (this.text.startsWith(s.slice(0, k), limit - k)) {
            held = k;
            break;
          }
        }
      }
      limit -= held;
    }
    limit = Math.max(limit, this.emitted);
    const out = this.text.slice(this.emitted, limit);
    this.emitted = limit;
    return out;
  }

  /** Where the earliest stop string found in text from `from` on begins (stopping there), else the text's end. */
  private cutAtStop(from: number): number {
    let limit = this.text.length;
    for (const s of this.stops) {
      const at = s.length > 0 ? this.text.indexOf(s, from) : -1;
      if (at >= 0 && at < limit) {
        limit = at;
        this.stopped = true;
      }
    }
    return limit;
  }

  // Tokenizers refuse an empty list (the first push has no context yet).
  private decodeSome(ids: number[]): string {
    return ids.length > 0 ? this.decode(ids) : "";
  }

  /** At the end: whatever was held back, except what a stop string cuts (in the held text too). */
  flush(): string {
    if (this.stopped) return "";
    const from = Math.max(0, this.emitted - this.longestStop + 1);
    this.text += this.pending;
    this.pending = "";
    const limit = Math.max(this.cutAtStop(from), this.emitted);
    const out = this.text.slice(this.emitted, limit);
    this.emitted = limit;
    return out;
  }

  /** The text emitted so far. */
  get value(): string {
    return this.text.slice(0, this.emitted);
  }
}
