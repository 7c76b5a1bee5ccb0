/**
 * ChatSession: a multi-turn chat over one sequence kept between turns. Each turn renders the
 * whole conversation through the chat template and appends to the sequence only the tokens
 * beyond those it already holds, so a turn prefills its new text (and the template's markup
 * around it), not the conversation again.
 */
import "./dispose-symbols";
import type { EngineContext } from "./engine-context";
import { AbortError, BusyError, DisposedError, InvalidInputError } from "./errors";
import { GenerationProgress, GenerationStream, generationStream } from "./generation-stream";
import { describe, GenerateOptions } from "./options";
import { Sequence } from "./sequence";
import type { ChatMessage } from "./tokenizer";
import type { GenerateResult, StreamChunk } from "./types";

export interface ChatSessionOptions {
  /** A system message that opens the conversation. */
  system?: string;
}

export class ChatSession implements Disposable {
  private readonly history: ChatMessage[] = [];
  /** A turn is running (its stream has started and not ended). */
  private active = false;
  private seq: Sequence;

  /** @internal Use model.createChatSession() (the constructor is private, so the published types offer no `new ChatSession()`). */
  static create(engine: EngineContext, seq: Sequence, system?: string): ChatSession {
    return new ChatSession(engine, seq, system);
  }

  private constructor(
    private readonly engine: EngineContext,
    seq: Sequence,
    system?: string,
  ) {
    this.seq = seq;
    if (system !== undefined) this.history.push({ role: "system", content: system });
  }

  /**
   * The conversation so far: the system message, then each finished turn's user message and
   * reply. A turn that failed, or was aborted before its first token, is not in it.
   */
  get messages(): readonly ChatMessage[] {
    return this.history;
  }

  /**
   * Sends a user message and streams the reply (GenerationStream: chunks, and `result`). The
   * turn joins the conversation when its stream ends, with the reply as far as it got.
   * usage.promptTokens counts the whole rendered conversation, of which only the part the
   * sequence did not hold is prefilled.
   */
  send(userMessage: string, options?: GenerateOptions): GenerationStream {
    let started = false;
    return generationStream(
      (progress) =>
        this.turn(userMessage, options, progress, () => {
          started = true;
          this.active = true;
        }),
      (result) => {
        if (!started) return;
        this.active = false;
        if (result && !(result.finishReason === "abort" && result.tokens.length === 0)) {
          this.history.push({ role: "user", content: userMessage }, { role: "assistant", content: result.text });
        }
      },
    );
  }

  private async *turn(
    userMessage: string,
    options: GenerateOptions | undefined,
    progress: GenerationProgress,
    claim: () => void,
  ): AsyncGenerator<StreamChunk, GenerateResult, undefined> {
    if (this.engine.disposed) throw new DisposedError("the model this chat session belongs to");
    if (this.seq.disposed) throw new DisposedError("the chat session");
    if (this.active) throw new BusyError("the chat session is busy: let its previous reply finish first");
    if (typeof userMessage !== "string") throw new InvalidInputError(`the message must be a string, got ${describe(userMessage)}`);
    const messages = [...this.history, { role: "user", content: userMessage }];
    const ids = this.engine.chatTokenIds(messages, "conversation");
    const opts = this.engine.resolveGenerate(options, ids.length, progress.stopSignal);
    this.engine.refuseFullContext(ids.length, opts, "conversation");
    claim();
    progress.promptTokens = ids.length;
    if (opts.maxNewTokens === 0) return progress.result("length");
    if (opts.signal?.aborted) return progress.result("abort");
    // Keep what the sequence holds of the conversation; a template that rewrote earlier text (or
    // a reply that tokenizes differently as text) rewinds it to where the two part. At least the
    // last token is appended: generation starts from its logits.
    const held = this.seq.tokens;
    let keep = 0;
    while (keep < held.length && keep < ids.length - 1 && held[keep] === ids[keep]) keep++;
    if (keep < held.length) {
      try {
        this.seq.truncate(keep);
      } catch {
        // A sliding window already released K/V the rewound sequence would need: start afresh.
        this.seq.dispose();
        this.seq = Sequence.create(this.engine, this.engine.openSequence());
        keep = 0;
      }
    }
    try {
      // The pages for the new part and the whole reply, before any work (as model.stream() does).
      if (!(await this.seq.reserveRequest(ids.length, opts.maxNewTokens, opts.signal))) return progress.result("abort");
      let passes: number;
      try {
        ({ passes } = await this.seq.appendTokens(ids.slice(keep), opts, true));
      } catch (e) {
        this.seq.releaseRequest();
        if (e instanceof AbortError) return progress.result("abort");  // nothing was added
        throw e;
      }
      return yield* this.seq.run(options, ids.length, passes, progress);
    } catch (e) {
      // Disposed mid-turn: said of what the caller holds, the session or its model, not of the
      // sequence inside the session.
      if (e instanceof DisposedError) throw new DisposedError(this.engine.disposed ? "the model this chat session belongs to" : "the chat session");
      throw e;
    }
  }

  /** Frees the session's sequence. Later turns throw DisposedError. */
  dispose(): void {
    this.seq.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
