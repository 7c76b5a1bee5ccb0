/**
 * Admission to the K/V pool. Before a request runs, its sequence reserves every page it can
 * need (prompt plus maxNewTokens, plus a context shift's copies of shared pages), so a running
 * request never finds the pool empty halfway.
 * When the pool is short, the least recently used prefix-cache entries are evicted first; if
 * that is not enough the request waits in a FIFO queue until pages come back (a sequence is
 * disposed, truncated, or finishes its request). A request that could not fit even with the
 * whole pool to itself fails at once, as does one that finds the queue at its bound.
 *
 * A wait may end only by the caller's hand: when the pages are held by sequences that no
 * request is prefilling or generating, only their dispose() or truncate() frees them. Such a
 * wait says so once (a process warning), and while any request waits the queue keeps Node's
 * event loop alive, so that a program that forgot a dispose() waits visibly instead of
 * exiting with its request never settled and nothing said.
 */
import { fromNative, KvCacheFullError } from "./errors";
import { NativeModel, NativeSequence } from "./native";

/** Positions per K/V page (the engine takes any power of two; lckv uses this one). */
export const KV_PAGE_TOKENS = 16;

export interface AdmissionOptions {
  /** Requests that may wait for pages at once; the next one gets LCKV_QUEUE_FULL. */
  maxQueue: number;
  /** Milliseconds a request may wait for pages before it fails with LCKV_KV_CACHE_FULL. */
  queueTimeout: number;
}

/** How Admission.reserve() counts a request's pages (see there). */
export interface ReserveOptions {
  signal?: AbortSignal;
  resumed?: boolean;
  extraPages?: () => number;
  decodeFrom?: number;
}

interface Waiter {
  seq: NativeSequence;
  total: number;
  extraPages: () => number;
  decodeFrom: number | undefined;
  resolve: (admitted: boolean) => void;
  reject: (e: unknown) => void;
  cleanup: () => void;
}

export class Admission {
  private waiters: Waiter[] = [];
  private pumping = false;
  /** Keeps the event loop alive while requests wait (see the class's comment). */
  private keepAlive?: NodeJS.Timeout;
  private stallCheck?: NodeJS.Immediate;
  private stallWarned = false;
  private geometry?: { pageTokens: number; pageBytes: number; pagesTotal: number; residualPages: number };

  constructor(
    private readonly native: () => NativeModel,
    /** Drops the least recently used prefix-cache entry; false when there is none. */
    private readonly evictOne: () => boolean,
    private readonly options: AdmissionOptions,
    /** Whether a request is prefilling or generating (EngineContext.working()): one that will give pages back when it ends. */
    private readonly running: () => boolean,
  ) {}

  /** Requests waiting for pages now. */
  get queued(): number {
    return this.waiters.length;
  }

  /**
   * Reserves the pages `seq` needs to hold `total` tokens. Resolves true once reserved, false
   * when `signal` aborts the wait; throws KvCacheFullError when it can never fit, when the
   * queue is full, or when the wait times out. `resumed`: a running request re-reserving after
   * it gave pages back, or before a context shift, which does not queue behind new requests. A
   * sequence that already holds pages (the next turn of a conversation) does not either: a
   * request queued before it may be waiting for exactly those pages, and neither could ever
   * run. `extraPages`: pages beyond the growth, for a context shift's copies
   * (NativeSequence.pagesToShift), counted again at each try: while it waits, the pages it
   * shares may stop being shared. `decodeFrom`: past that many tokens the sequence grows by
   * decoding, a token at a time, so a model whose every layer is windowed needs only its
   * window's pages there (NativeSequence.reserve).
   */
  async reserve(seq: NativeSequence, total: number, opts: ReserveOptions = {}): Promise<boolean> {
    const { signal, resumed = false, extraPages = () => 0, decodeFrom } = opts;
    // The pool's geometry never changes; its full stats scan every page, so read them once.
    const stats = this.poolGeometry();
    const own = this.pagesHeld(seq);
    // Pages it holds plus those it must take; a shared page it will copy counts in both, while
    // the sequence ends with one page per pageTokens tokens at most, and an int4 cache's
    // residual (and can wait for the rest).
    const extra = extraPages();
    const need = seq.pagesToReserve(total, extra, decodeFrom);
    const atMost = Math.min(own + need, Math.ceil(total / stats.pageTokens) + stats.residualPages + extra);
    if (atMost > stats.pagesTotal) {
      throw new KvCacheFullError(
        `a sequence of ${total} tokens needs ${atMost} pages of ${stats.pageTokens} tokens, but the whole K/V cache has ${stats.pagesTotal} ` +
          `(raise loadModel's kvCacheMemory, or ask for fewer tokens)`,
        "LCKV_REQUEST_TOO_LARGE",
      );
    }
    // A running request that has just given pages back (a context shift), or any sequence that
    // holds pages or a promise of them (an admitted request reshaping its promise), takes them
    // before the queue: waiting behind requests that need its pages could deadlock.
    const first = resumed || own > 0 || seq.reservedPages > 0;
    if ((first || this.waiters.length === 0) && this.tryReserve(seq, total, extraPages, decodeFrom)) return true;
    if (signal?.aborted) return false;
    if (!first && this.waiters.length >= this.options.maxQueue) {
      throw new KvCacheFullError(`the K/V cache is full and ${this.waiters.length} requests already wait for it (maxQueue)`, "LCKV_QUEUE_FULL");
    }
    return new Promise<boolean>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = () => {
        this.remove(waiter);
        resolve(false);
        this.pumpSoon();  // the requests behind it may fit now
      };
      const waiter: Waiter = {
        seq,
        total,
        extraPages,
        decodeFrom,
        resolve,
        reject,
        cleanup: () => {
          if (timer) clearTimeout(timer);
          signal?.removeEventListener("abort", onAbort);
        },
      };
      if (Number.isFinite(this.options.queueTimeout)) {
        timer = setTimeout(() => {
          this.remove(waiter);
          reject(new KvCacheFullError(`waited ${this.options.queueTimeout} ms for ${need} pages of the K/V cache (queueTimeout)`));
          this.pumpSoon();
        }, this.options.queueTimeout);
      }
      signal?.addEventListener("abort", onAbort, { once: true });
      // It goes first when it holds pages the others may be waiting for.
      if (first) this.waiters.unshift(waiter);
      else this.waiters.push(waiter);
      this.keepAlive ??= setInterval(() => {}, 2 ** 31 - 1);
      this.warnIfStalledSoon();
    });
  }

  /**
   * On the next turn of the event loop: if requests still wait while none is in flight, only
   * the caller can free their pages; says so once until the queue empties, as a process warning
   * (LckvKvWaitWarning). Called
   * when a request starts waiting and when the last request in flight ends.
   */
  warnIfStalledSoon(): void {
    if (this.stallWarned || this.stallCheck || this.waiters.length === 0) return;
    this.stallCheck = setImmediate(() => {
      this.stallCheck = undefined;
      this.pump();
      if (this.stallWarned || this.waiters.length === 0 || this.running()) return;
      // A request admitted just now (by this pump, say) holds its promise of pages before it
      // counts as running (its working() comes on the next turn); it will give them back too.
      const stats = this.native().poolStats();
      if (stats.pagesReserved > 0) return;
      this.stallWarned = true;
      const timeout = Number.isFinite(this.options.queueTimeout) ? `, or for at most queueTimeout (${this.options.queueTimeout} ms)` : " (loadModel's queueTimeout bounds the wait)";
      process.emitWarning(
        `lckv: ${this.waiters.length === 1 ? "a request waits" : `${this.waiters.length} requests wait`} for K/V pages, and no request in flight will give any back: ` +
          `sequences that are not running hold them (${stats.pagesUsed} of ${stats.pagesTotal} pages held). It waits until one of them is disposed or truncated${timeout}.`,
        { type: "LckvKvWaitWarning" },
      );
    });
  }

  /**
   * Refuses (LCKV_REQUEST_TOO_LARGE) forks of one prefill that could never run, given one of
   * them: each fork's first write (the prompt's last token) lands in a page its siblings share
   * unless it starts a page, so each copies that page and needs its own pages plus the original
   * its siblings keep (docs/cache.md, admission item 8). Where
   * the whole pool cannot hold that, each fork would wait for good for the page the others hold.
   */
  refuseForksThatCannotFit(fork: NativeSequence, total: number, decodeFrom: number): void {
    const stats = this.poolGeometry();
    const need = this.pagesHeld(fork) + fork.pagesToReserve(total, 0, decodeFrom);
    if (need > stats.pagesTotal) {
      throw new KvCacheFullError(
        `each of several completions of one prompt copies the page its first token is written into, which the others share: each needs ${need} pages of ${stats.pageTokens} tokens for ${total} tokens, ` +
          `but the whole K/V cache has ${stats.pagesTotal} (ask for one completion, fewer tokens, or raise loadModel's kvCacheMemory)`,
        "LCKV_REQUEST_TOO_LARGE",
      );
    }
  }

  /** The pool's geometry, which never changes: read once, since the full stats scan every page. */
  private poolGeometry(): { pageTokens: number; pageBytes: number; pagesTotal: number; residualPages: number } {
    return (this.geometry ??= this.native().poolStats());
  }

  /** Pages `seq` holds, shared ones included. */
  private pagesHeld(seq: NativeSequence): number {
    return Math.round(seq.kvBytes / this.poolGeometry().pageBytes);
  }

  /** Admits waiting requests, in order, while pages allow. Call whenever pages may have come back. */
  pump(): void {
    // Not re-entered: an eviction inside tryReserve disposes a sequence, whose close pumps.
    if (this.pumping) return;
    this.pumping = true;
    try {
      this.pumpWaiters();
    } finally {
      this.pumping = false;
    }
  }

  /** pump() on the next turn of the event loop: after an engine call that frees pages has ended. */
  pumpSoon(): void {
    setImmediate(() => this.pump());
  }

  private pumpWaiters(): void {
    while (this.waiters.length > 0) {
      const w = this.waiters[0];
      let ok: boolean;
      try {
        ok = this.tryReserve(w.seq, w.total, w.extraPages, w.decodeFrom);
      } catch (e) {
        this.remove(w);
        w.reject(e);
        continue;
      }
      if (!ok) return;  // first come, first served: later requests do not overtake
      this.remove(w);
      w.resolve(true);
    }
  }

  /** Fails the waits of `seq` (it is being freed): they leave the queue now, not when they reach its head. */
  rejectWaiting(seq: NativeSequence, e: unknown): void {
    for (const w of this.waiters.filter((w) => w.seq === seq)) {
      this.remove(w);
      w.reject(e);
    }
  }

  /** Fails every waiting request (the model is going away). */
  rejectAll(e: unknown): void {
    for (const w of [...this.waiters]) {
      this.remove(w);
      w.reject(e);
    }
  }

  private remove(w: Waiter): void {
    const i = this.waiters.indexOf(w);
    if (i >= 0) this.waiters.splice(i, 1);
    w.cleanup();
    if (this.waiters.length === 0) {
      if (this.keepAlive) clearInterval(this.keepAlive);
      this.keepAlive = undefined;
      this.stallWarned = false;  // the next wait that only the caller can end is said again
    }
  }

  private tryReserve(seq: NativeSequence, total: number, extraPages: () => number, decodeFrom: number | undefined): boolean {
    // Evictions below must not hand their pages to waiters before this request retries.
    const outer = this.pumping;
    this.pumping = true;
    try {
      return this.reserveEvicting(seq, total, extraPages, decodeFrom);
    } finally {
      this.pumping = outer;
    }
  }

  private reserveEvicting(seq: NativeSequence, total: number, extraPages: () => number, decodeFrom: number | undefined): boolean {
    for (;;) {
      try {
        seq.reserve(total, extraPages(), decodeFrom);
        return true;
      } catch (e) {
        if ((e as { code?: string }).code !== "LCKV_KV_CACHE_FULL") throw fromNative(e);
        if (!this.evictOne()) return false;
      }
    }
  }
}
