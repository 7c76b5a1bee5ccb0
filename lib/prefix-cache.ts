/**
 * Prefix reuse across requests: finished one-shot sequences are kept (least recently used
 * first out), and a new prompt that starts with tokens one of them holds forks it, rewinds the
 * fork to the shared prefix and prefills only the rest. A sequence is reused only by a request
 * that accepts how far its K/V may be from the sequential computation's (Sequence.kvTolerance):
 * an LCKV prompt prefilled with the approximate iterative scheme serves only requests that
 * prefill iteratively too, in at most as many passes, one prefilled to a loose fixed-point
 * tolerance only requests at least as loose, and a sequence whose K/V no longer follows from its
 * tokens (a context shift, a lossy rewind) none: it is not kept. A fork
 * shares the cached pages (copy-on-write), so a hit costs no copy; the cached sequences' pages
 * count as "cached" in cacheStats() and are the first to go when the pool runs short (least
 * recently used first).
 */
import { KV_PAGE_TOKENS } from "./admission";
import type { Sequence } from "./sequence";

export interface PrefixCacheStats {
  hits: number;
  misses: number;
  /** Prompt tokens taken from the cache instead of being prefilled. */
  reusedTokens: number;
  /** Finished sequences kept for reuse now. */
  sequences: number;
}

export class PrefixCache {
  private entries: Sequence[] = []; // least recently used first
  private counts = { hits: 0, misses: 0, reusedTokens: 0 };

  constructor(private readonly capacity: number) {}

  /**
   * A sequence holding the longest cached prefix of ids (at most ids.length - 1 tokens) whose
   * K/V is within `accepts` of the sequential computation's, or null. A hit reuses at least one
   * whole page (KV_PAGE_TOKENS tokens): a shorter match (a BOS token, a shared first word) saves
   * less prefill than the fork costs, and would count as a hit that saved nothing.
   */
  take(ids: readonly number[], accepts: number): { seq: Sequence; reused: number } | null {
    let best = -1;
    let bestLen = 0;
    this.entries.forEach((e, i) => {
      if (e.kvTolerance > accepts) return;
      const t = e.tokens;
      let k = 0;
      while (k < t.length && k < ids.length && t[k] === ids[k]) k++;
      if (k > bestLen) {
        bestLen = k;
        best = i;
      }
    });
    // An int4 cache rewinds exactly only to the start of a page or into the page it is writing
    // (exactRewind): the reuse stops there, so the K/V it keeps is the one a prefill computes.
    const reused = best < 0 ? 0 : this.entries[best].exactRewind(Math.min(bestLen, ids.length - 1));
    if (best < 0 || reused < KV_PAGE_TOKENS) {
      this.counts.misses++;
      return null;
    }
    const [src] = this.entries.splice(best, 1);
    this.entries.push(src);
    const seq = src.fork();
    try {
      seq.truncate(reused);
    } catch {
      // A sliding window already released K/V the prompt's next token would read: no reuse.
      seq.dispose();
      this.counts.misses++;
      return null;
    }
    this.counts.hits++;
    this.counts.reusedTokens += reused;
    return { seq, reused };
  }

  /** Keeps a finished sequence for reuse, or disposes it. */
  offer(seq: Sequence): void {
    if (this.capacity === 0 || !Number.isFinite(seq.kvTolerance) || seq.disposed || seq.length === 0) {
      seq.dispose();
      return;
    }
    seq.releasePagesPastEnd();  // a page a step run ahead took, which a kept sequence never writes
    seq.markCached(true);
    this.entries.push(seq);
    while (this.entries.length > this.capacity) this.entries.shift()!.dispose();
  }

  /** Disposes the least recently used entry (its pages go back unless shared); false when empty. */
  evictOne(): boolean {
    const e = this.entries.shift();
    if (!e) return false;
    e.dispose();
    return true;
  }

  clear(): void {
    for (const e of this.entries) e.dispose();
    this.entries = [];
  }

  stats(): PrefixCacheStats {
    return { ...this.counts, sequences: this.entries.length };
  }
}
