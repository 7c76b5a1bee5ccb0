/**
 * Turns a growing list of token ids into text deltas. Holds back text that may still change:
 * an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could begin a stop string.
 */
export class TextStream {
  private emitted = 0;
  private text = "";
  stopped = false;

  constructor(
    private readonly decode: (ids: number[]) => string,
    private readonly stops: readonly string[],
  ) {}

  /** Call with all generated ids so far; returns the new text that is safe to emit. */
  push(ids: number[]): string {
    this.text = this.decode(ids);
    let limit = this.text.length;
    for (const s of this.stops) {
      const at = this.text.indexOf(s);
      if (at >= 0 && at < limit) {
        limit = at;
        this.stopped = true;
      }
    }
    if (!this.stopped) {
      // Keep back an unfinished character and any suffix that is a prefix of a stop string.
      while (limit > 0 && this.text.charCodeAt(limit - 1) === 0xfffd) limit--;
      const safe = this.text.slice(0, limit);
      for (const s of this.stops) {
        for (let k = Math.min(s.length - 1, limit); k > 0; k--) {
          if (safe.endsWith(s.slice(0, k))) {
            limit -= k;
            break;
          }
        }
      }
    }
    limit = Math.max(limit, this.emitted);
    const out = this.text.slice(this.emitted, limit);
    this.emitted = limit;
    return out;
  }

  /** At the end: whatever was held back, except what a stop string cut. */
  flush(): string {
    if (this.stopped) return "";
    const out = this.text.slice(this.emitted);
    this.emitted = this.text.length;
    return out;
  }

  /** The text emitted so far. */
  get value(): string {
    return this.text.slice(0, this.emitted);
  }
}
