/** chatStream() and ChatSession (one sequence kept between turns) on a fixture with a chat template. */
import * as path from "node:path";
import { BusyError, ChatMessage, ContextOverflowError, DisposedError, GenerateResult, GenerationStream, InvalidInputError, InvalidOptionError, loadModel, Model } from "../../lib";

process.env.LCKV_QUIET = "1";
const dir = path.join(__dirname, "..", "fixtures", "llama-mha-hd16");

let model: Model;
beforeAll(async () => {
  model = await loadModel(dir, { device: "cpu", prefixCache: 0 });
});
afterAll(() => model.dispose());

async function drain(s: GenerationStream): Promise<GenerateResult> {
  for await (const _ of s) void _;
  return s.result;
}

const templated = (messages: ChatMessage[]) =>
  model.tokenizer!.encode(model.tokenizer!.applyChatTemplate(messages, { addGenerationPrompt: true }), { addSpecialTokens: false });

const commonPrefix = (a: number[], b: number[]) => {
  let k = 0;
  while (k < a.length && k < b.length && a[k] === b[k]) k++;
  return k;
};

const system = "You are terse.";
const opts = { maxNewTokens: 6, temperature: 0 };

test("chatStream streams what chat() returns", async () => {
  const messages = [
    { role: "system", content: system },
    { role: "user", content: "Is Netherfield Park let?" },
  ];
  const s = model.chatStream(messages, opts);
  const tokens: number[] = [];
  for await (const c of s) if (c.token !== null) tokens.push(c.token);
  const r = await s.result;
  const a = await model.chat(messages, opts);
  expect(tokens).toEqual(a.tokens);
  expect(r.tokens).toEqual(a.tokens);
  expect(r.text).toBe(a.text);
  expect(r.usage.promptTokens).toBe(templated(messages).length);
  // A bad conversation fails where stream()'s errors do: when the stream is first iterated.
  const bad = model.chatStream([{ role: "user" } as ChatMessage]);
  await expect(bad.next()).rejects.toThrow(InvalidInputError);
  await expect(bad.result).rejects.toThrow(InvalidInputError);
});

test("a session keeps its sequence: the second turn prefills only its new tokens, and answers as chat() does", async () => {
  using session = model.createChatSession({ system });
  const turn1: ChatMessage[] = [
    { role: "system", content: system },
    { role: "user", content: "Is Netherfield Park let?" },
  ];
  const ids1 = templated(turn1);
  let p = model.cacheStats().prefilledTokens;
  const r1 = await drain(session.send("Is Netherfield Park let?", opts));
  expect(model.cacheStats().prefilledTokens - p).toBe(ids1.length - 1);
  expect(r1.tokens).toEqual((await model.chat(turn1, opts)).tokens);
  expect(session.messages).toEqual([...turn1, { role: "assistant", content: r1.text }]);

  const turn2: ChatMessage[] = [...session.messages, { role: "user", content: "Who has taken it?" }];
  const ids2 = templated(turn2);
  // What the sequence holds after the first turn: its prompt and its reply.
  const kept = commonPrefix([...ids1, ...r1.tokens], ids2);
  expect(kept).toBeGreaterThanOrEqual(ids1.length);
  p = model.cacheStats().prefilledTokens;
  const r2 = await drain(session.send("Who has taken it?", opts));
  expect(model.cacheStats().prefilledTokens - p).toBe(ids2.length - kept - 1);
  expect(ids2.length - kept).toBeLessThan(ids2.length - ids1.length + 1);  // not the whole conversation again
  expect(r2.usage.promptTokens).toBe(ids2.length);
  // The kept K/V is exact: the reply is the one a fresh prefill of the whole conversation gives.
  expect(r2.tokens).toEqual((await model.chat(turn2, opts)).tokens);
  expect(session.messages).toHaveLength(5);
  expect(session.messages[4]).toEqual({ role: "assistant", content: r2.text });
});

test("a turn ended early joins the conversation with its reply so far; one before any token does not", async () => {
  using session = model.createChatSession();
  const s = session.send("Hello there", { maxNewTokens: 10, ignoreEos: true });
  for await (const _ of s) break;
  const r = await s.result;
  expect(r.finishReason).toBe("abort");
  expect(session.messages).toEqual([
    { role: "user", content: "Hello there" },
    { role: "assistant", content: r.text },
  ]);
  const never = session.send("Unsent");
  await never.return();
  expect(session.messages).toHaveLength(2);
  // The session goes on after both.
  const r2 = await drain(session.send("Again", opts));
  expect(r2.finishReason).not.toBe("abort");
  expect(session.messages).toHaveLength(4);
});

test("one turn at a time; bad input and options change nothing; dispose ends the session", async () => {
  const session = model.createChatSession({ system });
  const a = session.send("First", { maxNewTokens: 8, ignoreEos: true });
  await a.next();
  const b = session.send("Second", opts);
  await expect(b.next()).rejects.toThrow(BusyError);
  await drain(a);
  expect(session.messages).toHaveLength(3);
  await expect(drain(session.send("x", { temperature: -1 }))).rejects.toThrow(InvalidOptionError);
  await expect(drain(session.send(42 as unknown as string))).rejects.toThrow(InvalidInputError);
  expect(session.messages).toHaveLength(3);
  const live = model.cacheStats().liveSequences;
  session[Symbol.dispose]();
  expect(model.cacheStats().liveSequences).toBe(live - 1);
  await expect(drain(session.send("After"))).rejects.toThrow(DisposedError);
  expect(model.auditCache()).toBe("");
});

test("a turn whose conversation fills the context is refused before it starts and leaves the conversation as it was", async () => {
  const long = "tell me more about the weather in the mountains today";
  const fills = templated([{ role: "system", content: system }, { role: "user", content: long }]).length;
  const tight = await loadModel(dir, { device: "cpu", prefixCache: 0, maxContext: fills });
  try {
    const session = tight.createChatSession({ system });
    const e = await drain(session.send(long, opts)).catch((x) => x);
    expect(e).toBeInstanceOf(ContextOverflowError);
    expect(e.message).toBe(`conversation has ${fills} tokens and the context holds ${fills}: that leaves no room for a reply`);
    expect(session.messages).toEqual([{ role: "system", content: system }]);
    // A shorter message still has room.
    const r = await drain(session.send("Hi", opts));
    expect(r.tokens.length).toBeGreaterThan(0);
    expect(session.messages).toHaveLength(3);
    session[Symbol.dispose]();
    expect(tight.auditCache()).toBe("");
  } finally {
    await tight.dispose();
  }
});

test("a session whose model was disposed says so, not that the session was", async () => {
  const own = await loadModel(dir, { device: "cpu" });
  const session = own.createChatSession({ system });
  await drain(session.send("First", opts));
  await own.dispose();
  const e = await drain(session.send("Second", opts)).catch((x) => x);
  expect(e).toBeInstanceOf(DisposedError);
  expect(e.message).toBe("the model this chat session belongs to has been disposed");
});

test("a turn cut short by disposing the session, or its model, names that, not the sequence inside", async () => {
  const own = await loadModel(dir, { device: "cpu" });
  const session = own.createChatSession({ system });
  const mid = session.send("First", { maxNewTokens: 20, ignoreEos: true });
  await mid.next();
  session.dispose();
  const e = await drain(mid).catch((x) => x);
  expect(e).toBeInstanceOf(DisposedError);
  expect(e.message).toBe("the chat session has been disposed");
  const other = own.createChatSession({ system });
  const cut = other.send("First", { maxNewTokens: 20, ignoreEos: true });
  await cut.next();
  await own.dispose();
  const e2 = await drain(cut).catch((x) => x);
  expect(e2).toBeInstanceOf(DisposedError);
  expect(e2.message).toBe("the model this chat session belongs to has been disposed");
});

test("createChatSession checks its options", () => {
  expect(() => model.createChatSession({ system: 5 as unknown as string })).toThrow(InvalidOptionError);
  expect(() => model.createChatSession({ sytem: "x" } as never)).toThrow(InvalidOptionError);
});
